//! Idle keep-alive connections give back their HTTP buffers (`proxy/src/accept/idle.rs`):
//! with `--park-idle-after-ms 200`, a client connection quiet for a while is parked as a
//! bare socket (the `parked_connections` gauge says so) and served again, on the same
//! TCP connection, when the client sends: a plain request, a CONNECT tunnel (an upgrade
//! on a new hyper connection), a request head that arrives in two parts around an idle
//! period, and a response slower than the idle period, which must not be cut or closed.
//! Past `--client-idle-timeout-secs` a quiet connection is closed: parked or, for h2c
//! (never parked), after a graceful finish.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use neutrino_tests::backend::Backend;
use neutrino_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SPEC: &str = "openapi: 3.0.3\ninfo: {title: web, version: '1'}\npaths:\n  /items/{id}:\n    get:\n      operationId: getItem\n      responses: {'200': {description: ok}}\n";

/// The app, its mesh file, a control plane, and a proxy started with `args`.
async fn mesh_with(args: &[&str]) -> (Backend, WebMesh, ControlPlane, Proxy) {
    let app = Backend::start("web-0").await;
    let mesh = WebMesh::new(SPEC, &[(app.port, "web-0")]);
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start_with(cp.grpc, args);
    proxy.wait_ready().await;
    (app, mesh, cp, proxy)
}

async fn mesh() -> (Backend, WebMesh, ControlPlane, Proxy) {
    mesh_with(&["--park-idle-after-ms", "200"]).await
}

#[tokio::test]
async fn a_quiet_connection_is_parked_and_served_again_on_the_same_socket() {
    let (app, _mesh, _cp, proxy) = mesh().await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.outbound)).await.unwrap();
    s.write_all(b"GET http://web.default/items/1 HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"path\":\"/items/1\""), "{body}");
    wait_parked(proxy.admin, 1.0).await;

    s.write_all(b"GET http://web.default/items/2 HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"path\":\"/items/2\""), "after parking: {body}");
    wait_parked(proxy.admin, 1.0).await;

    // An upgrade on the connection hyper serves after parking: a CONNECT tunnel to the app.
    let connect = format!("CONNECT 127.0.0.1:{0} HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n", app.port);
    s.write_all(connect.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET /through/the/tunnel HTTP/1.1\r\nHost: app\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200") && body.contains("/through/the/tunnel"), "{head}{body}");
    wait_parked(proxy.admin, 0.0).await;

    // A parked connection the client closes is let go.
    let mut other = TcpStream::connect(("127.0.0.1", proxy.outbound)).await.unwrap();
    other.write_all(b"GET http://web.default/items/3 HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    assert!(read_response(&mut other).await.0.starts_with("HTTP/1.1 200"));
    wait_parked(proxy.admin, 1.0).await;
    drop(other);
    wait_parked(proxy.admin, 0.0).await;
}

#[tokio::test]
async fn a_request_head_split_around_idle_periods_is_not_lost() {
    let (_app, _mesh, _cp, proxy) = mesh().await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.outbound)).await.unwrap();
    s.write_all(b"GET http://web.default/items/1 HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    assert!(read_response(&mut s).await.0.starts_with("HTTP/1.1 200"));
    wait_parked(proxy.admin, 1.0).await;
    // The client itself pauses mid-head for three idle periods: the scenario, not a wait
    // for the proxy. The proxy takes the half head out of hyper and hands it to the next.
    s.write_all(b"GET http://web.default/items/7 HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.write_all(b"st: web.default\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"path\":\"/items/7\""), "{body}");
}

#[tokio::test]
async fn a_response_slower_than_the_idle_period_is_neither_cut_nor_closed() {
    let (_app, _mesh, _cp, proxy) = mesh().await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.outbound)).await.unwrap();
    // The app answers after 900 ms: four idle periods with no byte moving.
    s.write_all(b"GET http://web.default/delay/900 HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"), "keep-alive kept: {head}");
    assert!(body.contains("\"path\":\"/delay/900\""), "{body}");
    s.write_all(b"GET http://web.default/items/2 HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    assert!(read_response(&mut s).await.1.contains("/items/2"));
}

#[tokio::test]
async fn a_head_trickling_in_across_parkings_still_meets_the_header_timeout() {
    let (_app, _mesh, _cp, proxy) =
        mesh_with(&["--park-idle-after-ms", "100", "--header-read-timeout-ms", "1000"]).await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.outbound)).await.unwrap();
    s.write_all(b"GET http://web.default/items/1 HTTP/1.1\r\nX-Slow: ").await.unwrap();
    // A slowloris client: one byte every 300 ms, so the connection goes quiet (and is
    // taken apart) between bytes. Without a deadline across parkings it would never end.
    let started = std::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if s.write_all(b"x").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "the proxy kept a trickling request head open for {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3), "closed only after {:?}", started.elapsed());
}

/// A client that goes quiet and never comes back does not hold its connection (and a
/// descriptor) for ever: past `--client-idle-timeout-secs` the parked connection is closed.
#[tokio::test]
async fn a_connection_quiet_past_the_client_idle_timeout_is_closed() {
    let (_app, _mesh, _cp, proxy) =
        mesh_with(&["--park-idle-after-ms", "200", "--client-idle-timeout-secs", "1"]).await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.outbound)).await.unwrap();
    s.write_all(b"GET http://web.default/items/1 HTTP/1.1\r\nHost: web.default\r\n\r\n").await.unwrap();
    assert!(read_response(&mut s).await.0.starts_with("HTTP/1.1 200"));
    let answered = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "still open 10 s after the last response");
    assert!(rest.is_empty(), "closed without a word: {}", String::from_utf8_lossy(&rest));
    assert!(answered.elapsed() >= Duration::from_secs(1), "closed before the timeout: {:?}", answered.elapsed());
    wait_parked(proxy.admin, 0.0).await;
}

/// The same for connections that are never parked (h2c, outbound and inbound): quiet
/// past `--client-idle-timeout-secs`, the proxy finishes them (GOAWAY) and closes them.
#[tokio::test]
async fn an_h2c_connection_quiet_past_the_client_idle_timeout_is_closed() {
    let (_app, _mesh, _cp, proxy) = mesh_with(&["--client-idle-timeout-secs", "1"]).await;
    h2c_closed_when_quiet(proxy.outbound).await;
}

#[tokio::test]
async fn an_inbound_h2c_connection_quiet_past_the_client_idle_timeout_is_closed() {
    let app = Backend::start("web-0").await;
    let mesh = WebMesh::new(SPEC, &[(app.port, "web-0")]);
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let app_addr = format!("127.0.0.1:{}", app.port);
    let proxy = Proxy::start_with(cp.grpc, &["--client-idle-timeout-secs", "1", "--inbound-app-addr", &app_addr]);
    proxy.wait_ready().await;
    h2c_closed_when_quiet(proxy.inbound).await;
}

/// One request on an h2c connection to `port`, then the client keeps its end open
/// (`send` is held): only the proxy can end the connection, and must within 10 s.
async fn h2c_closed_when_quiet(port: u16) {
    use http_body_util::{BodyExt, Empty};
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get("http://web.default/items/1").body(Empty::<bytes::Bytes>::new()).unwrap();
    let resp = send.send_request(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    let answered = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "still open 10 s after the last response");
    assert!(answered.elapsed() >= Duration::from_secs(1), "closed before the timeout: {:?}", answered.elapsed());
    drop(send);
}
