//! `neutrino install` and `deploy/` checked offline: every rendered document (default,
//! `--demo`, `--cert-manager`, and the demo app after `neutrino inject`) validates
//! strictly against the Kubernetes OpenAPI schemas bundled by `kubernetes-validate`
//! (PyPI), and `kubectl kustomize deploy/...` renders the same objects as the CLI.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The oldest Kubernetes with native sidecars (the injector's default mode) and the one
/// the workspace's k8s-openapi targets.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.35.0"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn neutrino(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_neutrino")).args(args).output().expect("run neutrino");
    assert!(out.status.success(), "neutrino {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Validates a YAML stream with `kubernetes-validate --strict` for each version. Kinds
/// without a schema are only warnings there, so any warning other than cert-manager's
/// kinds (no schema offline) fails too: a mistyped apiVersion must not pass unchecked.
fn validate(name: &str, yaml: &str) {
    let probe = Command::new("python3").args(["-c", "import kubernetes_validate"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "kubernetes-validate (PyPI) is not installed for python3: `bash scripts/test.sh` installs it \
         (python3 -m pip install kubernetes-validate)"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{name} does not validate against Kubernetes {version}:\n{text}\n{yaml}");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            assert!(line.contains("api version cert-manager.io/v1"), "{name} against {version}: {line}");
        }
    }
}

/// Documents by "Kind namespace/name".
fn objects(yaml: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (i, (_, doc)) in neutrino_injector::manifest::read_documents(yaml).unwrap().into_iter().enumerate() {
        let key = format!(
            "{} {}/{}",
            doc["kind"].as_str().unwrap_or("?"),
            doc["metadata"]["namespace"].as_str().unwrap_or(""),
            doc["metadata"]["name"].as_str().unwrap_or("?")
        );
        assert!(out.insert(key.clone(), doc).is_none(), "document {} repeats {key}", i + 1);
    }
    out
}

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl").arg("kustomize").arg(deploy().join(dir)).output();
    let out = out.unwrap_or_else(|e| panic!("kubectl (with kustomize) not found: {e}; install kubectl 1.27 or newer"));
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_default_install_validates() {
    let yaml = neutrino(&["install"]);
    validate("install", &yaml);
    let objects = objects(&yaml);
    for key in [
        "Namespace /neutrino-system",
        "Deployment neutrino-system/neutrino-control-plane",
        "PodDisruptionBudget neutrino-system/neutrino-control-plane",
        "ClusterRole /neutrino-control-plane",
        "CustomResourceDefinition /authorizationpolicies.policy.neutrino.io",
        "Secret neutrino-system/neutrino-injector-tls",
        "Secret neutrino-system/neutrino-ca",
        "ConfigMap neutrino-system/neutrino-trust-anchors",
        "MutatingWebhookConfiguration /neutrino-sidecar-injector",
    ] {
        assert!(objects.contains_key(key), "{key} missing: {:?}", objects.keys());
    }
    let hook = &objects["MutatingWebhookConfiguration /neutrino-sidecar-injector"]["webhooks"][0];
    assert!(hook["clientConfig"]["caBundle"].as_str().is_some_and(|b| b.len() > 100), "{hook}");
    assert_eq!((hook["failurePolicy"].as_str(), hook["timeoutSeconds"].as_u64()), (Some("Fail"), Some(10)));
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0]["values"],
        serde_json::json!(["kube-system", "neutrino-system"])
    );
}

#[test]
fn the_demo_and_cert_manager_installs_validate() {
    validate("install-demo", &neutrino(&["install", "--demo"]));
    validate("install-demo-cert-manager", &neutrino(&["install", "--demo", "--cert-manager", "--tag", "dev"]));
}

#[test]
fn kustomize_renders_the_same_objects_as_neutrino_install() {
    for (dir, args) in
        [("cert-manager", vec!["install", "--cert-manager"]), ("demo", vec!["install", "--cert-manager", "--demo"])]
    {
        let rendered = kustomize(dir);
        validate(&format!("kustomize-{dir}"), &rendered);
        let (kustomized, installed) = (objects(&rendered), objects(&neutrino(&args)));
        assert_eq!(kustomized.keys().collect::<Vec<_>>(), installed.keys().collect::<Vec<_>>(), "deploy/{dir}");
        for (key, object) in &kustomized {
            assert_eq!(object, &installed[key], "deploy/{dir}: {key} differs from `neutrino {}`", args.join(" "));
        }
    }
    // The base is the default install without the generated Secrets, trust anchors and caBundle.
    let base = objects(&kustomize("base"));
    let mut installed = objects(&neutrino(&["install"]));
    assert!(installed.remove("Secret neutrino-system/neutrino-injector-tls").is_some());
    assert!(installed.remove("Secret neutrino-system/neutrino-ca").is_some());
    assert!(installed.remove("ConfigMap neutrino-system/neutrino-trust-anchors").is_some());
    let hook = installed.get_mut("MutatingWebhookConfiguration /neutrino-sidecar-injector").unwrap();
    hook["webhooks"][0]["clientConfig"].as_object_mut().unwrap().remove("caBundle");
    assert_eq!(base, installed);
}

/// `--mesh-ca-dir`: the first run writes the mesh CA, the next renders the same one;
/// without it, a warning on stderr (stdout stays the manifests).
#[test]
fn mesh_ca_dir_keeps_the_mesh_ca_across_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let run = || objects(&neutrino(&["install", "--mesh-ca-dir", dir.to_str().unwrap()]));
    let (first, second) = (run(), run());
    for key in ["Secret neutrino-system/neutrino-ca", "ConfigMap neutrino-system/neutrino-trust-anchors"] {
        assert_eq!(first[key]["data"], second[key]["data"], "{key}");
    }
    assert!(dir.join("issuer-key.pem").is_file());
    let out = Command::new(env!("CARGO_BIN_EXE_neutrino")).arg("install").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("NEW mesh CA") && stderr.contains("--mesh-ca-dir"), "{stderr}");
    let both = Command::new(env!("CARGO_BIN_EXE_neutrino"))
        .args(["install", "--cert-manager", "--mesh-ca-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!both.status.success(), "--mesh-ca-dir conflicts with --cert-manager");
}

#[test]
fn the_injected_demo_app_validates_in_both_sidecar_modes() {
    let app = deploy().join("demo/sample-app.yaml");
    for mode in ["native", "legacy"] {
        let injected = neutrino(&["inject", "-f", app.to_str().unwrap(), "--sidecar-mode", mode]);
        validate(&format!("sample-app-{mode}"), &injected);
        let objects = objects(&injected);
        let spec = &objects["Deployment neutrino-demo/sample-app"]["spec"]["template"]["spec"];
        let names = |list: &str| -> Vec<String> {
            spec[list].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str().map(String::from)).collect()
        };
        let proxy_in = if mode == "native" { "initContainers" } else { "containers" };
        assert!(names(proxy_in).contains(&"neutrino-proxy".to_string()), "{mode}: {spec}");
        assert!(names("initContainers").contains(&"neutrino-init".to_string()), "{mode}: {spec}");
    }
}
