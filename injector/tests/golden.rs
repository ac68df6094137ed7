//! Golden files: every manifest of `../shared/testdata/k8s/` injected (native mode; a few
//! in legacy mode too) and compared with `tests/golden/`. Regenerate after an intended
//! change with `NEUTRINO_BLESS=1 cargo nextest run -p neutrino-injector --test golden`
//! and review the diff. Also: injecting twice changes nothing, uninject restores each
//! manifest exactly, and the skip and ordering cases.

mod common;

use std::path::{Path, PathBuf};

use neutrino_injector::config::{InjectConfig, SidecarMode};
use neutrino_injector::manifest::{self, Note};
use neutrino_injector::patch::SkipReason;
use neutrino_injector::{ANNOTATION_SKIPPED, INIT_CONTAINER, PROXY_CONTAINER, TOKEN_VOLUME};
use serde_json::Value;

use common::{mtls, names, pods, read, shared_files};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn legacy() -> InjectConfig {
    InjectConfig { sidecar_mode: SidecarMode::Legacy, ..InjectConfig::default() }
}

const OTLP: &str = "http://jaeger.neutrino-system.svc:4317";

/// `--otlp-endpoint` set (not in the golden files: the default injects no tracing).
fn traced() -> InjectConfig {
    InjectConfig { otlp_endpoint: Some(OTLP.into()), ..InjectConfig::default() }
}

fn stem(path: &Path) -> String {
    path.file_stem().and_then(|s| s.to_str()).expect("file name").to_string()
}

/// Compares with the golden file, or writes it under NEUTRINO_BLESS=1.
fn check_golden(name: &str, actual: &str) -> Option<String> {
    let path = golden_dir().join(name);
    if std::env::var_os("NEUTRINO_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir()).expect("golden dir");
        std::fs::write(&path, actual).expect("write golden");
        return None;
    }
    match std::fs::read_to_string(&path) {
        Ok(expected) if expected == actual => None,
        Ok(_) => Some(format!("{name}: output differs from the golden file")),
        Err(e) => Some(format!("{name}: {e}")),
    }
}

const LEGACY_CASES: [&str; 3] =
    ["istio-inject-multi-init.yaml", "istio-inject-native-sidecar.yaml", "javaweb-pod-with-init-container.yaml"];

/// Injected with `--trust-anchors-file` too (`*.mtls.yaml`; `*.mtls-legacy.yaml` in legacy mode).
const MTLS_CASES: [(&str, SidecarMode); 2] =
    [("istio-inject-native-sidecar.yaml", SidecarMode::Native), ("istio-inject-multi-init.yaml", SidecarMode::Legacy)];

fn docs(text: &str) -> Vec<Value> {
    manifest::read_documents(text).expect("parses").into_iter().map(|(_, json)| json).collect()
}

