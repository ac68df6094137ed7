//! The proxy's own HTTP/1 upstream client (`forward/h1`), end to end: a real proxy
//! process in front of a raw TCP backend that writes exactly the bytes each test needs,
//! and a raw client that reads exactly what comes back.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use neutrino_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A backend that, per request head it reads, writes what `answer` returns for it
/// (`None`: close the connection without answering). Request heads are sent to the
/// test as they arrive; the count is of connections accepted.
struct RawBackend {
    port: u16,
    accepted: Arc<AtomicU32>,
    heads: mpsc::UnboundedReceiver<String>,
}

impl RawBackend {
    async fn start(answer: fn(u32, usize, &str) -> Option<Vec<u8>>) -> RawBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU32::new(0));
        let (tx, heads) = mpsc::unbounded_channel();
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let conn = count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for nth in 0.. {
                        let Some(head) = read_head(&mut s, &mut buf).await else { return };
                        let _ = tx.send(head.clone());
                        match answer(conn, nth, &head) {
                            Some(bytes) => s.write_all(&bytes).await.unwrap(),
                            None => return,
                        }
                    }
                });
            }
        });
        RawBackend { port, accepted, heads }
    }
}

/// Reads one head (bodiless requests only) from `s`, keeping what follows in `buf`.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one whole response to a GET from the proxy: its head (lower-cased) and body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(s, &mut buf)).await.unwrap().unwrap();
    let head = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) = head.lines().find_map(|l| l.strip_prefix("content-length: ")) {
        let len: usize = len.trim().parse().unwrap();
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the proxy closed mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        body = buf[..len].to_vec();
    } else if head.contains("transfer-encoding: chunked") {
        while !buf.ends_with(b"0\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the proxy closed mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let mut rest = &buf[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
    }
    (head, body)
}

struct Setup {
    backend: RawBackend,
    _mesh: MeshFile,
    _cp: ControlPlane,
    proxy: Proxy,
}

async fn setup(answer: fn(u32, usize, &str) -> Option<Vec<u8>>) -> Setup {
    let backend = RawBackend::start(answer).await;
    let mesh = MeshFile::new(&format!(
        "services:\n  - name: orders\n    namespace: shop\n    ports: [{{port: 80, protocol: http}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, capacity: {{cpu: 4, memory: 8Gi}}}}\n",
        backend.port
    ));
    let cp = ControlPlane::start(&mesh.path(), &[]);
    let proxy = Proxy::start(cp.grpc);
    proxy.wait_ready().await;
    Setup { backend, _mesh: mesh, _cp: cp, proxy }
}

async fn get(port: u16, path: &str, extra: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: orders.shop\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(&mut s).await
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop_and_chunks_are_reframed() {
    let mut s = setup(|_, _, _| {
        Some(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: secret\r\n\
              X-App: kept\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let (head, body) =
        get(s.proxy.outbound, "/a?b=1", "Connection: X-Req-Hop\r\nX-Req-Hop: 1\r\nProxy-Connection: x\r\n").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"hello world");
    assert!(head.contains("x-app: kept"), "{head}");
    for gone in ["x-hop", "keep-alive:", "connection: keep-alive, x-hop"] {
        assert!(!head.contains(gone), "{gone} passed the proxy: {head}");
    }
    let sent = s.backend.heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(sent.starts_with("get /a?b=1 http/1.1\r\n"), "{sent}");
    assert!(sent.contains("host: orders.shop\r\n"), "{sent}");
    for gone in ["x-req-hop", "proxy-connection"] {
        assert!(!sent.contains(gone), "{gone} reached the backend: {sent}");
    }
}

#[tokio::test]
async fn a_response_framed_two_ways_is_read_as_chunked_and_its_connection_not_reused() {
    let s = setup(|_, _, _| {
        Some(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nchunks\r\n0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    for _ in 0..2 {
        let (head, body) = get(s.proxy.outbound, "/", "").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"chunks", "Transfer-Encoding wins over Content-Length (RFC 9112 6.3)");
        assert!(!head.contains("content-length: 3"), "{head}");
    }
    assert_eq!(
        s.backend.accepted.load(Ordering::SeqCst),
        2,
        "a connection with smuggling-shaped framing is not reused"
    );
}

#[tokio::test]
async fn a_get_whose_pooled_connection_closes_under_it_is_sent_again_on_a_new_one() {
    // The first connection answers once, then takes the next request and closes.
    let s = setup(|conn, nth, _| {
        (conn > 0 || nth == 0).then(|| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
    })
    .await;
    for _ in 0..3 {
        let (head, body) = get(s.proxy.outbound, "/", "").await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"ok");
    }
    assert_eq!(s.backend.accepted.load(Ordering::SeqCst), 2);
    // Sent again by the pool, not retried on another endpoint by the forward step
    // (which would also open a second connection, and spend retry budget).
    let (_, text) = neutrino_tests::get(s.proxy.admin, "/metrics").await.unwrap();
    assert_eq!(metric(&text, "neutrino_proxy_retries_total", ""), Some(0.0), "{text}");
}

#[tokio::test]
async fn a_malformed_or_oversized_response_head_is_a_502_that_says_why() {
    let s = setup(|_, _, head| {
        Some(if head.starts_with("GET /garbage") {
            b"HTTP/1.1 2x0 Nope\r\n\r\n".to_vec()
        } else {
            format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024)).into_bytes()
        })
    })
    .await;
    let (head, _) = get(s.proxy.outbound, "/garbage", "").await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("x-neutrino-reason: upstream") && head.contains("malformed response head"), "{head}");
    let (head, _) = get(s.proxy.outbound, "/big", "").await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("kib"), "the reason names the limit: {head}");
}
