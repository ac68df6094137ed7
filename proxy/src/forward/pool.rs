//! Pool: connections to the mesh's endpoints, kept per endpoint address and per scheme
//! (plaintext and mesh mTLS never mix): idle HTTP/1 connections, and one shared HTTP/2
//! connection (its streams multiplexed).
//!
//! The compiled mesh gives every endpoint its `EndpointConns`, carried across config
//! snapshots by address, so a request reaches its pool through the endpoint it was
//! given: no map lookup and no lock on the request path (a lock-free queue). A
//! connection goes back when the response body has ended (`Reuse::give_back`), not
//! before. A pooled connection that closed while idle hands the request back unsent,
//! and it goes out on another one. It must not choose endpoints or read requests
//! beyond sending them; passthrough keeps hyper-util's client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_queue::SegQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioExecutor;

use super::connect::MeshConnector;
use super::upstream::UpstreamBody;

/// One endpoint's connections.
#[derive(Debug, Default)]
pub struct EndpointConns {
    plain: Idle,
    mtls: Idle,
    /// The HTTP/2 connection every HTTP/2 request to the endpoint shares, once made.
    h2_plain: ArcSwapOption<http2::SendRequest<UpstreamBody>>,
    h2_mtls: ArcSwapOption<http2::SendRequest<UpstreamBody>>,
}

impl EndpointConns {
    fn side(&self, mtls: bool) -> &Idle {
        if mtls { &self.mtls } else { &self.plain }
    }

    fn h2_side(&self, mtls: bool) -> &ArcSwapOption<http2::SendRequest<UpstreamBody>> {
        if mtls { &self.h2_mtls } else { &self.h2_plain }
    }

    /// Idle connections now (both schemes), for tests and the admin view.
    pub fn idle(&self) -> usize {
        self.plain.len.load(Ordering::Relaxed) + self.mtls.len.load(Ordering::Relaxed)
    }

