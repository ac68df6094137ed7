//! Prometheus metrics, scraped and parsed with a real text-format parser: the counts by
//! direction, service, operation and status class match the traffic sent, on the
//! caller's proxy (outbound) and on the backend's sidecar (inbound), with latency
//! histograms, selection reasons, shed requests and per-endpoint load.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use neutrino_tests::backend::Backend;
use neutrino_tests::*;
use prometheus_parse::{Scrape, Value};

const SPEC: &str = "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /items/{id}:\n    get:\n      operationId: getItem\n      x-neutrino-resources: {cpu: 100m}\n      responses: {'200': {description: ok}}\n  /train:\n    post:\n      operationId: train\n      x-neutrino-resources: {cpu: 100m, nvidia.com/gpu: 1}\n      responses: {'200': {description: ok}}\n";

async fn scrape(admin: u16) -> Scrape {
    let (code, text) = get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text exposition")
}

/// The value of the one sample named `name` whose labels include all of `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found =
        s.samples.iter().filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)));
    let sample = found.next()?;
    assert!(found.next().is_none(), "more than one {name} sample with {labels:?}");
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(h) => h.last().map(|b| b.count),
        Value::Summary(_) => None,
    }
}

fn curl(proxy: u16, args: &[&str]) -> u16 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "-x",
            &format!("http://127.0.0.1:{proxy}"),
        ])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

