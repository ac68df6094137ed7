//! Accept, serving: the HTTP/1 and HTTP/2 servers an accepted connection is handed to
//! once detection says it speaks HTTP. Outbound HTTP/1 connections are parked when quiet
//! (`idle.rs`); inbound ones are served until drained. It must not route or pick
//! endpoints: requests go to `forward`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::idle;
use crate::detect::{Protocol, Rewind};
use crate::forward::Shared;
use crate::forward::http::{self as fwd, ConnInfo};

/// The HTTP/1 server settings every listener uses.
pub(super) fn http1_server(shared: &Shared) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(shared.settings.header_read_timeout).max_buf_size(64 * 1024);
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
    let (h1, h2) = (http1_server(&shared), http2_server());
    let service = service_fn(move |req| {
        let (shared, peer) = (Arc::clone(&shared), peer.clone());
        async move { Ok::<_, std::convert::Infallible>(crate::forward::inbound::handle(shared, app, req, peer).await) }
    });
    // On drain, a connection answers what it is doing and closes (HTTP/2: GOAWAY).
    let result = if protocol == Protocol::Http2 {
        let conn = h2.serve_connection(TokioIo::new(io), service);
        until_drained(conn, drain, |c| c.graceful_shutdown()).await
    } else {
        let conn = h1.serve_connection(TokioIo::new(io), service).with_upgrades();
        until_drained(conn, drain, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!("inbound http connection: {e}");
    }
}

/// Runs a served connection to its end; once `drain` turns true, asks it to finish
/// (`shutdown`: hyper's graceful shutdown) and still runs it to its end.
async fn until_drained<C: Future>(
    conn: C,
    mut drain: tokio::sync::watch::Receiver<bool>,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> C::Output {
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = async { drop(drain.wait_for(|d| *d).await) } => {
            shutdown(conn.as_mut());
            conn.await
        }
    }
}

pub(super) async fn serve_http1(shared: Arc<Shared>, conn: Arc<ConnInfo>, mut io: Rewind<TcpStream>) {
    let park_after = shared.settings.park_idle_after;
    let activity = Arc::new(idle::Activity::default());
    // When a request head began arriving across parkings: each new hyper connection
    // restarts its own header timer, so the whole head's deadline is kept here.
    let mut head_since: Option<std::time::Instant> = None;
    loop {
        let service = {
            let (shared, conn, activity) = (Arc::clone(&shared), Arc::clone(&conn), Arc::clone(&activity));
            service_fn(move |req| {
                let (shared, conn) = (Arc::clone(&shared), Arc::clone(&conn));
                let busy = idle::Busy::new(&activity);
                async move {
                    let resp = fwd::handle(shared, conn, req).await;
                    Ok::<_, std::convert::Infallible>(resp.map(|body| idle::Counted::new(body, busy)))
                }
            })
        };
        let watched = idle::Watched::new(io, Arc::clone(&activity));
        // Boxed: the task keeps only a pointer while parked, not hyper's connection state.
        let mut served =
            Box::new(http1_server(&shared).serve_connection(TokioIo::new(watched), service).with_upgrades());
        let result = if park_after.is_zero() {
            Some((&mut *served).await)
        } else {
            quiet_or_done(&mut served, &activity, park_after).await
        };
        match result {
            Some(Err(e)) if e.is_parse() || e.is_parse_too_large() || e.is_timeout() => {
                tracing::warn!("outbound: rejected a malformed or too slow HTTP/1 request: {e}");
                return;
            }
            Some(Err(e)) => {
                tracing::debug!("outbound http/1 connection: {e}");
                return;
            }
            Some(Ok(())) => return,
            None => {}
        }
        let Some(socket) = socket_of(served) else { return };
        if socket.prefix().is_empty() {
            head_since = None;
        } else if head_since.get_or_insert_with(std::time::Instant::now).elapsed()
            >= shared.settings.header_read_timeout
        {
            tracing::warn!("outbound: closed a connection whose HTTP/1 request head was too slow to arrive");
            return;
        }
        if socket.prefix().is_empty() {
            let parked = &shared.metrics.data.parked_connections;
            shared.metrics.data.connection_parks.inc();
            parked.inc();
            let readable = socket.inner().readable().await;
            parked.dec();
            if readable.is_err() {
                return;
            }
        }
        io = socket;
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

/// Runs `served` until it ends (Some) or has been quiet for a whole `period` (None).
async fn quiet_or_done<F: Future + Unpin>(
    served: &mut F,
    activity: &idle::Activity,
    period: Duration,
) -> Option<F::Output> {
    let mut mark = activity.mark();
    let tick = tokio::time::sleep(period);
    tokio::pin!(tick);
    loop {
        tokio::select! {
            biased;
            out = &mut *served => return Some(out),
            () = &mut tick => {
                if activity.quiet_since(mark) {
                    return None;
                }
                mark = activity.mark();
                tick.as_mut().reset(tokio::time::Instant::now() + period);
            }
        }
    }
}

pub(super) async fn serve_http2(shared: Arc<Shared>, conn: Arc<ConnInfo>, io: Rewind<TcpStream>) {
    let service = service_fn(move |req| {
        let (shared, conn) = (Arc::clone(&shared), Arc::clone(&conn));
        async move { Ok::<_, std::convert::Infallible>(fwd::handle(shared, conn, req).await) }
    });
    let result = http2_server().serve_connection(TokioIo::new(io), service).await;
    if let Err(e) = result {
        tracing::info!("outbound h2c connection ended with an error: {e}");
    }
}