    /// Closes connections idle longer than `idle_timeout` or closed by the peer; the
    /// rest stay, in their order. Requests running meanwhile may open a connection
    /// instead of finding one of those being looked at: harmless.
    pub fn reap(&self, idle_timeout: Duration) {
        for h2 in [&self.h2_plain, &self.h2_mtls] {
            if h2.load().as_ref().is_some_and(|s| s.is_closed()) {
                h2.store(None);
            }
        }
        for side in [&self.plain, &self.mtls] {
            for _ in 0..side.len.load(Ordering::Relaxed) {
                let Some(c) = side.pop() else { break };
                if c.fresh(idle_timeout) {
                    side.push(c);
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Idle {
    queue: SegQueue<Parked>,
    /// Kept beside the queue so that the cap is checked without walking it.
    len: AtomicUsize,
}

impl Idle {
    fn pop(&self) -> Option<Parked> {
        let c = self.queue.pop()?;
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(c)
    }

    fn push(&self, c: Parked) {
        self.len.fetch_add(1, Ordering::Relaxed);
        self.queue.push(c);
    }
}

#[derive(Debug)]
struct Parked {
    send: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

impl Parked {
    fn fresh(&self, idle_timeout: Duration) -> bool {
        !self.send.is_closed() && self.since.elapsed() < idle_timeout
    }
}

/// A connection in use; back to its pool once the response has been read whole.
#[derive(Debug)]
pub struct Reuse {
    send: http1::SendRequest<UpstreamBody>,
    conns: Arc<EndpointConns>,
    mtls: bool,
    max_idle: usize,
}

impl Reuse {
    /// Pools the connection, unless the pool is full or the connection closed (the
    /// server said `Connection: close`, or broke): dropping it closes it.
    pub fn give_back(self) {
        let idle = self.conns.side(self.mtls);
        if self.send.is_closed() || idle.len.load(Ordering::Relaxed) >= self.max_idle {
            return;
        }
        idle.push(Parked { send: self.send, since: Instant::now() });
    }
}

/// Idle connections to the local app, by address: an app listens on a port or a few,
/// so a short list scanned per request. At most `MAX_APP_ADDRESSES` are kept; others
/// go through hyper-util's client (`None`).
#[derive(Debug, Default)]
pub struct ByAddress {
    list: ArcSwap<Vec<(SocketAddr, Arc<EndpointConns>)>>,
}

/// Far above the ports one app serves, well below what a port scan of the pod would add.
const MAX_APP_ADDRESSES: usize = 32;

impl ByAddress {
    pub fn get(&self, addr: SocketAddr) -> Option<Arc<EndpointConns>> {
        let find =
            |l: &[(SocketAddr, Arc<EndpointConns>)]| l.iter().find(|(a, _)| *a == addr).map(|(_, c)| Arc::clone(c));
        if let Some(c) = find(&self.list.load()) {
            return Some(c);
        }
        // The first request to this address: add it (copy on write; rare).
        let fresh = Arc::new(EndpointConns::default());
        let before = self.list.rcu(|l| {
            let mut l = Vec::clone(l);
            if find(&l).is_none() && l.len() < MAX_APP_ADDRESSES {
                l.push((addr, Arc::clone(&fresh)));
            }
            l
        });
        find(&before).or_else(|| find(&self.list.load()))
    }

    pub fn all(&self) -> Vec<Arc<EndpointConns>> {
        self.list.load().iter().map(|(_, c)| Arc::clone(c)).collect()
    }
}

/// How the pools behave; the same for every endpoint.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
}

/// Why a request got no response over the pool.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (TCP, TLS, or the HTTP/1 handshake).
    Connect(std::io::Error),
    /// The exchange failed once the request was on a connection.
    Http(hyper::Error),
}

/// Closes stale idle connections (endpoints' and the app's) every half idle timeout,
/// for as long as the proxy runs.
pub async fn reap_stale(shared: Arc<super::Shared>) {
    let timeout = shared.upstreams.pool.idle_timeout;
    let mut tick = tokio::time::interval((timeout / 2).max(Duration::from_secs(1)));
    loop {
        tick.tick().await;
        for c in shared.mesh.load().endpoint_conns() {
            c.reap(timeout);
        }
        for c in shared.app_conns.all() {
            c.reap(timeout);
        }
    }
}

/// Sends `req` to `addr` on an idle connection of `conns`, or on a new one.
pub async fn send(
    connector: &MeshConnector,
    settings: &PoolSettings,
    conns: &Arc<EndpointConns>,
    addr: SocketAddr,
    mtls: bool,
    mut req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Reuse), SendError> {
    let idle = conns.side(mtls);
    let reuse = |send| Reuse { send, conns: Arc::clone(conns), mtls, max_idle: settings.max_idle_per_endpoint };
    while let Some(mut c) = idle.pop() {
        if !c.fresh(settings.idle_timeout) || c.send.ready().await.is_err() {
            continue;
        }
        match c.send.try_send_request(req).await {
            Ok(resp) => return Ok((resp, reuse(c.send))),
            // Never written: the connection closed as we took it. Safe to send again,
            // whatever the method.
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(SendError::Http(e.into_error())),
            },
        }
    }
    // Boxed: connecting (TLS included) is a large state, rarely entered; unboxed, every
    // request's future would be that large, and be copied that much as it is moved.
    let io = Box::pin(connector.open(addr, mtls)).await.map_err(SendError::Connect)?;
    let (mut send, conn) = Box::pin(http1::Builder::new().handshake(io))
        .await
        .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
    tokio::spawn(async move {
        // Upgrades (WebSocket) take the connection over; it is never pooled then.
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("forward: upstream connection to {addr} ended: {e}");
        }
    });
    match send.send_request(req).await {
        Ok(resp) => Ok((resp, reuse(send))),
        Err(e) => Err(SendError::Http(e)),
    }
}

/// Sends `req` to `addr` over the endpoint's shared HTTP/2 connection, made first if
/// there is none or it closed. `connector` speaks h2 (ALPN) when `mtls`.
pub async fn send_h2(
    connector: &MeshConnector,
    conns: &EndpointConns,
    addr: SocketAddr,
    mtls: bool,
    mut req: Request<UpstreamBody>,
) -> Result<Response<Incoming>, SendError> {
    let slot = conns.h2_side(mtls);
    let shared = slot.load_full();
    if let Some(s) = shared.as_deref().filter(|s| !s.is_closed()) {
        match s.clone().try_send_request(req).await {
            Ok(resp) => return Ok(resp),
            // Refused before a frame was written (the connection was closing): on a new one.
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(SendError::Http(e.into_error())),
            },
        }
    }
    // Boxed for the same reason as in `send`. Requests that find no connection at the
    // same moment each make one; the last one stored is shared, the others close once
    // their own request is done.
    let io = Box::pin(connector.open(addr, mtls)).await.map_err(SendError::Connect)?;
    let (send, conn) = Box::pin(http2::Builder::new(TokioExecutor::new()).handshake(io))
        .await
        .map_err(|e| SendError::Connect(std::io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("forward: upstream HTTP/2 connection to {addr} ended: {e}");
        }
    });
    slot.store(Some(Arc::new(send.clone())));
    send.clone().send_request(req).await.map_err(SendError::Http)
}

