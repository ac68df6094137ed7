//! The data path over HTTP, end to end with real processes and a real client (curl):
//! a control plane, a proxy used as an explicit HTTP proxy (`curl -x`), and real
//! backends. Interception by iptables is tested in network namespaces elsewhere.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use neutrino_tests::backend::Backend;
use neutrino_tests::*;
use serde_json::Value;

const SPEC: &str = r#"
openapi: 3.0.3
info: {title: orders, version: "1"}
paths:
  /orders/{id}:
    get:
      operationId: getOrder
      responses: {"200": {description: ok}}
  /orders/{id}/render:
    post:
      operationId: renderOrder
      x-neutrino-resources: {cpu: "3", memory: 6Gi}
      responses: {"200": {description: ok}}
  /delay/{ms}:
    post:
      operationId: slowHeavy
      x-neutrino-resources: {cpu: "3", memory: 6Gi}
      responses: {"200": {description: ok}}
  /train:
    post:
      operationId: train
      x-neutrino-resources: {cpu: "1", gpu: 2}
      responses: {"200": {description: ok}}
"#;

struct Mesh {
    backends: Vec<Backend>,
    _spec: tempfile::TempDir,
    _mesh: MeshFile,
    cp: ControlPlane,
    proxy: Proxy,
}

/// Three backends: small (1 cpu), medium (2 cpu), large (4 cpu, 8Gi, 1 GPU).
async fn mesh() -> Mesh {
    let backends = vec![Backend::start("small").await, Backend::start("medium").await, Backend::start("large").await];
    let spec = tempfile::tempdir().unwrap();
    std::fs::write(spec.path().join("orders.yaml"), SPEC).unwrap();
    let caps = ["{cpu: 1, memory: 2Gi}", "{cpu: 2, memory: 4Gi}", "{cpu: 4, memory: 8Gi, gpu: 1}"];
    let mut yaml = format!(
        "services:\n  - name: orders\n    namespace: shop\n    virtualIP: 10.96.0.10\n    ports: [{{port: 80, protocol: http}}]\n    openapi: {}\n    endpoints:\n",
        spec.path().join("orders.yaml").display()
    );
    for (b, cap) in backends.iter().zip(caps) {
        yaml.push_str(&format!(
            "      - {{address: 127.0.0.1, port: {}, name: {}, capacity: {cap}}}\n",
            b.port, b.name
        ));
    }
    let mesh = MeshFile::new(&yaml);
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start_with(cp.grpc, &["--queue-timeout-ms", "200", "--namespace", "shop"]);
    proxy.wait_ready().await;
    Mesh { backends, _spec: spec, _mesh: mesh, cp, proxy }
}

/// Runs curl through the proxy (off the test's runtime); returns (status, body) per URL.
async fn curl(proxy_port: u16, args: &[&str]) -> Vec<(u16, String)> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || curl_blocking(proxy_port, &args)).await.unwrap()
}

fn curl_blocking(proxy_port: u16, args: &[String]) -> Vec<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "20", "-x", &format!("http://127.0.0.1:{proxy_port}")])
        .args(["-w", "|~|%{http_code}|~|"])
        .args(args)
        .output()
        .expect("curl runs (the test script installs it)");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let parts: Vec<&str> = text.split("|~|").collect();
    parts.chunks(2).filter(|c| c.len() == 2).map(|c| (c[1].parse().unwrap_or(0), c[0].to_string())).collect()
}

fn backend_of(body: &str) -> String {
    serde_json::from_str::<Value>(body).map(|v| v["backend"].as_str().unwrap_or("").to_string()).unwrap_or_default()
}

#[tokio::test]
async fn requests_reach_the_mesh_and_heavy_work_goes_where_it_fits() {
    let m = mesh().await;
    let out = m.proxy.outbound;
    // Light requests, over one kept-alive connection, spread over all three.
    let urls: Vec<String> = (0..60).map(|i| format!("http://orders.shop/orders/{i}")).collect();
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let results = curl(out, &url_refs).await;
    assert_eq!(results.len(), 60);
    assert!(results.iter().all(|(code, _)| *code == 200), "{results:?}");
    let first: Value = serde_json::from_str(&results[0].1).unwrap();
    assert_eq!(first["host"], "orders.shop");
    assert_eq!(first["path"], "/orders/0");
    assert!(m.backends.iter().all(|b| b.served() > 0), "light work reaches every backend");

    // Heavy requests fit only the large backend.
    let heavy: Vec<String> = (0..30).map(|i| format!("http://orders.shop/orders/{i}/render")).collect();
    let mut args: Vec<&str> = vec!["-X", "POST"];
    args.extend(heavy.iter().map(String::as_str));
    let results = curl(out, &args).await;
    assert!(results.iter().all(|(code, body)| *code == 200 && backend_of(body) == "large"), "{results:?}");

    // A bare name resolves in the proxy's namespace; the Host port picks the service port.
    let r = curl(out, &["http://orders:80/orders/7"]).await;
    assert_eq!(r[0].0, 200);
}

