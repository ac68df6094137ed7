//! Exchanges against raw TCP servers on loopback that write exactly the bytes a test
//! needs: chunked responses with trailers, bodies until close, answers before the
//! request body was read, bytes nobody asked for, and the keep-alive race.

use super::*;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Either, Empty, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::forward::pool::tests::server;
use crate::forward::pool::{self, EndpointConns, PoolSettings};

/// Keeps what is given back, to look at. (Boxed as the pool keeps them.)
#[derive(Debug, Default)]
#[allow(clippy::vec_box)]
struct Kept(Mutex<Vec<Box<Conn>>>);

impl GiveBack for Kept {
    fn give_back(&self, conn: Box<Conn>) {
        self.0.lock().expect("lock").push(conn);
    }
}

impl Kept {
    fn count(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
}

/// Reads up to the end of a request head; returns it (and what came after it).
async fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An endpoint's pool as `pool::send` takes it: settings (8 idle), connections, connector.
fn pool_of_8() -> (PoolSettings, Arc<EndpointConns>, crate::forward::connect::MeshConnector) {
    let settings = PoolSettings { idle_timeout: Duration::from_secs(60), max_idle_per_endpoint: 8 };
    (settings, Arc::new(EndpointConns::default()), crate::forward::pool::tests::connector())
}

fn in_a_second() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(1)
}

async fn connect(addr: std::net::SocketAddr) -> Box<Conn> {
    let io = UpstreamIo::Plain(hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.expect("connect")));
    Conn::new(io, in_a_second(), false, 8)
}

fn get(path: &str) -> (Parts, UpstreamBody) {
    let (p, ()) = Request::get(path).header("host", "svc").body(()).expect("req").into_parts();
    (p, Either::Right(Empty::new()))
}

/// One exchange on `conn`: the response's status, body, trailers.
async fn exchange(
    mut conn: Box<Conn>,
    parts: &Parts,
    body: UpstreamBody,
    home: &Arc<Kept>,
) -> Result<(u16, Vec<u8>, Option<http::HeaderMap>), Error> {
    let mut writer = conn.start(parts, None, body);
    let head = response_head(&mut conn, &mut writer).await?;
    let resp = response(conn, writer, head, Some(Arc::clone(home) as Arc<dyn GiveBack>));
    let status = resp.status().as_u16();
    let collected = resp.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    Ok((status, collected.to_bytes().to_vec(), trailers))
}

#[tokio::test]
async fn a_chunked_response_with_trailers_is_read_whole_and_its_connection_reused() {
    let (addr, _) = server(|_, mut s| async move {
        let (head, _) = read_head(&mut s).await.expect("first request");
        assert!(head.starts_with("GET /one HTTP/1.1\r\n") && head.contains("host: svc\r\n"), "{head}");
        let chunked =
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n";
        s.write_all(chunked.as_bytes()).await.expect("write");
        read_head(&mut s).await.expect("second request, same connection");
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.expect("write");
    })
    .await;
    let kept = Arc::new(Kept::default());
    let (p, b) = get("/one");
    let (status, body, trailers) = exchange(connect(addr).await, &p, b, &kept).await.expect("first");
    assert_eq!((status, body.as_slice()), (200, &b"abcde"[..]));
    assert_eq!(trailers.expect("trailers")["x-sum"], "5");
    let conn = kept.0.lock().expect("lock").pop().expect("given back after the last chunk");
    let (p, b) = get("/two");
    let (_, body, _) = exchange(conn, &p, b, &kept).await.expect("second");
    assert_eq!(body, b"ok");
}

#[tokio::test]
async fn a_body_until_close_ends_at_the_close_and_its_connection_is_not_kept() {
    let (addr, _) = server(|_, mut s| async move {
        read_head(&mut s).await.expect("request");
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\nall of it").await.expect("write");
    })
    .await;
    let kept = Arc::new(Kept::default());
    let (p, b) = get("/");
    let (_, body, _) = exchange(connect(addr).await, &p, b, &kept).await.expect("exchange");
    assert_eq!(body, b"all of it");
    assert_eq!(kept.count(), 0);
}

#[tokio::test]
async fn bytes_past_the_response_or_a_short_body_leave_the_connection_unused() {
    let (addr, _) = server(|i, mut s| async move {
        read_head(&mut s).await.expect("request");
        let reply: &[u8] = match i {
            0 => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort",
        };
        s.write_all(reply).await.expect("write");
    })
    .await;
    let kept = Arc::new(Kept::default());
    let (p, b) = get("/");
    let (_, body, _) = exchange(connect(addr).await, &p, b, &kept).await.expect("first");
    assert_eq!(body, b"ok");
    assert_eq!(kept.count(), 0, "a response nobody asked for follows: not reusable");
    let (p, b) = get("/");
    let e = exchange(connect(addr).await, &p, b, &kept).await.expect_err("the server closed mid-body");
    assert!(e.to_string().contains("mid-body") || e.to_string().contains("closed"), "{e}");
}

/// A request body of the kind the proxy sends on (hyper's `Incoming`), fed by the
/// returned sender: a real client streams it to a real server, which hands it over.
async fn streamed_body() -> (tokio::sync::mpsc::Sender<Bytes>, UpstreamBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let (give, take) = tokio::sync::oneshot::channel();
    let give = Arc::new(Mutex::new(Some(give)));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let give = Arc::clone(&give);
            async move {
                if let Some(g) = give.lock().expect("lock").take() {
                    let _ = g.send(req.into_body());
                }
                // Answers only when the test is over.
                std::future::pending::<()>().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
    });
    tokio::spawn(async move {
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.expect("handshake");
        tokio::spawn(conn);
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
        let _ = send.send_request(Request::post("/").body(StreamBody::new(frames)).expect("req")).await;
    });
    (tx, Either::Left(take.await.expect("the body")))
}