#[cfg(test)]
mod tests {
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

    /// A real server on loopback answering "ok", counting the connections it accepted.
    async fn backend(serve: Serve) -> (SocketAddr, Arc<AtomicU32>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU32::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from("ok"))))
                    });
                    let io = TokioIo::new(s);
                    let _ = match serve {
                        Serve::Http1 { close_after_one } => {
                            server::Builder::new().keep_alive(!close_after_one).serve_connection(io, svc).await
                        }
                        Serve::Http2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                        }
                    };
                });
            }
        });
        (addr, accepted)
    }

    fn connector() -> MeshConnector {
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

    async fn exchange(
        settings: &PoolSettings,
        conns: &Arc<EndpointConns>,
        addr: SocketAddr,
        read_whole: bool,
    ) -> Option<Reuse> {
        let (resp, reuse) = send(&connector(), settings, conns, addr, false, get()).await.expect("sent");
        assert_eq!(resp.status(), 200);
        if read_whole {
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, "ok");
            Some(reuse)
        } else {
            None
        }
    }

    fn settings(max_idle: usize) -> PoolSettings {
        PoolSettings { idle_timeout: Duration::from_secs(60), max_idle_per_endpoint: max_idle }
    }

    #[tokio::test]
    async fn a_connection_given_back_serves_the_next_request() {
        let (addr, accepted) = backend(Serve::Http1 { close_after_one: false }).await;
        let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
        for _ in 0..3 {
            exchange(&s, &conns, addr, true).await.expect("reuse").give_back();
            assert_eq!(conns.idle(), 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "three requests, one connection");
    }

    #[tokio::test]
    async fn a_connection_not_given_back_is_not_reused() {
        let (addr, accepted) = backend(Serve::Http1 { close_after_one: false }).await;
        let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
        exchange(&s, &conns, addr, false).await;
        exchange(&s, &conns, addr, true).await.expect("reuse").give_back();
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "the body never read: its connection is not pooled");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_skipped_and_the_request_still_goes() {
        let (addr, accepted) = backend(Serve::Http1 { close_after_one: true }).await;
        let (s, conns) = (settings(8), Arc::new(EndpointConns::default()));
        for _ in 0..3 {
            if let Some(r) = exchange(&s, &conns, addr, true).await {
                r.give_back();
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "each request on a new connection; none failed");
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
            held.push(exchange(&s, &conns, addr, true).await.expect("reuse"));
        }
        held.into_iter().for_each(Reuse::give_back);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(conns.idle(), 2);
        conns.reap(Duration::from_secs(60));
        assert_eq!(conns.idle(), 2, "fresh connections stay");
        conns.reap(Duration::ZERO);
        assert_eq!(conns.idle(), 0, "stale ones are closed");
    }
}
