//! The pool against real HTTP/1 and HTTP/2 servers on loopback: reuse, what is not
//! reused, closes noticed, the cap and the reaper, deadlines, HTTP/2 sharing.

use super::*;
use std::sync::atomic::AtomicU32;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Empty};
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
enum Serve {
    /// HTTP/1; with `close_after_one`, each connection serves one request and closes.
    Http1 { close_after_one: bool },
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// A server on loopback running `script` on each connection it accepts (with its
/// index), counting them.
pub(crate) async fn server<F, Fut>(script: F) -> (SocketAddr, Arc<AtomicU32>)
where
    F: Fn(u32, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicU32::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(script(count.fetch_add(1, Ordering::SeqCst), s));
        }
    });
    (addr, accepted)
}

/// A real hyper server on loopback answering "ok", counting the connections it accepted.
async fn backend(serve: Serve) -> (SocketAddr, Arc<AtomicU32>) {
    server(move |_, s| async move {
        let svc = service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from("ok"))))
        });
        let io = TokioIo::new(s);
        let _ = match serve {
            Serve::Http1 { close_after_one } => {
                server::Builder::new().keep_alive(!close_after_one).serve_connection(io, svc).await
            }
            Serve::Http2 => {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await
            }
        };
    })
    .await
}

pub(crate) fn connector() -> MeshConnector {
    MeshConnector {
        tls: None,
        mesh: Arc::default(),
        alpn: crate::identity::Alpn::Http1,
        connect_timeout: Duration::from_secs(2),
        metrics: Arc::default(),
    }
}

fn get() -> Request<UpstreamBody> {
    Request::builder().uri("/x").header("host", "svc").body(Either::Right(Empty::<Bytes>::new())).expect("req")
}

fn in_a_second() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(1)
}

async fn exchange(
    settings: &PoolSettings,
    conns: &Arc<EndpointConns>,
    addr: SocketAddr,
    read_whole: bool,
) -> Option<Response<UpBody>> {
    let (parts, body) = get().into_parts();
    let resp = send(&connector(), settings, conns, addr, false, in_a_second(), &parts, None, body).await.expect("sent");
    assert_eq!(resp.status(), 200);
    if !read_whole {
        return Some(resp);
    }
    read(resp).await;
    None
}

/// Reads a response body to its end, as the client side would: its connection goes
/// back to the pool then.
async fn read(resp: Response<UpBody>) {
    assert_eq!(resp.into_body().collect().await.expect("body").to_bytes(), "ok");
}

fn settings(max_idle: usize) -> PoolSettings {
    PoolSettings { idle_timeout: Duration::from_secs(60), max_idle_per_endpoint: max_idle }
}

#[tokio::test]
async fn a_connection_given_back_serves_the_next_request() {
    let (addr, accepted) = backend(Serve::Http1 { close_after_one: false }).await;
    let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
    for _ in 0..3 {
        exchange(&s, &conns, addr, true).await;
        assert_eq!(conns.idle(), 1);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "three requests, one connection");
}

#[tokio::test]
async fn a_connection_not_given_back_is_not_reused() {
    let (addr, accepted) = backend(Serve::Http1 { close_after_one: false }).await;
    let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
    drop(exchange(&s, &conns, addr, false).await);
    exchange(&s, &conns, addr, true).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the body never read: its connection is not pooled");
}

#[tokio::test]
async fn a_connection_the_server_closed_is_skipped_and_the_request_still_goes() {
    let (addr, accepted) = backend(Serve::Http1 { close_after_one: true }).await;
    let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
    for _ in 0..3 {
        exchange(&s, &conns, addr, true).await;
        assert_eq!(conns.idle(), 0, "the server said Connection: close");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "each request on a new connection; none failed");
}

#[tokio::test]
async fn no_response_head_by_the_deadline_is_a_timeout() {
    // Accepts, reads, never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    let (parts, body) = get().into_parts();
    let r = send(&connector(), &s, &conns, addr, false, deadline, &parts, None, body).await;
    assert!(matches!(r, Err(SendError::Timeout)), "{r:?}");
    assert!(tokio::time::Instant::now() >= deadline);
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_reaped_before_its_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers one request with keep-alive, then closes once told to.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (close, closing) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut buf = vec![0; 4096];
        let mut got = 0;
        while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
            got += s.read(&mut buf[got..]).await.expect("read");
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.expect("write");
        let _ = closing.await;
    });
    let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
    exchange(&s, &conns, addr, true).await;
    conns.reap(Duration::from_secs(60));
    assert_eq!(conns.idle(), 1, "open and fresh: kept");
    let _ = close.send(());
    server.await.expect("server closed its socket");
    // No task watches an idle connection: the reaper's own poll must notice the
    // close. Its FIN reaches tokio's IO driver when the runtime next parks, hence
    // the short sleeps (bounded: 2 s).
    for _ in 0..200 {
        conns.reap(Duration::from_secs(60));
        if conns.idle() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a connection the server closed is still pooled");
}

#[tokio::test]
async fn http2_requests_share_one_connection_and_a_closed_one_is_replaced() {
    let (addr, accepted) = backend(Serve::Http2).await;
    let conns = EndpointConns::default();
    let h2_get = || {
        let uri = format!("http://{addr}/x");
        Request::builder().uri(uri).body(Either::Right(Empty::<Bytes>::new())).expect("req")
    };
    let c = connector();
    let calls = (0..20).map(|_| send_h2(&c, &conns, addr, false, h2_get()));
    // The first makes the connection; the rest, sent after it, share it.
    let first = send_h2(&c, &conns, addr, false, h2_get()).await.expect("first");
    assert_eq!(first.into_body().collect().await.expect("body").to_bytes(), "ok");
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.expect("sent").status(), 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "21 requests, one HTTP/2 connection");
    // The connection goes away (as when the server restarts): the next request makes another.
    conns.h2_plain.store(None);
    send_h2(&c, &conns, addr, false, h2_get()).await.expect("after");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_pool_keeps_at_most_max_idle_and_reaps_the_stale() {
    let (addr, accepted) = backend(Serve::Http1 { close_after_one: false }).await;
    let (s, conns) = (settings(2), Arc::new(EndpointConns::default()));
    // Three in flight at once: three connections, of which two are kept.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(exchange(&s, &conns, addr, false).await.expect("in flight"));
    }
    for r in held {
        read(r).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert_eq!(conns.idle(), 2);
    conns.reap(Duration::from_secs(60));
    assert_eq!(conns.idle(), 2, "fresh connections stay");
    conns.reap(Duration::ZERO);
    assert_eq!(conns.idle(), 0, "stale ones are closed");
}