use tokio_stream::StreamExt;

#[tokio::test]
async fn a_streamed_request_body_goes_out_chunked_as_it_comes() {
    // The server says when the first chunk is in; only then does the client send the
    // second: a body held back until it ends would never get there.
    let (first_in, mut got_first) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (addr, _) = server(move |_, mut s| {
        let first_in = first_in.clone();
        async move {
            let (head, mut rest) = read_head(&mut s).await.expect("request");
            assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
            let mut chunk = [0u8; 1024];
            while !rest.ends_with(b"5\r\nhello\r\n") {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "no first chunk: {:?}", String::from_utf8_lossy(&rest));
                rest.extend_from_slice(&chunk[..n]);
            }
            first_in.send(()).expect("the test waits");
            while !rest.ends_with(b"0\r\n\r\n") {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "the body never ended: {:?}", String::from_utf8_lossy(&rest));
                rest.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(rest, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("write");
        }
    })
    .await;
    let (tx, body) = streamed_body().await;
    let (p, ()) = Request::post("/upload").header("host", "svc").body(()).expect("req").into_parts();
    let kept = Arc::new(Kept::default());
    let sending = tokio::spawn(async move {
        tx.send(Bytes::from_static(b"hello")).await.expect("send");
        got_first.recv().await.expect("the server saw the first chunk");
        tx.send(Bytes::from_static(b" world")).await.expect("send");
    });
    let exchanged = exchange(connect(addr).await, &p, body, &kept);
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), exchanged)
        .await
        .expect("the first chunk went out before the body ended")
        .expect("exchange");
    sending.await.expect("sent");
    assert_eq!(status, 200);
    assert_eq!(kept.count(), 1, "all sent, all read: reusable");
}

#[tokio::test]
async fn an_answer_before_the_body_is_sent_is_returned_and_the_connection_dropped() {
    let (addr, _) = server(|_, mut s| async move {
        read_head(&mut s).await.expect("request");
        s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig").await.expect("write");
        let _ = s.read(&mut [0u8; 64]).await;
    })
    .await;
    // The client never finishes its body: the answer must not wait for it.
    let (_tx, body) = streamed_body().await;
    let (p, ()) = Request::post("/upload").header("host", "svc").body(()).expect("req").into_parts();
    let kept = Arc::new(Kept::default());
    let (status, body, _) = exchange(connect(addr).await, &p, body, &kept).await.expect("exchange");
    assert_eq!((status, body.as_slice()), (413, &b"big"[..]));
    assert_eq!(kept.count(), 0, "half a request sent: the connection cannot carry another");
}

#[tokio::test]
async fn a_pooled_connection_closed_under_a_get_is_replaced_and_the_get_sent_again() {
    // The keep-alive race, made certain: the first connection answers one request,
    // then takes the next one and closes without answering.
    let (addr, accepted) = server(|i, mut s| async move {
        read_head(&mut s).await.expect("request");
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.expect("write");
        if i == 0 {
            read_head(&mut s).await.expect("second request");
        }
    })
    .await;
    let (settings, conns, connector) = pool_of_8();
    for _ in 0..2 {
        let (p, b) = get("/");
        let resp = pool::send(&connector, &settings, &conns, addr, false, in_a_second(), &p, None, b).await;
        let body = resp.expect("answered").into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the second GET went out again on a new connection");
}

#[tokio::test]
async fn a_post_with_a_body_is_never_sent_twice() {
    // The same race under a POST: its error is returned, and no second connection made.
    let (addr, accepted) = server(|_, mut s| async move {
        read_head(&mut s).await.expect("request");
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.expect("write");
        read_head(&mut s).await.expect("the POST");
    })
    .await;
    let (settings, conns, connector) = pool_of_8();
    let (p, b) = get("/");
    let resp = pool::send(&connector, &settings, &conns, addr, false, in_a_second(), &p, None, b).await;
    resp.expect("answered").into_body().collect().await.expect("body");
    let (tx, body) = streamed_body().await;
    tx.send(Bytes::from_static(b"order")).await.expect("send");
    drop(tx);
    let (p, ()) = Request::post("/orders").header("host", "svc").body(()).expect("req").into_parts();
    let r = pool::send(&connector, &settings, &conns, addr, false, in_a_second(), &p, None, body).await;
    assert!(r.is_err(), "the closed connection's error, not a second POST");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn no_head_by_the_deadline_is_a_timeout_and_garbage_is_a_malformed_head() {
    let (addr, _) = server(|i, mut s| async move {
        read_head(&mut s).await.expect("request");
        if i == 1 {
            s.write_all(b"SMTP ready\r\n\r\n").await.expect("write");
        }
        let _ = s.read(&mut [0u8; 64]).await;
    })
    .await;
    let kept = Arc::new(Kept::default());
    let mut conn = connect(addr).await;
    conn.set_deadline(tokio::time::Instant::now() + Duration::from_millis(100));
    let (p, b) = get("/");
    assert!(matches!(exchange(conn, &p, b, &kept).await, Err(Error::Timeout)));
    let (p, b) = get("/");
    let e = exchange(connect(addr).await, &p, b, &kept).await.expect_err("not HTTP");
    assert!(matches!(e, Error::MalformedHead(_)), "{e}");
}
