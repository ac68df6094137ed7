//! Pool: connections to the mesh's endpoints, kept per endpoint address and per scheme
//! (plaintext and mesh mTLS never mix): idle HTTP/1 connections, and one shared HTTP/2
//! connection (its streams multiplexed).
//!
//! The compiled mesh gives every endpoint its `EndpointConns`, carried across config
//! snapshots by address, so a request reaches its pool through the endpoint it was
//! given: no map lookup and no lock on the request path (a lock-free queue). A
//! connection goes back when the response body has ended, not before. A pooled
//! connection found closed is dropped and the request goes out on another one; one
//! closed under a bodiless idempotent request (the keep-alive race) too. It must not choose endpoints or read requests
//! beyond sending them; passthrough keeps hyper-util's client.
//!
//! An HTTP/1 connection (`h1::Conn`) has no task of its own: the task whose request
//! it carries runs the exchange, then the response body reads the rest and hands the
//! connection back (`GiveBack`). Upgrades (WebSocket) go over hyper's client with a
//! connection task, as they outlive the request.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_queue::SegQueue;
use http::{Method, Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioExecutor;

use super::body::UpBody;
use super::connect::MeshConnector;
use super::h1::{self, Conn, conn::GiveBack};
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

    /// Closes connections idle longer than `idle_timeout` or closed by the peer (each
    /// is polled once to find out: no task watches an idle connection); the rest stay,
    /// in their order. Requests running meanwhile may open a connection instead of
    /// finding one of those being looked at: harmless.
    pub fn reap(&self, idle_timeout: Duration) {
        for h2 in [&self.h2_plain, &self.h2_mtls] {
            if h2.load().as_ref().is_some_and(|s| s.is_closed()) {
                h2.store(None);
            }
        }
        for side in [&self.plain, &self.mtls] {
            for _ in 0..side.len.load(Ordering::Relaxed) {
                let Some(mut c) = side.pop() else { break };
                // Whoever takes the connection next polls it with its own waker.
                let closed = c.conn.poll_closed(&mut Context::from_waker(Waker::noop()));
                if !closed && c.fresh(idle_timeout) {
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

impl GiveBack for EndpointConns {
    /// Pools the connection, unless its side of the pool is full: dropping it closes it.
    fn give_back(&self, conn: Box<Conn>) {
        let idle = self.side(conn.mtls);
        if idle.len.load(Ordering::Relaxed) < conn.max_idle {
            idle.push(Parked { conn, since: Instant::now() });
        }
    }
}

#[derive(Debug)]
struct Parked {
    conn: Box<Conn>,
    since: Instant,
}

impl Parked {
    fn fresh(&self, idle_timeout: Duration) -> bool {
        self.since.elapsed() < idle_timeout
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
    /// The exchange failed once the request was on a connection (HTTP/2, upgrades).
    Http(hyper::Error),
    /// The same, on an HTTP/1 connection.
    H1(h1::Error),
    /// No response head by the deadline.
    Timeout,
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

/// Sends the request `parts` + `body` to `addr` on an idle connection of `conns`, or
/// on a new one, and waits for the response head until `deadline`. `parts` is written
/// as it is (origin-form target, hop-by-hop headers already off), and left for a retry.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
pub async fn send(
    connector: &MeshConnector,
    settings: &PoolSettings,
    conns: &Arc<EndpointConns>,
    addr: SocketAddr,
    mtls: bool,
    deadline: tokio::time::Instant,
    parts: &http::request::Parts,
    extra: h1::wire::Extra<'_>,
    body: UpstreamBody,
) -> Result<Response<UpBody>, SendError> {
    let idle = conns.side(mtls);
    let home = || Some(Arc::clone(conns) as Arc<dyn GiveBack>);
    // Bodiless and idempotent: safe to send again if a pooled connection turns out
    // to have been closed under it.
    let replayable = body.is_end_stream()
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
    let mut body = Some(body);
    while let Some(c) = idle.pop() {
        let fresh = c.fresh(settings.idle_timeout);
        let mut conn = c.conn;
        if !fresh || poll_fn(|cx| Poll::Ready(conn.poll_closed(cx))).await {
            continue;
        }
        // Later than the last request's deadline: moved without the timer wheel's lock.
        conn.set_deadline(deadline);
        let mut writer = conn.start(parts, extra, body.take().unwrap_or_else(|| Either::Right(Empty::new())));
        match h1::conn::response_head(&mut conn, &mut writer).await {
            Ok(head) => return Ok(h1::conn::response(conn, writer, head, home()).map(UpBody::H1)),
            Err(e) if replayable && e.before_response() => {
                tracing::debug!(
                    "forward: pooled connection to {addr} was closed under the request ({e}); sending again"
                );
            }
            Err(e) => return Err(h1_error(e)),
        }
    }
    // Boxed: connecting (TLS included) is a large state, rarely entered; unboxed, every
    // request's future would be that large, and be copied that much as it is moved.
    let io = tokio::time::timeout_at(deadline, Box::pin(connector.open(addr, mtls)))
        .await
        .map_err(|_| SendError::Timeout)?
        .map_err(SendError::Connect)?;
    let mut conn = Conn::new(io, deadline, mtls, settings.max_idle_per_endpoint);
    let mut writer = conn.start(parts, extra, body.take().unwrap_or_else(|| Either::Right(Empty::new())));
    match h1::conn::response_head(&mut conn, &mut writer).await {
        Ok(head) => Ok(h1::conn::response(conn, writer, head, home()).map(UpBody::H1)),
        Err(e) => Err(h1_error(e)),
    }
}

fn h1_error(e: h1::Error) -> SendError {
    match e {
        h1::Error::Timeout => SendError::Timeout,
        e => SendError::H1(e),
    }
}

/// An upgrade (WebSocket) over hyper's client, on a new connection run by its own
/// task: the upgraded stream outlives the request, and is never pooled.
pub async fn upgrade(
    connector: &MeshConnector,
    addr: SocketAddr,
    mtls: bool,
    deadline: tokio::time::Instant,
    req: Request<UpstreamBody>,
) -> Result<Response<UpBody>, SendError> {
    let made = Box::pin(async {
        let io = connector.open(addr, mtls).await.map_err(SendError::Connect)?;
        http1::Builder::new()
            .max_buf_size(super::HTTP1_MAX_BUF)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(std::io::Error::other(e)))
    });
    let (mut send, conn) = tokio::time::timeout_at(deadline, made).await.map_err(|_| SendError::Timeout)??;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("forward: upstream connection to {addr} ended: {e}");
        }
    });
    let resp = tokio::time::timeout_at(deadline, send.send_request(req)).await.map_err(|_| SendError::Timeout)?;
    resp.map(|r| r.map(UpBody::Hyper)).map_err(SendError::Http)
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
#[path = "pool_tests.rs"]
pub(crate) mod tests;
