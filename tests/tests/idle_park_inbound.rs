//! Inbound keep-alive connections are parked too (`proxy/src/accept/park.rs`): with
//! `--park-idle-after-ms 200`, a plaintext HTTP/1 connection from a caller that is quiet
//! for a while leaves hyper and waits in the inbound listener's parking lot, is served
//! again on the same TCP connection when the caller sends, and is let go when the caller
//! closes. On SIGTERM a parked connection is still counted as open, and is closed at once
//! (as hyper closes an idle one) rather than holding the drain to its timeout.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use neutrino_tests::backend::Backend;
use neutrino_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SPEC: &str = "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /items/{id}:\n    get:\n      operationId: getItem\n      responses: {'200': {description: ok}}\n";

/// Sends `GET path` and reads the response (head and a Content-Length body).
async fn get_on(s: &mut TcpStream, path: &str) -> (String, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: web.default\r\n\r\n").as_bytes()).await.unwrap();
    read_response(s).await
}

/// A proxy whose inbound listener serves `app` (nothing redirects here).
async fn sidecar() -> (Backend, WebMesh, ControlPlane, Proxy) {
    let app = Backend::start("web-0").await;
    let mesh = WebMesh::new(SPEC, &[(app.port, "web-0")]);
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let app_addr = format!("127.0.0.1:{}", app.port);
    let args = ["--park-idle-after-ms", "200", "--inbound-app-addr", &app_addr, "--drain-timeout-secs", "20"];
    let proxy = Proxy::start_with(cp.grpc, &args);
    proxy.wait_ready().await;
    (app, mesh, cp, proxy)
}

#[tokio::test]
async fn a_quiet_inbound_connection_is_parked_and_served_again_on_the_same_socket() {
    let (app, _mesh, _cp, proxy) = sidecar().await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.inbound)).await.unwrap();
    let (head, body) = get_on(&mut s, "/items/1").await;
    assert!(head.starts_with("HTTP/1.1 200") && body.contains("\"path\":\"/items/1\""), "{head}{body}");
    wait_parked(proxy.admin, 1.0).await;

    let (head, body) = get_on(&mut s, "/items/2").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"path\":\"/items/2\""), "after parking: {body}");
    assert_eq!(app.served(), 2);
    wait_parked(proxy.admin, 1.0).await;

    // A parked connection the caller closes is let go.
    drop(s);
    wait_parked(proxy.admin, 0.0).await;
}

#[tokio::test]
async fn sigterm_closes_parked_inbound_connections_at_once() {
    let (_app, _mesh, _cp, mut proxy) = sidecar().await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.inbound)).await.unwrap();
    assert!(get_on(&mut s, "/items/1").await.0.starts_with("HTTP/1.1 200"));
    wait_parked(proxy.admin, 1.0).await;

    proxy.proc.terminate();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the parked connection is closed: {read:?}");
    // Well before the 20 s drain timeout: nothing open is left to wait for.
    let status = tokio::task::spawn_blocking(move || proxy.proc.wait_exit(Duration::from_secs(5))).await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "the proxy exits cleanly once drained: {status:?}");
}