#[tokio::test]
async fn counts_by_operation_and_status_match_the_traffic_sent() {
    let app = Backend::start("web-0").await;
    let sidecar_inbound = free_port();
    let mesh = WebMesh::new(SPEC, &[(sidecar_inbound, "web-0")]);
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let sidecar = Sidecar::start(&format!("127.0.0.1:{}", cp.grpc), "web-0", sidecar_inbound, app.port, &[]);
    let caller = Proxy::start(cp.grpc);
    caller.wait_ready().await;
    sidecar.wait_ready().await;

    let port = caller.outbound;
    let codes = tokio::task::spawn_blocking(move || {
        let mut codes = Vec::new();
        for i in 0..5 {
            codes.push(curl(port, &[&format!("http://web.default/items/{i}")]));
        }
        for _ in 0..2 {
            codes.push(curl(port, &["http://web.default/status/404"]));
        }
        // Needs a GPU no endpoint has: refused at once, never sent.
        codes.push(curl(port, &["-X", "POST", "http://web.default/train"]));
        codes
    })
    .await
    .unwrap();
    assert_eq!(codes, [200, 200, 200, 200, 200, 404, 404, 503]);
    assert_eq!(app.served(), 7);

    let out = scrape(caller.admin).await;
    let svc = ("service", "default/web");
    let outbound = ("direction", "outbound");
    let requests = "neutrino_proxy_requests_total";
    assert_eq!(value(&out, requests, &[outbound, svc, ("operation", "getItem"), ("status_class", "2xx")]), Some(5.0));
    assert_eq!(value(&out, requests, &[outbound, svc, ("operation", ""), ("status_class", "4xx")]), Some(2.0));
    assert_eq!(value(&out, requests, &[outbound, svc, ("operation", "train"), ("status_class", "5xx")]), Some(1.0));
    assert_eq!(value(&out, requests, &[outbound, svc, ("operation", "getItem"), ("status_class", "5xx")]), None);
    let histogram = "neutrino_proxy_request_duration_seconds";
    assert_eq!(value(&out, histogram, &[outbound, svc, ("operation", "getItem")]), Some(5.0));
    let chosen: f64 = out
        .samples
        .iter()
        .filter(|s| s.metric == "neutrino_proxy_selections_total")
        .map(|s| match s.value {
            // The parser types samples by their TYPE line's name, which lacks `_total`.
            Value::Counter(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(chosen, 7.0, "one selection per request sent");
    assert_eq!(value(&out, "neutrino_proxy_requests_shed_total", &[svc, ("operation", "train")]), Some(1.0));
    let ep = ("pod", "web-0");
    assert_eq!(value(&out, "neutrino_proxy_endpoint_capacity", &[svc, ep, ("resource", "cpu_millis")]), Some(4000.0));
    assert_eq!(value(&out, "neutrino_proxy_endpoint_requests_in_flight", &[svc, ep]), Some(0.0));
    assert!(value(&out, "neutrino_proxy_endpoint_utilization", &[svc, ep]).is_some());

    // The backend's sidecar counted the same requests inbound, by the same operations.
    let inbound = scrape(sidecar.admin).await;
    let dir = ("direction", "inbound");
    assert_eq!(value(&inbound, requests, &[dir, svc, ("operation", "getItem"), ("status_class", "2xx")]), Some(5.0));
    assert_eq!(value(&inbound, requests, &[dir, svc, ("operation", ""), ("status_class", "4xx")]), Some(2.0));
    assert_eq!(value(&inbound, requests, &[dir, svc, ("operation", "train")]), None, "never sent");

    // Every metric the Grafana dashboard in deploy/ queries exists: exported now by a
    // proxy or the control plane, or (labelled families with no sample yet, e.g. NACKs)
    // registered under that name in their metrics modules.
    let mut declared = String::new();
    for admin in [caller.admin, sidecar.admin, cp.admin] {
        declared.push_str(&get(admin, "/metrics").await.unwrap().1);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let cp_source = read("control-plane/src/metrics.rs");
    let proxy_source = read("proxy/src/metrics.rs") + &read("proxy/src/telemetry/route_metrics.rs");
    let path = root.join("deploy/grafana/neutrino-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_string()))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        for word in
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("neutrino_"))
        {
            let family = word.trim_end_matches("_bucket").trim_end_matches("_total");
            let (source, short) = match family.strip_prefix("neutrino_cp_") {
                Some(short) => (&cp_source, short),
                None => (&proxy_source, family.trim_start_matches("neutrino_proxy_")),
            };
            assert!(
                declared.contains(&format!("# TYPE {family} ")) || source.contains(&format!("\"{short}\"")),
                "the dashboard queries {word}, which nothing exports"
            );
        }
    }
}

/// The getItem row of a `stat` or `top` output shows a rate and full success, and the
/// endpoint table lists the pod.
fn assert_live_row(out: &str) {
    let row = out
        .lines()
        .find(|l| l.starts_with("default/web") && l.contains("getItem"))
        .unwrap_or_else(|| panic!("no getItem row in:\n{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols[2].parse::<f64>().unwrap() > 0.0, "{row}");
    assert_eq!(cols[3], "100.0%", "{row}");
    assert!(out.contains("web-0"), "the endpoint table lists the pod:\n{out}");
}

/// Calls `getItem` through the proxy on `port` until told to stop; returns how many it sent.
fn traffic(port: u16) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    let sender = std::thread::spawn(move || {
        let mut sent = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            assert_eq!(curl(port, &["http://web.default/items/1"]), 200);
            sent += 1;
        }
        sent
    });
    (stop, sender)
}

/// `neutrino stat` and `neutrino top` against live proxies: the row of the operation
/// being called shows a rate and a success rate computed from the proxies' metrics.
#[tokio::test]
async fn stat_and_top_show_the_live_traffic() {
    let app = Backend::start("web-0").await;
    let mesh = WebMesh::new(SPEC, &[(app.port, "web-0")]);
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let caller = Proxy::start(cp.grpc);
    caller.wait_ready().await;
    let (stop, traffic) = traffic(caller.outbound);
    let admin = format!("127.0.0.1:{}", caller.admin);
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = Command::new(bin("neutrino")).args(&args).output().unwrap();
            assert!(out.status.success(), "neutrino {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).to_string()
        })
    };
    let stat =
        run(vec!["stat".into(), "--proxy".into(), admin.clone(), "--window-secs".into(), "1".into()]).await.unwrap();
    let top = run(vec![
        "top".into(),
        "--proxy".into(),
        admin,
        "--interval-ms".into(),
        "500".into(),
        "--iterations".into(),
        "1".into(),
    ])
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Joined off the runtime: the app answering the last request runs on it.
    let sent = tokio::task::spawn_blocking(move || traffic.join().unwrap()).await.unwrap();
    assert!(sent > 0);
    for out in [&stat, &top] {
        assert_live_row(out);
    }
}

fn meshed_pod(ns: &str, name: &str, with_proxy: bool) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "annotations": {"neutrino.io/injected": "0.1.0"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    });
    if with_proxy {
        pod["spec"]["initContainers"] = serde_json::json!([{"name": "neutrino-proxy", "image": "neutrino/proxy:0.1.0",
            "restartPolicy": "Always", "ports": [{"name": "neutrino-admin", "containerPort": 15020}]}]);
    } else {
        pod["metadata"]["annotations"] = serde_json::json!({});
    }
    pod
}

