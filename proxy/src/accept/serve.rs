//! Accept, serving: the HTTP/1 and HTTP/2 servers an accepted connection is handed to
//! once detection says it speaks HTTP. Plaintext HTTP/1 connections, outbound and
//! inbound, are parked when quiet (`idle.rs` decides when, `park.rs` holds them). HTTP/2
//! and mTLS connections are served until they end or are drained: hyper's HTTP/2 state
//! and rustls' cannot be taken apart and put back. It must not route or pick endpoints:
//! requests go to `forward`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::idle;
use super::park::Lot;
use crate::detect::{Protocol, Rewind};
use crate::forward::Shared;
use crate::forward::body::ProxyBody;
use crate::forward::http::{self as fwd, ConnInfo};

/// The HTTP/1 server settings every listener uses.
pub(super) fn http1_server(shared: &Shared) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(shared.settings.header_read_timeout)
        .max_buf_size(crate::forward::HTTP1_MAX_BUF);
    b
}

/// The HTTP/2 server settings every listener uses.
pub(super) fn http2_server() -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new()).max_concurrent_streams(1024);
    b
}

pub(super) async fn serve_inbound_http<IO>(
    shared: Arc<Shared>,
    app: SocketAddr,
    io: Rewind<IO>,
    protocol: Protocol,
    drain: tokio::sync::watch::Receiver<bool>,
    peer: Option<Arc<str>>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (h1, h2, idle_after) = (http1_server(&shared), http2_server(), shared.settings.client_idle_timeout);
    let activity = Arc::new(idle::Activity::default());
    let service = counted(Arc::clone(&activity), move |req| {
        crate::forward::inbound::handle(Arc::clone(&shared), app, req, peer.clone())
    });
    let io = TokioIo::new(idle::Watched::new(io, Arc::clone(&activity)));
    // On drain, or quiet past the idle timeout, a connection answers what it is doing and
    // closes (HTTP/2: GOAWAY).
    let mut drain = Some(drain);
    let result = if protocol == Protocol::Http2 {
        let mut conn = Box::pin(h2.serve_connection(io, service));
        until_idle_or_drained(&mut conn, &activity, idle_after, &mut drain, |c| c.as_mut().graceful_shutdown()).await
    } else {
        let mut conn = Box::pin(h1.serve_connection(io, service).with_upgrades());
        until_idle_or_drained(&mut conn, &activity, idle_after, &mut drain, |c| c.as_mut().graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!("inbound http connection: {e}");
    }
}

/// `handle` as hyper's service, each request counted in flight on `activity` until its
/// response body is dropped: what the idle checks (`quiet_or_done`) read.
fn counted<H, F>(
    activity: Arc<idle::Activity>,
    handle: H,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<idle::Counted<ProxyBody>>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<hyper::Response<idle::Counted<ProxyBody>>, std::convert::Infallible>> + Send,
> + Clone
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<ProxyBody>> + Send + 'static,
{
    // A combinator, not an `async` block around `handle`'s future: the block would
    // hold that future twice over (as its capture and as what it awaits), and every
    // request's future is moved into hyper's slot (HTTP/1) or task (HTTP/2) whole.
    service_fn(move |req| {
        let busy = idle::Busy::new(&activity);
        handle(req).map(move |r| Ok(r.map(|b| idle::Counted::new(b, busy))))
    })
}

/// Runs a connection that is never parked (HTTP/2; HTTP/1 inside mTLS) to its end. Once
/// `drain` turns true, or once it has been quiet (no byte either way, no request in
/// flight) for between one and two `idle_after` periods, it is asked to finish (hyper's
/// graceful shutdown) and still run to its end: a client that never comes back must not
/// hold a descriptor for ever. A zero `idle_after` never closes it.
async fn until_idle_or_drained<C: Future + Unpin>(
    conn: &mut C,
    activity: &idle::Activity,
    idle_after: Duration,
    drain: &mut Drain,
    mut shutdown: impl FnMut(&mut C),
) -> C::Output {
    match quiet_or_done(conn, activity, idle_after, drain, &mut shutdown).await {
        Some(out) => out,
        None => {
            shutdown(conn);
            conn.await
        }
    }
}

/// A parked connection's lot, as its serving task holds it: weakly, so that the lot
/// (and the connections parked in it) goes with its listener. None: no lot, connections
/// wait in their own tasks.
pub(super) type LotRef<T> = Option<std::sync::Weak<Lot<T>>>;

/// Set when the connection should finish (inbound shutdown); None never is.
type Drain = Option<tokio::sync::watch::Receiver<bool>>;

/// Serves an outbound HTTP/1 connection, parking it whenever it goes quiet.
pub(super) async fn serve_http1(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    io: Rewind<TcpStream>,
    lot: LotRef<ConnInfo>,
) {
    let handle = {
        let (shared, conn) = (Arc::clone(&shared), Arc::clone(&conn));
        move |req| fwd::handle(Arc::clone(&shared), Arc::clone(&conn), req)
    };
    // By value in the lot: an `Arc` of its own would be one more scattered allocation.
    let resume = ConnInfo::clone(&conn);
    serve_parking(shared, io, handle, None, "outbound", resume, lot).await;
}

/// What an inbound connection parked in its listener's lot needs to be served again.
#[derive(Debug)]
pub(super) struct InboundConn {
    pub app: SocketAddr,
    /// Counts the connection as open, parked or not, for shutdown's drain (by being held).
    pub _held: super::Tracked,
}

/// Serves an inbound plaintext HTTP/1 connection (no caller identity), parking it
/// whenever it goes quiet. On drain it answers what it is doing and closes.
pub(super) async fn serve_inbound_http1(
    shared: Arc<Shared>,
    conn: InboundConn,
    io: Rewind<TcpStream>,
    drain: tokio::sync::watch::Receiver<bool>,
    lot: LotRef<InboundConn>,
) {
    let handle = {
        let (shared, app) = (Arc::clone(&shared), conn.app);
        move |req| crate::forward::inbound::handle(Arc::clone(&shared), app, req, None)
    };
    serve_parking(shared, io, handle, Some(drain), "inbound", conn, lot).await;
}

/// Serves HTTP/1 on `io` with `handle`; when the connection goes quiet (`idle.rs`) its
/// socket is parked in `lot` with `resume` and this task ends (the lot serves it again
/// on a new one). Without a lot the socket waits in this task.
async fn serve_parking<H, F, T>(
    shared: Arc<Shared>,
    mut io: Rewind<TcpStream>,
    handle: H,
    mut drain: Drain,
    side: &'static str,
    mut resume: T,
    lot: LotRef<T>,
) where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<ProxyBody>> + Send + 'static,
{
    loop {
        let Some(tcp) = serve_until_quiet(&shared, io, handle.clone(), &mut drain, side).await else { return };
        let tcp = match lot.as_ref().map(std::sync::Weak::upgrade) {
            // The listener is gone (shutdown), and so is the lot: the connection closes.
            Some(None) => return,
            Some(Some(lot)) => match lot.park(tcp, resume) {
                None => return,
                Some((tcp, back)) => {
                    resume = back;
                    tcp
                }
            },
            None => tcp,
        };
        let data = &shared.metrics.data;
        data.connection_parks.inc();
        data.parked_connections.inc();
        let readable = tokio::select! {
            r = tcp.readable() => r.is_ok(),
            () = drained(&mut drain) => false,
        };
        data.parked_connections.dec();
        if !readable {
            return;
        }
        io = Rewind::new(bytes::Bytes::new(), tcp);
    }
}

/// Serves HTTP/1 on `io` until the connection ends (None) or is quiet with no request
/// bytes waiting (its socket). A request head that was still arriving when it went quiet
/// is handed to the next hyper connection, within one header deadline across them.
async fn serve_until_quiet<H, F>(
    shared: &Shared,
    mut io: Rewind<TcpStream>,
    handle: H,
    drain: &mut Drain,
    side: &'static str,
) -> Option<TcpStream>
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = hyper::Response<ProxyBody>> + Send + 'static,
{
    let activity = Arc::new(idle::Activity::default());
    // When a request head began arriving across parkings: each new hyper connection
    // restarts its own header timer, so the whole head's deadline is kept here.
    let mut head_since: Option<std::time::Instant> = None;
    loop {
        let service = counted(Arc::clone(&activity), handle.clone());
        let watched = idle::Watched::new(io, Arc::clone(&activity));
        // Boxed: the task keeps only a pointer while parked, not hyper's connection state.
        let mut served =
            Box::new(http1_server(shared).serve_connection(TokioIo::new(watched), service).with_upgrades());
        let period = shared.settings.park_idle_after;
        match quiet_or_done(&mut *served, &activity, period, drain, |c| std::pin::Pin::new(c).graceful_shutdown()).await
        {
            Some(Err(e)) if e.is_parse() || e.is_parse_too_large() || e.is_timeout() => {
                tracing::warn!("{side}: rejected a malformed or too slow HTTP/1 request: {e}");
                return None;
            }
            Some(Err(e)) => {
                tracing::debug!("{side} http/1 connection: {e}");
                return None;
            }
            Some(Ok(())) => return None,
            None => {}
        }
        let socket = socket_of(served)?;
        if socket.prefix().is_empty() {
            return Some(socket.into_parts().1);
        }
        if head_since.get_or_insert_with(std::time::Instant::now).elapsed() >= shared.settings.header_read_timeout {
            tracing::warn!("{side}: closed a connection whose HTTP/1 request head was too slow to arrive");
            return None;
        }
        io = socket;
    }
}

/// Resolves once `drain` turns true (or its sender is gone); never without one.
async fn drained(drain: &mut Drain) {
    match drain {
        Some(d) => drop(d.wait_for(|d| *d).await),
        None => std::future::pending().await,
    }
}

/// A quiet connection's socket, with the bytes hyper had read but not used yet (a
/// request head still arriving) in front of it. Everything else hyper held is freed
/// here, its buffers included: an empty `read_buf` still owns its 8-16 KiB allocation,
/// so the unread bytes are copied out.
// Takes the Box itself so that its allocation is freed here, before the socket is parked.
#[allow(clippy::boxed_local)]
fn socket_of<S, B>(
    served: Box<http1::UpgradeableConnection<TokioIo<idle::Watched<Rewind<TcpStream>>>, S>>,
) -> Option<Rewind<TcpStream>>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parts = (*served).into_parts()?;
    let (leftover, tcp) = parts.io.into_inner().into_inner().into_parts();
    let mut prefix = Vec::with_capacity(parts.read_buf.len() + leftover.len());
    prefix.extend_from_slice(&parts.read_buf);
    prefix.extend_from_slice(&leftover);
    Some(Rewind::new(bytes::Bytes::from(prefix), tcp))
}

/// Runs `served` until it ends (Some) or has been quiet for a whole `period` (None; a
/// zero period never is). Once `drain` turns true, it is asked to finish (hyper's
/// graceful shutdown: an idle connection closes at once) and run to its end.
async fn quiet_or_done<F: Future + Unpin>(
    served: &mut F,
    activity: &idle::Activity,
    period: Duration,
    drain: &mut Drain,
    mut shutdown: impl FnMut(&mut F),
) -> Option<F::Output> {
    let mut mark = activity.mark();
    let tick = tokio::time::sleep(period);
    tokio::pin!(tick);
    loop {
        tokio::select! {
            biased;
            out = &mut *served => return Some(out),
            () = &mut tick, if !period.is_zero() => {
                if activity.quiet_since(mark) {
                    return None;
                }
                mark = activity.mark();
                tick.as_mut().reset(tokio::time::Instant::now() + period);
            }
            () = drained(drain) => {
                shutdown(served);
                return Some(served.await);
            }
        }
    }
}

/// Serves an outbound h2c connection; closed once quiet past the client idle timeout.
pub(super) async fn serve_http2(shared: Arc<Shared>, conn: Arc<ConnInfo>, io: Rewind<TcpStream>) {
    let idle_after = shared.settings.client_idle_timeout;
    let activity = Arc::new(idle::Activity::default());
    let service = counted(Arc::clone(&activity), move |req| fwd::handle(Arc::clone(&shared), Arc::clone(&conn), req));
    let io = TokioIo::new(idle::Watched::new(io, Arc::clone(&activity)));
    let mut served = Box::pin(http2_server().serve_connection(io, service));
    let result =
        until_idle_or_drained(&mut served, &activity, idle_after, &mut None, |c| c.as_mut().graceful_shutdown()).await;
    if let Err(e) = result {
        tracing::info!("outbound h2c connection ended with an error: {e}");
    }
}