#[tokio::test]
async fn nothing_fits_means_a_503_with_retry_after_and_the_reason() {
    let m = mesh().await;
    let out = m.proxy.outbound;
    let r = tokio::task::spawn_blocking(move || {
        let o = Command::new("curl")
            .args(["-s", "-i", "-x", &format!("http://127.0.0.1:{out}"), "-X", "POST", "http://orders.shop/train"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    })
    .await
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    let lower = r.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{r}");
    assert!(lower.contains("x-neutrino-reason: none of the 3 endpoints of shop/orders has the resources"), "{r}");
    assert!(m.backends.iter().all(|b| b.served() == 0));
}

#[tokio::test]
async fn in_flight_cost_holds_an_endpoint_until_the_response_ends() {
    let m = mesh().await;
    let out = m.proxy.outbound;
    // A slow heavy request takes 3 of the large backend's 4 CPUs for 1.5 s...
    let slow = tokio::spawn(async move { curl(out, &["-X", "POST", "http://orders.shop/delay/1500"]).await });
    wait_for("the slow request to reach the backend", Duration::from_secs(5), || async {
        anyhow::ensure!(m.backends[2].served() == 1, "not yet");
        Ok(())
    })
    .await;
    // ...so a second heavy request cannot fit anywhere and is refused after queueing.
    let second = curl(out, &["-X", "POST", "http://orders.shop/orders/1/render"]).await;
    assert_eq!(second[0].0, 503, "{second:?}");
    assert!(second[0].1.contains("no capacity"), "{second:?}");
    let first = slow.await.unwrap();
    assert_eq!(first[0].0, 200);
    // Its cost was released with its response: heavy work fits again.
    let third = curl(out, &["-X", "POST", "http://orders.shop/orders/1/render"]).await;
    assert_eq!((third[0].0, backend_of(&third[0].1)), (200, "large".to_string()));
}

#[tokio::test]
async fn bodies_stream_through_chunked_and_sized() {
    let m = mesh().await;
    let out = m.proxy.outbound;
    let data = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(data.path(), vec![b'x'; 3 << 20]).unwrap();
    let path = data.path().display().to_string();
    let at_path = format!("@{path}");
    let sized = curl(out, &["--data-binary", &at_path, "http://orders.shop/upload"]).await;
    let chunked =
        curl(out, &["-H", "Transfer-Encoding: chunked", "--data-binary", &at_path, "http://orders.shop/upload"]).await;
    let r = (sized, chunked);
    for (code, body) in [&r.0[0], &r.1[0]] {
        assert_eq!(*code, 200);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["body_len"], 3 << 20, "{body}");
    }
}

#[tokio::test]
async fn destinations_outside_the_mesh_pass_through_unchanged() {
    let m = mesh().await;
    let outside = Backend::start("outside").await;
    let out = m.proxy.outbound;
    let port = outside.port;
    let r = curl(out, &[&format!("http://127.0.0.1:{port}/anything?x=1")]).await;
    assert_eq!((r[0].0, backend_of(&r[0].1)), (200, "outside".to_string()));
    assert!(m.backends.iter().all(|b| b.served() == 0));
}

#[tokio::test]
async fn connect_tunnels_reach_a_mesh_endpoint_or_an_outside_host() {
    let m = mesh().await;
    let outside = Backend::start("outside").await;
    let out = m.proxy.outbound;
    // curl -p: CONNECT orders.shop:80 first, then plain HTTP through the tunnel.
    let r = curl(out, &["-p", "http://orders.shop/orders/1"]).await;
    assert_eq!(r[0].0, 200, "{r:?}");
    assert!(m.backends.iter().any(|b| backend_of(&r[0].1) == b.name), "{r:?}");
    let r = curl(out, &["-p", &format!("http://127.0.0.1:{}/x", outside.port)]).await;
    assert_eq!((r[0].0, backend_of(&r[0].1)), (200, "outside".to_string()));
}

#[tokio::test]
async fn a_request_that_does_not_fit_yet_waits_for_room_and_then_runs() {
    let m = mesh().await;
    // A proxy that may queue for up to 5 s.
    let patient = Proxy::start_with(m.cp.grpc, &["--queue-timeout-ms", "5000", "--namespace", "shop"]);
    patient.wait_ready().await;
    let out = patient.outbound;
    let first = tokio::spawn(async move { curl(out, &["-X", "POST", "http://orders.shop/delay/800"]).await });
    wait_for("the first heavy request to reach the large backend", Duration::from_secs(5), || async {
        anyhow::ensure!(m.backends[2].served() == 1, "not yet");
        Ok(())
    })
    .await;
    // Does not fit while the first runs; it queues instead of failing. The backend
    // answers it at once, so its whole time is the wait for the first to finish.
    let started = std::time::Instant::now();
    let second = curl(out, &["-X", "POST", "http://orders.shop/orders/2/render"]).await;
    let waited = started.elapsed();
    let first = first.await.unwrap();
    assert_eq!(first[0].0, 200);
    assert_eq!((second[0].0, backend_of(&second[0].1)), (200, "large".to_string()), "{second:?}");
    assert!(waited >= Duration::from_millis(300), "it waited for room ({waited:?})");
}