/// `neutrino stat -n NS` and `neutrino top -A` against a cluster: the meshed pods are
/// listed and read through the API server's pod proxy (a local server speaking the
/// Kubernetes API with real Pod JSON, forwarding to a live proxy's admin port); pods
/// without the proxy and of other namespaces are not read, and a pod that does not
/// answer is skipped with a warning instead of failing the view.
#[tokio::test]
async fn stat_and_top_read_a_clusters_meshed_pods_through_the_api_server() {
    let app = Backend::start("web-0").await;
    let mesh = WebMesh::new(SPEC, &[(app.port, "web-0")]);
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let caller = Proxy::start(cp.grpc);
    caller.wait_ready().await;
    let api = kube_api::FakeApi::default();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", caller.admin).parse().unwrap();
    api.apply("pods", meshed_pod("default", "caller-0", true));
    api.proxy_pod("default", "caller-0", 15020, admin);
    api.apply("pods", meshed_pod("default", "gone-0", true));
    api.apply("pods", meshed_pod("default", "plain-0", false));
    api.apply("pods", meshed_pod("other", "caller-1", true));
    api.proxy_pod("other", "caller-1", 15020, admin);
    let api_port = api.clone().serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube_api::kubeconfig(dir.path(), api_port);

    let (stop, traffic) = traffic(caller.outbound);
    let run = |args: Vec<&'static str>| {
        let kubeconfig = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(bin("neutrino"))
                .args(&args)
                .env("KUBECONFIG", &kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .output()
                .unwrap();
            assert!(out.status.success(), "neutrino {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
        })
    };
    let (stat, stat_err) = run(vec!["stat", "-n", "default", "--window-secs", "1"]).await.unwrap();
    let calls_in_default = api.pod_proxy_calls();
    let (top, _) = run(vec!["top", "-A", "--interval-ms", "500", "--iterations", "1"]).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = tokio::task::spawn_blocking(move || traffic.join().unwrap()).await.unwrap();
    assert!(sent > 0);

    for out in [&stat, &top] {
        assert_live_row(out);
    }
    assert!(stat_err.contains("skipped default/gone-0"), "the silent pod is reported:\n{stat_err}");
    let count = |calls: &[String], pod: &str| calls.iter().filter(|c| c.contains(pod)).count();
    let metrics = "/api/v1/namespaces/default/pods/caller-0:15020/proxy/metrics";
    assert_eq!(count(&calls_in_default, metrics), 2, "two scrapes of the meshed pod: {calls_in_default:?}");
    assert_eq!(count(&calls_in_default, "plain-0"), 0, "a pod without the proxy is not read");
    assert_eq!(count(&calls_in_default, "caller-1"), 0, "-n default reads no other namespace");
    let all = api.pod_proxy_calls();
    assert_eq!(
        count(&all, "/api/v1/namespaces/other/pods/caller-1:15020/proxy/metrics"),
        2,
        "-A reads every namespace"
    );
}
