//! Accept: the proxy's listeners. Outbound (127.0.0.1:15001) takes what the pod's apps
//! send, redirected by iptables or addressed to it as an explicit HTTP proxy; inbound
//! (15006) takes what others send to the pod.
//!
//! For each connection it finds where the client was going (SO_ORIGINAL_DST), decides
//! whether the mesh knows that destination, runs protocol detection where that is safe,
//! and hands the connection to HTTP or TCP forwarding. Destinations the mesh does not
//! know pass through untouched, without even being sniffed. It must not route or pick
//! endpoints itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

mod idle;
mod park;
mod serve;

pub use idle::give_back_memory;

use crate::detect::{self, Protocol, Rewind};
use crate::forward::http::{self as fwd, ConnInfo};
use crate::forward::{Shared, tcp};
use serve::{
    InboundConn, LotRef, http1_server, http2_server, serve_http1, serve_http2, serve_inbound_http, serve_inbound_http1,
};

/// An IPv6-only listener on `addr`, for the IPv6 side of a port whose IPv4 side is
/// bound separately (iptables redirects each family to its own listener).
pub fn bind_v6_only(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(SockProtocol::TCP))?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Where a redirected connection was going. None when it was not redirected (the
/// client dialled the proxy itself, as an explicit proxy).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr().ok()?;
    let dst = if local.is_ipv4() {
        getsockopt(stream, sockopt::OriginalDst).ok().map(|sin| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        })
    } else {
        getsockopt(stream, sockopt::Ip6tOriginalDst).ok().map(|sin6| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            ))
        })
    };
    dst.filter(|d| *d != local)
}

/// Accepts outbound connections until the task is dropped. Quiet HTTP/1 connections
/// are parked in this listener's lot (`accept/park.rs`), and close with it.
pub async fn serve_outbound(listener: TcpListener, shared: Arc<Shared>) {
    let lot = new_lot(&shared, "outbound");
    let weak = lot.as_ref().map(Arc::downgrade);
    let accepting = accept_loop(listener, "outbound", {
        let shared = Arc::clone(&shared);
        move |stream| outbound(Arc::clone(&shared), stream, weak.clone())
    });
    let Some(lot) = lot else { return accepting.await };
    let weak = Some(Arc::downgrade(&lot));
    let resume = |tcp, conn| {
        let io = Rewind::new(bytes::Bytes::new(), tcp);
        tokio::spawn(serve_http1(Arc::clone(&shared), Arc::new(conn), io, weak.clone()));
    };
    tokio::join!(accepting, lot.run(resume));
}

/// A listener's parking lot. None when parking is off, or when no epoll set can be
/// made (connections then wait in their own tasks when quiet).
fn new_lot<T>(shared: &Shared, side: &str) -> Option<Arc<park::Lot<T>>> {
    if shared.settings.park_idle_after.is_zero() {
        return None;
    }
    let data = &shared.metrics.data;
    let idle_limit = Some(shared.settings.client_idle_timeout).filter(|t| !t.is_zero());
    match park::Lot::new(data.parked_connections.clone(), data.connection_parks.clone(), idle_limit) {
        Ok(lot) => Some(Arc::new(lot)),
        Err(e) => {
            tracing::warn!("{side}: quiet connections wait in their own tasks (no epoll set: {e})");
            None
        }
    }
}

/// Counts open connections so shutdown can wait for them to finish.
#[derive(Debug)]
pub struct Tracker {
    active: AtomicUsize,
    idle: Notify,
    /// Set on shutdown: HTTP connections finish their current request and close.
    drain: tokio::sync::watch::Sender<bool>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker { active: AtomicUsize::new(0), idle: Notify::new(), drain: tokio::sync::watch::Sender::new(false) }
    }
}

/// Held by a connection task; the count drops with it.
#[derive(Debug)]
pub struct Tracked(Arc<Tracker>);

impl Tracker {
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.active.fetch_add(1, Ordering::Relaxed);
        Tracked(Arc::clone(self))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Asks every HTTP connection to close once its request in progress is answered
    /// (idle keep-alive connections close at once).
    pub fn start_drain(&self) {
        self.drain.send_replace(true);
    }

    fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// Waits until no connection is open, or `timeout` passes; returns how many are left.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accepts inbound connections until the task is dropped. `app` is where to send them
/// when they were not redirected (local mode without iptables). Open connections are
/// counted in `tracker` and outlive this task, so shutdown can drain them.
/// Quiet plaintext HTTP/1 connections are parked in this listener's lot, still counted
/// as open; when the task is dropped (shutdown) they close with it.
pub async fn serve_inbound(listener: TcpListener, shared: Arc<Shared>, app: Option<SocketAddr>, tracker: Arc<Tracker>) {
    let lot = new_lot(&shared, "inbound");
    let weak = lot.as_ref().map(Arc::downgrade);
    let accepting = accept_loop(listener, "inbound", {
        let (shared, tracker) = (Arc::clone(&shared), Arc::clone(&tracker));
        move |stream| inbound(Arc::clone(&shared), stream, app, tracker.draining(), tracker.track(), weak.clone())
    });
    let Some(lot) = lot else { return accepting.await };
    let weak = Some(Arc::downgrade(&lot));
    let resume = |tcp, conn| {
        let io = Rewind::new(bytes::Bytes::new(), tcp);
        tokio::spawn(serve_inbound_http1(Arc::clone(&shared), conn, io, tracker.draining(), weak.clone()));
    };
    tokio::join!(accepting, lot.run(resume));
}

async fn accept_loop<F, Fut>(listener: TcpListener, name: &'static str, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; keep serving.
                tracing::warn!(listener = name, "accept failed: {e}; check the open-files limit");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn outbound(shared: Arc<Shared>, stream: TcpStream, lot: LotRef<ConnInfo>) {
    let dst = original_dst(&stream);
    let mesh = shared.mesh.load_full();
    let service = dst.and_then(|d| mesh.by_destination(d)).cloned();
    if let (Some(d), None) = (dst, &service) {
        // Not a mesh destination (an external API, the API server, a database):
        // exactly what the app asked for.
        shared.metrics.data.passthrough_connections.inc();
        // Boxed, like the other big arms: a task is as large as its largest state, and
        // a parked HTTP/1 connection should not pay for the states it is not in.
        if let Err(e) = Box::pin(tcp::splice(stream, d, shared.settings.connect_timeout)).await {
            tracing::debug!("outbound passthrough to {d}: {e}");
        }
        return;
    }
    let port = match (&service, dst) {
        (Some(s), Some(d)) => s.port(d.port()).copied(),
        _ => None,
    };
    let Some(io) = sniff(&shared, stream, dst.map(|d| d.port()), "outbound").await else { return };
    let protocol = io.1;
    let io = io.0;
    let conn = Arc::new(ConnInfo { original_dst: dst, service: service.clone(), port });
    match protocol {
        Protocol::Http1 => serve_http1(shared, conn, io, lot).await,
        Protocol::Http2 => Box::pin(serve_http2(shared, conn, io)).await,
        Protocol::Tls | Protocol::Tcp => {
            let target = match (&service, port) {
                (Some(s), Some(p)) => {
                    let cost = s.routes.default_op().cost.as_array();
                    s.endpoints.pick(&cost, None).ok().map(|c| {
                        let e = &s.endpoints.endpoints[c.index];
                        (s.target(e, &p), e.identity.clone())
                    })
                }
                _ => None,
            };
            match target {
                Some((t, identity)) => {
                    shared.metrics.data.outbound_tcp_connections.inc();
                    let tls = shared.mesh_tls();
                    if identity.is_some() && tls.is_none() {
                        shared.metrics.security.outbound_plaintext_to_meshed.inc();
                    }
                    let peer = tls.zip(identity.as_deref());
                    let timeout = shared.settings.connect_timeout;
                    let splice = Box::pin(tcp::splice_to_endpoint(io, t, peer, timeout, &shared.metrics));
                    if let Err(e) = splice.await {
                        tracing::debug!("outbound tcp to {t}: {e}");
                    }
                }
                None => tracing::info!(
                    "outbound: closing a {} connection with no destination (not HTTP, and not redirected to a mesh service)",
                    protocol.as_str()
                ),
            }
        }
    }
}

/// `held` counts the connection as open until it ends.
async fn inbound(
    shared: Arc<Shared>,
    stream: TcpStream,
    app: Option<SocketAddr>,
    drain: tokio::sync::watch::Receiver<bool>,
    held: Tracked,
    lot: LotRef<InboundConn>,
) {
    shared.metrics.data.inbound_connections.inc();
    let target = match (original_dst(&stream), app) {
        (Some(d), _) => {
            let lo = if d.is_ipv4() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) };
            SocketAddr::new(lo, d.port())
        }
        (None, Some(a)) => a,
        (None, None) => {
            tracing::info!("inbound: connection was not redirected and no --inbound-app-addr is set; closing");
            return;
        }
    };
    let Some((mut io, protocol)) = sniff(&shared, stream, Some(target.port()), "inbound").await else { return };
    // The policy of the service this pod serves (permissive, allow-all when none).
    let (service, policy) = match shared.mesh.load().service_of_pod(&shared.settings.pod) {
        Some(s) => (Arc::clone(&s.key), Arc::clone(&s.policy)),
        None => (Arc::from(""), crate::route::Authorizer::allow_all()),
    };
    if protocol == Protocol::Tls
        && let Some(tls) = shared.mesh_tls().cloned()
    {
        // Mesh mTLS names this proxy's identity in its ClientHello; an app's own TLS
        // does not, and is treated like plaintext (it proves no mesh identity).
        let (prefix, mut tcp) = io.into_parts();
        let record = match detect::read_tls_record(&mut tcp, prefix, shared.settings.detect_timeout).await {
            Ok(r) => r,
            Err(e) => return tracing::debug!("inbound: reading a ClientHello failed: {e}"),
        };
        let ours = crate::identity::tls::hello_server_name(&record).as_deref() == Some(tls.own_server_name.as_str());
        io = Rewind::new(record, tcp);
        if ours {
            return mesh_tls_inbound(shared, tls, io, target, drain, &service, &policy).await;
        }
    }
    let label = crate::metrics::ServiceLabel { service: service.to_string() };
    if !policy.admits_plaintext() {
        shared.metrics.security.plaintext_refused.get_or_create(&label).inc();
        tracing::info!(service = %service, "inbound: refused a {} connection without mesh mTLS (strict mode)", protocol.as_str());
        return match protocol {
            // An HTTP client gets a 403 that says why; anything else is reset.
            Protocol::Http1 | Protocol::Http2 => serve_refusal(&shared, io, protocol).await,
            Protocol::Tls | Protocol::Tcp => reset(io.into_parts().1),
        };
    }
    shared.metrics.security.plaintext_accepted.get_or_create(&label).inc();
    match protocol {
        // HTTP is served, so the pod's load can be measured and reported back.
        Protocol::Http1 => serve_inbound_http1(shared, InboundConn { app: target, _held: held }, io, drain, lot).await,
        Protocol::Http2 => serve_inbound_http(shared, target, io, protocol, drain, None).await,
        Protocol::Tls | Protocol::Tcp => {
            if let crate::route::Decision::Deny { reason } = policy.authorize(None, None) {
                return deny_connection(&shared, &service, None, reason, io.into_parts().1);
            }
            if let Err(e) = tcp::splice(io, target, shared.settings.connect_timeout).await {
                tracing::debug!("inbound to {target}: {e}");
            }
        }
    }
}

