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
//!
//! An HTTP/1 connection has no task of its own: the task whose request it carries
//! drives it (`drive`, then the response body, `Reuse::poll_conn`), so a request
//! is not handed to another task and back. Its deadline is a timer the connection
//! keeps and pushes later per request, which costs no timer-wheel lock; a new timer
//! per request did. Upgrades (WebSocket) get a connection task, as they outlive the
//! request.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use crossbeam_queue::SegQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioExecutor;
use tokio::time::Sleep;

use super::connect::{MeshConnector, UpstreamIo};
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
                c.link.poll_conn(&mut Context::from_waker(Waker::noop()));
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

/// An HTTP/1 connection's state machine (hyper's), run by the task using it.
type Conn = http1::Connection<UpstreamIo, UpstreamBody>;

/// One HTTP/1 connection: the handle requests go out on, the connection itself
/// (`None` once it ended, or when a task of its own runs it), and its deadline timer.
struct Link {
    send: http1::SendRequest<UpstreamBody>,
    conn: Option<Box<Conn>>,
    timer: Pin<Box<Sleep>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("running", &self.conn.is_some()).finish_non_exhaustive()
    }
}

impl Link {
    /// Lets the connection read and write what it can; notes when it has ended.
    fn poll_conn(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = self.conn.as_mut()
            && Pin::new(&mut **c).poll(cx).is_ready()
        {
            self.conn = None;
        }
    }

    fn usable(&self) -> bool {
        self.conn.is_some() && !self.send.is_closed()
    }
}

/// Runs `fut`, something sent on `conn`, to its end while driving `conn` in this
/// task; `None` when `timer` fires first. A connection that ends drops what was
/// queued on it, so `fut` ends too.
async fn drive<F: Future>(conn: &mut Option<Box<Conn>>, timer: &mut Pin<Box<Sleep>>, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut first = true;
    poll_fn(|cx| {
        // `fut` first: an idle connection is usually ready already, and each poll of
        // the connection tries a read and a flush.
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if let Some(c) = conn.as_mut()
            && Pin::new(&mut **c).poll(cx).is_ready()
        {
            *conn = None;
        }
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        // One poll registers this task with the timer; after that, reading its state
        // is enough, and much cheaper than polling it again.
        let elapsed = if std::mem::take(&mut first) { timer.as_mut().poll(cx).is_ready() } else { timer.is_elapsed() };
        if elapsed { Poll::Ready(None) } else { Poll::Pending }
    })
    .await
}

#[derive(Debug)]
struct Parked {
    link: Link,
    since: Instant,
}

impl Parked {
    fn fresh(&self, idle_timeout: Duration) -> bool {
        self.link.usable() && self.since.elapsed() < idle_timeout
    }
}

/// A connection in use; back to its pool once the response has been read whole.
/// Whoever holds it drives it (`poll_conn`) while the response body is read.
#[derive(Debug)]
pub struct Reuse {
    link: Link,
    conns: Arc<EndpointConns>,
    mtls: bool,
    max_idle: usize,
}

impl Reuse {
    /// Drives the connection: the rest of the response comes in (and of the request
    /// body goes out) only while this is called.
    pub fn poll_conn(&mut self, cx: &mut Context<'_>) {
        self.link.poll_conn(cx);
    }

    /// Pools the connection, unless the pool is full or the connection ended (the
    /// server said `Connection: close`, or broke): dropping it closes it.
    pub fn give_back(self) {
        let idle = self.conns.side(self.mtls);
        if !self.link.usable() || idle.len.load(Ordering::Relaxed) >= self.max_idle {
            return;
        }
        idle.push(Parked { link: self.link, since: Instant::now() });
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

/// Sends `req` to `addr` on an idle connection of `conns`, or on a new one, and
/// waits for the response head until `deadline`. An upgrade always gets a new
/// connection, run by a task of its own (it outlives the request).
#[allow(clippy::too_many_arguments)] // one call site per caller; a struct would only rename them
pub async fn send(
    connector: &MeshConnector,
    settings: &PoolSettings,
    conns: &Arc<EndpointConns>,
    addr: SocketAddr,
    mtls: bool,
    upgrading: bool,
    deadline: tokio::time::Instant,
    mut req: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, Reuse), SendError> {
    let idle = conns.side(mtls);
    let reuse = |link| Reuse { link, conns: Arc::clone(conns), mtls, max_idle: settings.max_idle_per_endpoint };
    while let Some(c) = (!upgrading).then(|| idle.pop()).flatten() {
        if !c.fresh(settings.idle_timeout) {
            continue;
        }
        let mut link = c.link;
        // Later than the last request's deadline: moved without the timer wheel's lock.
        link.timer.as_mut().reset(deadline);
        let Link { send, conn, timer } = &mut link;
        match drive(conn, timer, send.ready()).await {
            None => return Err(SendError::Timeout),
            // It closed while idle.
            Some(Err(_)) => continue,
            Some(Ok(())) => {}
        }
        match drive(conn, timer, send.try_send_request(req)).await {
            None => return Err(SendError::Timeout),
            Some(Ok(resp)) => return Ok((resp, reuse(link))),
            // Never written: the connection closed as we took it. Safe to send again,
            // whatever the method.
            Some(Err(mut e)) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(SendError::Http(e.into_error())),
            },
        }
    }
    // Boxed: connecting (TLS included) is a large state, rarely entered; unboxed, every
    // request's future would be that large, and be copied that much as it is moved.
    let made = Box::pin(async {
        let io = connector.open(addr, mtls).await.map_err(SendError::Connect)?;
        http1::Builder::new()
            .max_buf_size(super::HTTP1_MAX_BUF)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(std::io::Error::other(e)))
    });
    let (mut send, conn) = tokio::time::timeout_at(deadline, made).await.map_err(|_| SendError::Timeout)??;
    if upgrading {
        tokio::spawn(async move {
            // The upgrade takes the connection over; it is never pooled.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("forward: upstream connection to {addr} ended: {e}");
            }
        });
        let resp = tokio::time::timeout_at(deadline, send.send_request(req)).await.map_err(|_| SendError::Timeout)?;
        let link = Link { send, conn: None, timer: Box::pin(tokio::time::sleep_until(deadline)) };
        return resp.map(|r| (r, reuse(link))).map_err(SendError::Http);
    }
    let mut link = Link { send, conn: Some(Box::new(conn)), timer: Box::pin(tokio::time::sleep_until(deadline)) };
    let Link { send, conn, timer } = &mut link;
    match drive(conn, timer, send.send_request(req)).await {
        None => Err(SendError::Timeout),
        Some(Ok(resp)) => Ok((resp, reuse(link))),
        Some(Err(e)) => Err(SendError::Http(e)),
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
#[path = "pool_tests.rs"]
mod tests;