#[test]
fn every_shared_manifest_matches_its_golden_file() {
    let mut failures = Vec::new();
    let mut expected_files = Vec::new();
    for path in shared_files("k8s") {
        let (out, _) = manifest::inject_stream(&read(&path), &InjectConfig::default()).expect("injects");
        let name = format!("{}.injected.yaml", stem(&path));
        failures.extend(check_golden(&name, &out));
        expected_files.push(name);
        let file = path.file_name().and_then(|n| n.to_str()).expect("name");
        if LEGACY_CASES.contains(&file) {
            let (out, _) = manifest::inject_stream(&read(&path), &legacy()).expect("injects");
            let name = format!("{}.legacy.yaml", stem(&path));
            failures.extend(check_golden(&name, &out));
            expected_files.push(name);
        }
        for (_, mode) in MTLS_CASES.iter().filter(|(f, _)| *f == file) {
            let cfg = InjectConfig { sidecar_mode: *mode, ..mtls() };
            let (out, _) = manifest::inject_stream(&read(&path), &cfg).expect("injects");
            let suffix = if *mode == SidecarMode::Legacy { "mtls-legacy" } else { "mtls" };
            let name = format!("{}.{suffix}.yaml", stem(&path));
            failures.extend(check_golden(&name, &out));
            expected_files.push(name);
        }
    }
    assert_eq!(expected_files.len(), 15, "one golden per shared manifest, plus the legacy and mTLS cases");
    let mut present: Vec<String> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(present, expected_files, "stale or missing golden files");
    assert!(
        failures.is_empty(),
        "{}\nif the change is intended: NEUTRINO_BLESS=1 cargo nextest run -p neutrino-injector --test golden",
        failures.join("\n")
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    for cfg in [InjectConfig::default(), legacy(), mtls()] {
        for path in shared_files("k8s") {
            let (once, _) = manifest::inject_stream(&read(&path), &cfg).expect("injects");
            let (twice, notes) = manifest::inject_stream(&once, &cfg).expect("injects again");
            assert_eq!(once, twice, "{}", path.display());
            assert!(notes.iter().all(|n| !matches!(n, Note::Injected { .. })), "{}: {notes:?}", path.display());
        }
    }
}

#[test]
fn uninject_restores_every_manifest() {
    for cfg in [InjectConfig::default(), legacy(), traced(), mtls()] {
        for path in shared_files("k8s") {
            let original = read(&path);
            let (injected, _) = manifest::inject_stream(&original, &cfg).expect("injects");
            let (back, _) = manifest::uninject_stream(&injected).expect("uninjects");
            assert_eq!(docs(&back), docs(&original), "{}", path.display());
            // Uninjecting what was never injected changes nothing either.
            let (same, notes) = manifest::uninject_stream(&back).expect("uninjects");
            assert_eq!(docs(&same), docs(&original), "{}", path.display());
            assert!(notes.is_empty(), "{notes:?}");
        }
    }
}

#[test]
fn host_network_workloads_are_skipped_with_the_reason() {
    for file in ["istio-inject-hello-host-network.yaml", "newrelic-daemonset-hostnetwork.yaml"] {
        let path = common::shared("k8s").join(file);
        let (out, notes) = manifest::inject_stream(&read(&path), &InjectConfig::default()).expect("injects");
        assert!(
            matches!(notes.as_slice(), [Note::Skipped { reason: SkipReason::HostNetwork, .. }]),
            "{file}: {notes:?}"
        );
        let doc = &docs(&out)[0];
        let pod = pods(doc)[0];
        assert_eq!(pod["metadata"]["annotations"][ANNOTATION_SKIPPED], "host-network", "{file}");
        assert!(pod["spec"].get("initContainers").is_none(), "{file}: nothing injected");
        assert!(!names(&pod["spec"]["containers"]).contains(&PROXY_CONTAINER));
    }
}

#[test]
fn every_workload_kind_is_injected_and_ordered() {
    let mut injected = 0;
    for path in shared_files("k8s") {
        let (out, _) = manifest::inject_stream(&read(&path), &InjectConfig::default()).expect("injects");
        for doc in docs(&out) {
            for pod in pods(&doc) {
                if pod["spec"]["hostNetwork"] == true {
                    continue;
                }
                let init = names(&pod["spec"]["initContainers"]);
                assert_eq!(init[..2], [INIT_CONTAINER, PROXY_CONTAINER], "{}", path.display());
                assert!(names(&pod["spec"]["volumes"]).contains(&TOKEN_VOLUME));
                injected += 1;
            }
        }
    }
    // 12 microservices-demo Deployments, cassandra, cronjob, job, 2 in the List,
    // multi-init, native-sidecar, javaweb.
    assert_eq!(injected, 20);
}

#[test]
fn existing_init_containers_and_native_sidecars_keep_their_order_after_ours() {
    let case = |file: &str, cfg: &InjectConfig| {
        let path = common::shared("k8s").join(file);
        let (out, _) = manifest::inject_stream(&read(&path), cfg).expect("injects");
        let doc = docs(&out).remove(0);
        let pod = pods(&doc)[0].clone();
        (
            names(&pod["spec"]["initContainers"]).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            names(&pod["spec"]["containers"]).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    let (init, _) = case("istio-inject-multi-init.yaml", &InjectConfig::default());
    assert_eq!(init, [INIT_CONTAINER, PROXY_CONTAINER, "init-one", "init-two"]);
    let (init, _) = case("istio-inject-native-sidecar.yaml", &InjectConfig::default());
    assert_eq!(init, [INIT_CONTAINER, PROXY_CONTAINER, "other-sidecar"]);
    let (init, containers) = case("istio-inject-multi-init.yaml", &legacy());
    assert_eq!(init, ["init-one", "init-two", INIT_CONTAINER]);
    assert_eq!(containers, [PROXY_CONTAINER, "hello"]);
}

#[test]
fn the_otlp_endpoint_reaches_every_injected_proxy_and_nothing_else() {
    for path in shared_files("k8s") {
        let (plain, _) = manifest::inject_stream(&read(&path), &InjectConfig::default()).expect("injects");
        let (out, _) = manifest::inject_stream(&read(&path), &traced()).expect("injects");
        let (plain, out) = (docs(&plain), docs(&out));
        for (plain_doc, doc) in plain.iter().zip(&out) {
            for (plain_pod, pod) in pods(plain_doc).into_iter().zip(pods(doc)) {
                let spec = &pod["spec"];
                let proxies: Vec<&Value> = ["initContainers", "containers"]
                    .iter()
                    .flat_map(|l| spec[*l].as_array().into_iter().flatten())
                    .filter(|c| c["name"] == PROXY_CONTAINER)
                    .collect();
                let mut expected = plain_pod.clone();
                for proxy in proxies {
                    let env = proxy["env"].as_array().expect("env");
                    assert_eq!(env.last().expect("env")["name"], "OTEL_EXPORTER_OTLP_ENDPOINT", "{}", path.display());
                    assert_eq!(env.last().expect("env")["value"], OTLP);
                    // Without that one variable the pod is what the default injects.
                    let list = if spec["initContainers"].as_array().is_some_and(|l| l.contains(proxy)) {
                        "initContainers"
                    } else {
                        "containers"
                    };
                    let at = spec[list].as_array().expect("list").iter().position(|c| c == proxy).expect("proxy");
                    let mut trimmed = proxy.clone();
                    trimmed["env"].as_array_mut().expect("env").pop();
                    assert_eq!(expected["spec"][list][at], trimmed, "{}", path.display());
                    expected["spec"][list][at] = proxy.clone();
                }
                assert_eq!(&expected, pod, "{}: only the proxy's env differs", path.display());
            }
        }
    }
}

#[test]
fn trust_anchors_reach_every_injected_proxy_and_nothing_else() {
    let anchors = read(&common::anchors_file());
    let mut proxies = 0;
    for path in shared_files("k8s") {
        let (plain, _) = manifest::inject_stream(&read(&path), &InjectConfig::default()).expect("injects");
        let (out, _) = manifest::inject_stream(&read(&path), &mtls()).expect("injects");
        for (plain_doc, doc) in docs(&plain).iter().zip(&docs(&out)) {
            for (plain_pod, pod) in pods(plain_doc).into_iter().zip(pods(doc)) {
                let mut expected = plain_pod.clone();
                for list in ["initContainers", "containers"] {
                    let containers = pod["spec"][list].as_array().into_iter().flatten().enumerate();
                    for (at, proxy) in containers.filter(|(_, c)| c["name"] == PROXY_CONTAINER) {
                        // The default's environment, the control plane on its TLS port, then the two.
                        let mut env = plain_pod["spec"][list][at]["env"].as_array().expect("env").clone();
                        let cp = env.iter_mut().find(|e| e["name"] == "NEUTRINO_CONTROL_PLANE").expect("cp");
                        cp["value"] = Value::from("neutrino-control-plane.neutrino-system.svc:15012");
                        env.push(serde_json::json!({"name": "NEUTRINO_CA_PEM", "value": anchors}));
                        env.push(serde_json::json!({"name": "NEUTRINO_TRUST_DOMAIN", "value": "cluster.local"}));
                        assert_eq!(proxy["env"], Value::from(env), "{}", path.display());
                        expected["spec"][list][at]["env"] = proxy["env"].clone();
                        proxies += 1;
                    }
                }
                assert_eq!(&expected, pod, "{}: only the proxy's environment differs", path.display());
            }
        }
    }
    assert_eq!(proxies, 20);
}