/// A mesh mTLS connection for this pod: terminate it, learn the caller's verified
/// identity, and serve what it carries (ALPN says HTTP/2 or HTTP/1.1; without ALPN the
/// bytes inside are detected like any connection's).
async fn mesh_tls_inbound(
    shared: Arc<Shared>,
    tls: Arc<crate::identity::MeshTls>,
    io: Rewind<TcpStream>,
    target: SocketAddr,
    drain: tokio::sync::watch::Receiver<bool>,
    service: &str,
    policy: &crate::route::Authorizer,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let handshake = tokio::time::timeout(shared.settings.detect_timeout, acceptor.accept(io)).await;
    let result = match &handshake {
        Ok(Ok(_)) => "ok",
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    };
    let label = crate::metrics::HandshakeLabel { direction: "inbound", result };
    shared.metrics.security.handshakes.get_or_create(&label).inc();
    let mut stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tracing::info!("inbound: mTLS handshake refused: {e}"),
        Err(_) => return tracing::info!("inbound: mTLS handshake timed out"),
    };
    let (peer, alpn) = {
        let conn = stream.get_ref().1;
        (crate::identity::tls::peer_identity(conn.peer_certificates()), conn.alpn_protocol().map(<[u8]>::to_vec))
    };
    if let Some(caller) = &peer {
        let label = crate::metrics::CallerLabel { caller: caller.to_string() };
        shared.metrics.security.inbound_by_caller.get_or_create(&label).inc();
    }
    let protocol = match alpn.as_deref() {
        Some(b"h2") => Protocol::Http2,
        Some(b"http/1.1") => Protocol::Http1,
        _ => match detect::detect(&mut stream, shared.settings.detect_timeout).await {
            Ok((p, prefix)) => {
                return mesh_opaque(shared, Rewind::new(prefix, stream), p, target, drain, peer, service, policy).await;
            }
            Err(e) => return tracing::debug!("inbound: reading inside mTLS failed: {e}"),
        },
    };
    serve_inbound_http(shared, target, Rewind::new(bytes::Bytes::new(), stream), protocol, drain, peer).await;
}

