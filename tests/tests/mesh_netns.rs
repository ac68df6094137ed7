//! The mesh as pods see it: two network namespaces, each with its proxy running as
//! the proxy uid behind real iptables rules installed by `neutrino-proxy init`. An
//! unmodified client in pod A calls service B by its virtual IP; the request passes
//! A's outbound proxy and B's inbound proxy. Real clients: curl (HTTP/1.1 and h2c),
//! grpcio (unary and server streaming), a WebSocket client and a raw TCP client.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use neutrino_tests::netns::{IP_B, IP6_B, PodProc, Pods, curl_in, poll_until};
use neutrino_tests::{bin, metric};

const VIP: &str = "10.96.0.10";
const VIP6: &str = "fd96::10";

struct Mesh {
    pods: Pods,
    _procs: Vec<PodProc>,
    _dir: tempfile::TempDir,
}

fn proxy_metric(ns: &str, name: &str) -> f64 {
    let text = curl_in(ns, &["http://127.0.0.1:15020/metrics"]).unwrap_or_default();
    metric(&text, name, "").unwrap_or(0.0)
}

/// Pod B runs the control plane, the sample app (HTTP/1.1 + h2c + WebSocket on 8080,
/// TCP echo on 9000), a gRPC server on 50051 and a non-mesh server on 7777.
fn mesh() -> Option<Mesh> {
    if let Some(why) = neutrino_tests::netns::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mesh_file = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "services:\n  - name: echo\n    virtualIP: {VIP}\n    ports:\n      - {{port: 80, targetPort: 8080}}\n      - {{port: 9000, protocol: tcp}}\n      - {{port: 50051, protocol: grpc}}\n    endpoints:\n      - {{address: {IP_B}, name: echo-b, capacity: {{cpu: 2, memory: 2Gi}}}}\n  - name: echo6\n    virtualIP: {VIP6}\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints:\n      - {{address: \"{IP6_B}\", name: echo-b, capacity: {{cpu: 2, memory: 2Gi}}}}\n"
        ),
    )
    .unwrap();
    let pods = Pods::create();
    let proxy = bin("neutrino-proxy");
    for ns in [&pods.a, &pods.b] {
        let out = Pods::exec(ns, &proxy, &["init"]).output().unwrap();
        assert!(out.status.success(), "init in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut procs = Vec::new();
    let grpc_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grpc_echo.py");
    procs.push(PodProc::spawn(
        "control-plane",
        Pods::exec(&pods.b, &bin("neutrino-control-plane"), &["--mesh-file", mesh_file.to_str().unwrap()]),
        dir.path(),
    ));
    procs.push(PodProc::spawn(
        "app-b",
        Pods::exec(
            &pods.b,
            &bin("neutrino-sample-app"),
            &["serve", "--http", "[::]:8080", "--tcp", "0.0.0.0:9000", "--name", "echo-b"],
        ),
        dir.path(),
    ));
    procs.push(PodProc::spawn(
        "grpc-b",
        Pods::exec(&pods.b, Path::new("python3"), &[grpc_script.to_str().unwrap(), "serve", "0.0.0.0:50051"]),
        dir.path(),
    ));
    procs.push(PodProc::spawn(
        "outside-b",
        Pods::exec(&pods.b, &bin("neutrino-sample-app"), &["serve", "--http", "0.0.0.0:7777", "--name", "not-in-mesh"]),
        dir.path(),
    ));
    for (ns, cp) in [(&pods.a, format!("{IP_B}:15010")), (&pods.b, "127.0.0.1:15010".to_string())] {
        procs.push(PodProc::spawn(
            &format!("proxy-{ns}"),
            Pods::exec_as_proxy(ns, &proxy, &["--control-plane", &cp, "--admin-addr", "0.0.0.0:15020", "--pod", ns]),
            dir.path(),
        ));
    }
    for ns in [&pods.a, &pods.b] {
        poll_until(&format!("the proxy in {ns} to be ready"), Duration::from_secs(20), || {
            curl_in(ns, &["-f", "http://127.0.0.1:15020/ready"]).map(|_| ())
        });
    }
    poll_until("the app in pod B", Duration::from_secs(20), || {
        curl_in(&pods.b, &["-f", "http://127.0.0.1:8080/"]).map(|_| ())
    });
    Some(Mesh { pods, _procs: procs, _dir: dir })
}

#[test]
fn http1_h2c_websocket_and_tcp_cross_both_proxies() {
    let Some(m) = mesh() else { return };
    let (a, b) = (&m.pods.a, &m.pods.b);
    let before_out = proxy_metric(a, "neutrino_proxy_outbound_http_requests_total");
    let before_in = proxy_metric(b, "neutrino_proxy_inbound_connections_total");

    let h1 = curl_in(a, &[&format!("http://{VIP}/hello")]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&h1).unwrap();
    assert_eq!((v["backend"].as_str(), v["version"].as_str()), (Some("echo-b"), Some("HTTP/1.1")), "{h1}");

    let h2 = curl_in(a, &["--http2-prior-knowledge", &format!("http://{VIP}/h2")]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&h2).unwrap();
    assert_eq!((v["backend"].as_str(), v["version"].as_str()), (Some("echo-b"), Some("HTTP/2.0")), "{h2}");

    // Both went through A's outbound proxy as HTTP and arrived at B's inbound proxy.
    assert_eq!(proxy_metric(a, "neutrino_proxy_outbound_http_requests_total") - before_out, 2.0);
    assert!(proxy_metric(b, "neutrino_proxy_inbound_connections_total") - before_in >= 2.0);

    let app = bin("neutrino-sample-app");
    let ws = Pods::output(a, app.to_str().unwrap(), &["ws-client", &format!("ws://{VIP}/ws"), "hello over websocket"]);
    assert_eq!(ws.trim(), "hello over websocket");

    let tcp_before = proxy_metric(a, "neutrino_proxy_outbound_tcp_connections_total");
    let tcp =
        Pods::output(a, app.to_str().unwrap(), &["tcp-client", &format!("{VIP}:9000"), "raw bytes, then half-close"]);
    assert_eq!(tcp.trim(), "raw bytes, then half-close");
    assert_eq!(proxy_metric(a, "neutrino_proxy_outbound_tcp_connections_total") - tcp_before, 1.0);
}

#[test]
fn grpc_unary_and_server_streaming_cross_both_proxies() {
    let Some(m) = mesh() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grpc_echo.py");
    let script = script.to_str().unwrap();
    let unary = Pods::output(&m.pods.a, "python3", &[script, "unary", &format!("{VIP}:50051"), "ping"]);
    assert_eq!(unary.trim(), "unary:ping");
    let stream = Pods::output(&m.pods.a, "python3", &[script, "stream", &format!("{VIP}:50051"), "tick", "3"]);
    assert_eq!(stream.lines().collect::<Vec<_>>(), ["tick:0", "tick:1", "tick:2"]);
    assert!(proxy_metric(&m.pods.a, "neutrino_proxy_outbound_http_requests_total") >= 2.0);
}

#[test]
fn destinations_and_ports_outside_the_mesh_pass_through() {
    let Some(m) = mesh() else { return };
    let before = proxy_metric(&m.pods.a, "neutrino_proxy_passthrough_connections_total");
    // Pod B's address directly, on a port no service claims: not a mesh destination
    // for A's proxy, and B's inbound proxy forwards it to the app as is.
    let out = curl_in(&m.pods.a, &[&format!("http://{IP_B}:7777/direct")]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backend"], "not-in-mesh");
    assert_eq!(proxy_metric(&m.pods.a, "neutrino_proxy_passthrough_connections_total") - before, 1.0);
}

#[test]
fn ipv6_destinations_are_intercepted_and_read_with_ip6t_so_original_dst() {
    let Some(m) = mesh() else { return };
    let before = proxy_metric(&m.pods.a, "neutrino_proxy_outbound_http_requests_total");
    let out = curl_in(&m.pods.a, &["-g", &format!("http://[{VIP6}]/v6")]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backend"], "echo-b", "{out}");
    assert_eq!(proxy_metric(&m.pods.a, "neutrino_proxy_outbound_http_requests_total") - before, 1.0);
}
