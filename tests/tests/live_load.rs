//! Load reported in band: two callers' proxies share one backend, and the backend's
//! own proxy (which sees both) tells each caller the pod's true load on every response
//! (`x-neutrino-load`). So a caller sees the other's load before any push: the control
//! plane here pushes live load only every ten minutes.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use neutrino_tests::backend::Backend;
use neutrino_tests::*;

const SPEC: &str = "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /delay/{ms}:\n    post:\n      operationId: heavy\n      x-neutrino-resources: {cpu: '3', memory: 1Gi}\n      responses: {'200': {description: ok}}\n  /items/{id}:\n    get:\n      operationId: light\n      x-neutrino-resources: {cpu: 100m}\n      responses: {'200': {description: ok}}\n";

/// curl through a caller's proxy: (status, response headers, body).
async fn call(proxy_port: u16, args: &[&str]) -> (u16, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-s", "-i", "--max-time", "20", "-x", &format!("http://127.0.0.1:{proxy_port}")])
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, head.to_ascii_lowercase(), body.to_string())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn each_caller_sees_the_others_load_through_the_backends_proxy() {
    let app = Backend::start("web-0").await;
    let sidecar_inbound = free_port();
    let mesh = WebMesh::new(SPEC, &[(sidecar_inbound, "web-0")]);
    // No pushes of live load during the test: only the header can tell B.
    let cp = ControlPlane::start(&mesh.path(), &["--capacity-interval-ms", "600000"]);
    // The backend's sidecar: inbound on the endpoint's port, forwarding to the app.
    let sidecar = Sidecar::start(&format!("127.0.0.1:{}", cp.grpc), "web-0", sidecar_inbound, app.port, &[]);
    let a = Proxy::start_with(cp.grpc, &["--queue-timeout-ms", "200"]);
    let b = Proxy::start_with(cp.grpc, &["--queue-timeout-ms", "200"]);
    a.wait_ready().await;
    b.wait_ready().await;
    sidecar.wait_ready().await;

    // Caller A puts 3 of the backend's 4 CPUs to work.
    let (a_out, b_out) = (a.outbound, b.outbound);
    let slow = tokio::spawn(async move { call(a_out, &["-X", "POST", "http://web.default/delay/2500"]).await });
    wait_for("A's request to reach the app", Duration::from_secs(5), || async {
        anyhow::ensure!(app.served() == 1, "not yet");
        Ok(())
    })
    .await;

    // B has sent nothing heavy; one light call teaches it the pod's load. The header is
    // the proxies' business: B's app does not see it, and the app saw no cost header.
    let (status, headers, body) = call(b_out, &["http://web.default/items/1"]).await;
    assert_eq!(status, 200);
    assert!(!headers.contains("x-neutrino-load"), "{headers}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(seen["headers"].get("x-neutrino-cost").is_none(), "{body}");

    // So B knows a heavy call would not fit now, before any push could tell it.
    let (status, headers, _) = call(b_out, &["-X", "POST", "http://web.default/delay/10"]).await;
    assert_eq!(status, 503, "{headers}");
    assert!(headers.contains("no capacity"), "{headers}");
    assert_eq!(app.served(), 2, "B's heavy call never reached the busy pod");

    // Once A's work is done and the report has expired, B's heavy call goes through.
    let (status, _, _) = slow.await.unwrap();
    assert_eq!(status, 200);
    wait_for("B's heavy call to fit again", Duration::from_secs(10), || async {
        let (status, _, _) = call(b_out, &["-X", "POST", "http://web.default/delay/10"]).await;
        anyhow::ensure!(status == 200, "{status}");
        Ok(())
    })
    .await;
    drop(sidecar);
}