/// What a mesh mTLS connection without ALPN carries: HTTP is served, anything else is
/// authorized as a connection and spliced to the app.
#[allow(clippy::too_many_arguments)]
async fn mesh_opaque(
    shared: Arc<Shared>,
    io: Rewind<tokio_rustls::server::TlsStream<Rewind<TcpStream>>>,
    protocol: Protocol,
    target: SocketAddr,
    drain: tokio::sync::watch::Receiver<bool>,
    peer: Option<Arc<str>>,
    service: &str,
    policy: &crate::route::Authorizer,
) {
    match protocol {
        Protocol::Http1 | Protocol::Http2 => serve_inbound_http(shared, target, io, protocol, drain, peer).await,
        Protocol::Tls | Protocol::Tcp => {
            if let crate::route::Decision::Deny { reason } = policy.authorize(peer.as_deref(), None) {
                // The TCP connection under the TLS session is reset, like a plaintext one.
                let (_, tls) = io.into_parts();
                let (_, tcp) = tls.into_inner().0.into_parts();
                return deny_connection(&shared, service, peer.as_deref(), reason, tcp);
            }
            if let Err(e) = tcp::splice(io, target, shared.settings.connect_timeout).await {
                tracing::debug!("inbound to {target}: {e}");
            }
        }
    }
}

/// Closes `stream` with a reset (RST), so the caller sees a refusal, not an orderly end.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

/// A TCP connection policy denies: counted, logged, reset.
fn deny_connection(shared: &Shared, service: &str, peer: Option<&str>, reason: &str, stream: TcpStream) {
    shared
        .metrics
        .security
        .policy_denials
        .get_or_create(&crate::metrics::ServiceLabel { service: service.to_string() })
        .inc();
    tracing::info!(service, peer = peer.unwrap_or("-"), "inbound: denied a connection: {reason}");
    reset(stream);
}

/// Answers every request on a plaintext HTTP connection with 403 (strict mode).
async fn serve_refusal(shared: &Shared, io: Rewind<TcpStream>, protocol: Protocol) {
    let service = service_fn(|_req| async {
        let reason = crate::route::policy::DENY_PLAINTEXT;
        let mut r = http::Response::new(crate::forward::body::local(format!("{reason}\n")));
        *r.status_mut() = http::StatusCode::FORBIDDEN;
        r.headers_mut().insert(fwd::REASON, http::HeaderValue::from_static(crate::route::policy::DENY_PLAINTEXT));
        r.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        Ok::<_, std::convert::Infallible>(r)
    });
    let result = if protocol == Protocol::Http2 {
        http2_server().serve_connection(TokioIo::new(io), service).await
    } else {
        http1_server(shared).keep_alive(false).serve_connection(TokioIo::new(io), service).await
    };
    if let Err(e) = result {
        tracing::debug!("inbound: refusing plaintext HTTP: {e}");
    }
}

/// Protocol detection on a new connection, unless `port` is one where the server
/// speaks first. Returns the connection (its first bytes replayed) and its protocol;
/// None when it could not even be read.
async fn sniff(
    shared: &Shared,
    mut stream: TcpStream,
    port: Option<u16>,
    side: &str,
) -> Option<(Rewind<TcpStream>, Protocol)> {
    if port.is_some_and(|p| shared.settings.server_first_ports.contains(&p)) {
        return Some((Rewind::new(bytes::Bytes::new(), stream), Protocol::Tcp));
    }
    match detect::detect(&mut stream, shared.settings.detect_timeout).await {
        Ok((protocol, prefix)) => Some((Rewind::new(prefix, stream), protocol)),
        Err(e) => {
            tracing::debug!("{side}: reading the first bytes failed: {e}");
            None
        }
    }
}
