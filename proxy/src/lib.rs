//! The Neutrino sidecar proxy.
//!
//! Config path: `config::stream` or `config::file` -> `config` (validate, publish
//! snapshot) -> `route::Mesh::compile` (the data path's view, published by one task).
//! Data path: `accept` -> `detect` -> `route` -> `select` -> `forward`.

pub mod accept;
pub mod admin;
pub mod config;
pub mod detect;
pub mod forward;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod route;
pub mod select;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::net::TcpListener;

use config::stream::{StreamSettings, StreamStatus};
use config::{Applier, ConfigStore};

/// The proxy's ports (see ARCHITECTURE.md).
pub const ADMIN_PORT: u16 = 15020;
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;

#[derive(Debug)]
pub enum ConfigSource {
    Stream(StreamSettings),
    /// A mesh file, and the trust domain its service accounts' SPIFFE ids are in.
    File(PathBuf, String),
}

#[derive(Debug)]
pub struct Settings {
    pub config: ConfigSource,
    pub admin_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    /// Where inbound connections go when they were not redirected by iptables.
    pub inbound_app_addr: Option<SocketAddr>,
    /// On shutdown, how long open inbound connections may take to finish.
    pub drain_timeout: std::time::Duration,
    /// Where the request log goes, if anywhere.
    pub request_log: Option<telemetry::request_log::Settings>,
    /// Where trace spans go (OTLP/gRPC), if tracing is on.
    pub tracing: Option<telemetry::trace::Settings>,
    /// The mesh identity to obtain and use for mTLS, if configured (stream mode only).
    pub identity: Option<identity::IdentitySettings>,
    pub data: forward::DataSettings,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("binding {what} on {addr}: {source}; is another process using the port?")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("request log: {0}; check --redis-url (e.g. redis://127.0.0.1:6379)")]
    RequestLog(#[from] redis::RedisError),
    #[error(transparent)]
    Trace(#[from] telemetry::trace::TraceError),
    #[error("identity: {0}")]
    Identity(#[from] identity::IdentityError),
}

/// The latest out-of-band load report of this proxy's pod.
pub type LoadReports = tokio::sync::watch::Receiver<Option<neutrino_proto::LoadReport>>;

/// A running proxy's shared parts, for embedding (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct Handles {
    pub store: Arc<ConfigStore>,
    pub stream: Arc<ArcSwap<StreamStatus>>,
    pub metrics: Arc<metrics::Metrics>,
}

/// Starts the config source; returns handles to what it publishes. In stream mode,
/// `reports` (the pod's load, see `telemetry::load_report`) go to the control plane.
pub fn start_config(source: ConfigSource, reports: Option<LoadReports>) -> Handles {
    let store = Arc::new(ConfigStore::default());
    let stream = Arc::new(ArcSwap::from_pointee(StreamStatus::default()));
    let metrics = Arc::new(metrics::Metrics::default());
    let applier = Applier::new(Arc::clone(&store));
    match source {
        ConfigSource::Stream(s) => {
            tokio::spawn(config::stream::run(s, applier, Arc::clone(&stream), Arc::clone(&metrics), reports));
        }
        ConfigSource::File(path, trust_domain) => {
            tokio::spawn(config::file::run_in(path, trust_domain, applier, Arc::clone(&stream)));
        }
    }
    Handles { store, stream, metrics }
}

/// Runs the proxy until `shutdown` resolves.
pub async fn run(mut settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let tls = match &settings.identity {
        Some(id) => Some(identity::load(id)?),
        None => None,
    };
    if let (ConfigSource::Stream(s), Some(t)) = (&mut settings.config, &tls) {
        s.trust = Some(Arc::clone(&t.trust));
    }
    let admin_listener = TcpListener::bind(settings.admin_addr).await.map_err(|source| RunError::Bind {
        what: "admin HTTP",
        addr: settings.admin_addr,
        source,
    })?;
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| RunError::Bind { what, addr, source })
    };
    let outbound = bind("outbound listener", settings.outbound_addr).await?;
    let inbound = bind("inbound listener", settings.inbound_addr).await?;
    // ip6tables sends IPv6 traffic to the same ports on IPv6 addresses: listen there
    // too (below). Known now so that forward can refuse requests that would loop.
    let v6_outbound = (settings.outbound_addr.ip() == std::net::Ipv4Addr::LOCALHOST)
        .then(|| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, settings.outbound_addr.port())));
    settings.data.outbound_listeners = outbound.local_addr().into_iter().chain(v6_outbound).collect();
    let mesh = Arc::new(ArcSwap::from_pointee(route::Mesh::default()));
    let pod_load = Arc::new(forward::inbound::PodLoad::default());
    let reports = match &settings.config {
        ConfigSource::Stream(s) => {
            Some(telemetry::load_report::spawn(Arc::clone(&pod_load), Arc::clone(&mesh), s.node.pod.clone()))
        }
        ConfigSource::File(..) => None,
    };
    let cp_addrs = match &settings.config {
        ConfigSource::Stream(s) => config::stream::addresses(&s.control_plane),
        ConfigSource::File(..) => Vec::new(),
    };
    let handles = start_config(settings.config, reports);
    if let (Some(t), Some(id)) = (&tls, settings.identity.clone()) {
        tokio::spawn(identity::certify::run(Arc::clone(t), id, cp_addrs, Arc::clone(&handles.metrics)));
        tokio::spawn(follow_trust_bundle(Arc::clone(&handles.store), Arc::clone(&t.trust)));
    }
    tokio::spawn(compile_mesh(Arc::clone(&handles.store), Arc::clone(&mesh)));
    let request_log = match settings.request_log {
        Some(s) => Some(telemetry::request_log::spawn(
            s,
            handles.metrics.data.request_log_written.clone(),
            handles.metrics.data.request_log_dropped.clone(),
        )?),
        None => None,
    };
    let traces = match &settings.tracing {
        Some(t) => {
            let d = &handles.metrics.data;
            let counters = telemetry::trace::Counters {
                exported: d.trace_spans_exported.clone(),
                dropped: d.trace_spans_dropped.clone(),
                export_failures: d.trace_export_failures.clone(),
            };
            Some(Arc::new(telemetry::trace::Tracing::start(t, counters)?))
        }
        None => None,
    };
    let shared = Arc::new(forward::Shared {
        mesh: Arc::clone(&mesh),
        upstreams: forward::Upstreams::new(
            &settings.data,
            tls.clone(),
            Arc::clone(&mesh),
            Arc::clone(&handles.metrics),
        ),
        settings: settings.data,
        retry_budget: Default::default(),
        metrics: Arc::clone(&handles.metrics),
        pod_load,
        app_conns: Default::default(),
        request_log,
        tracing: traces.clone(),
        tls: tls.clone(),
    });
    let admin_mesh = Arc::clone(&shared.mesh);
    tokio::spawn(forward::pool::reap_stale(Arc::clone(&shared)));
    tokio::spawn(accept::give_back_memory(shared.metrics.data.connection_parks.clone()));
    tokio::spawn(accept::serve_outbound(outbound, Arc::clone(&shared)));
    // Best effort, as a pod may have IPv6 disabled.
    if let Some(l) = v6_outbound.and_then(|a| accept::bind_v6_only(a).ok()) {
        tokio::spawn(accept::serve_outbound(l, Arc::clone(&shared)));
    }
    let tracker = Arc::new(accept::Tracker::default());
    let v6_inbound = settings
        .inbound_addr
        .ip()
        .is_unspecified()
        .then(|| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, settings.inbound_addr.port())))
        .filter(|_| settings.inbound_addr.is_ipv4());
    let inbound_v6_task = v6_inbound.and_then(|a| accept::bind_v6_only(a).ok()).map(|l| {
        tokio::spawn(accept::serve_inbound(l, Arc::clone(&shared), settings.inbound_app_addr, Arc::clone(&tracker)))
    });
    let inbound_task =
        tokio::spawn(accept::serve_inbound(inbound, shared, settings.inbound_app_addr, Arc::clone(&tracker)));
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = admin::AdminState {
        mesh: admin_mesh,
        store: handles.store,
        stream: handles.stream,
        metrics: handles.metrics,
        draining: Arc::clone(&draining),
        tls,
    };
    tokio::spawn(neutrino_admin::serve(admin_listener, move |path| admin::handle(&state, path)));
    tracing::info!(
        admin = %settings.admin_addr, outbound = %settings.outbound_addr, inbound = %settings.inbound_addr,
        "proxy started"
    );
    shutdown.await;
    // Graceful shutdown: report not ready, stop taking new inbound connections, let the
    // open ones finish. Outbound keeps working meanwhile: the app may still be
    // finishing its own requests.
    draining.store(true, std::sync::atomic::Ordering::Relaxed);
    inbound_task.abort();
    if let Some(t) = inbound_v6_task {
        t.abort();
    }
    tracker.start_drain();
    let open = tracker.active();
    tracing::info!(open, timeout = ?settings.drain_timeout, "shutting down: draining inbound connections");
    let left = tracker.wait_idle(settings.drain_timeout).await;
    if left > 0 {
        tracing::warn!(left, "drain timeout reached; closing the remaining inbound connections");
    }
    if let Some(t) = traces {
        t.shutdown().await;
    }
    Ok(())
}

/// The one writer of the data path's [`route::Mesh`]: recompiles it after every
/// published config snapshot, off the request path.
async fn compile_mesh(store: Arc<ConfigStore>, mesh: Arc<ArcSwap<route::Mesh>>) {
    let mut published = store.subscribe();
    loop {
        let snapshot = store.load();
        let next = route::Mesh::compile(&snapshot, &mesh.load());
        mesh.store(Arc::new(next));
        if published.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps the trust anchors in step with the bundle the control plane pushes (the
/// one writer of them after start-up, with `certify`'s first answer).
async fn follow_trust_bundle(store: Arc<ConfigStore>, trust: Arc<identity::tls::Trust>) {
    let mut published = store.subscribe();
    loop {
        let snapshot = store.load();
        let bundle =
            snapshot.resources(neutrino_proto::type_url::TRUST_BUNDLE).and_then(|m| m.values().next().cloned());
        if let Some(neutrino_proto::resource::Body::TrustBundle(b)) = bundle.as_ref().and_then(|r| r.body.as_ref()) {
            match trust.replace(&b.anchors_pem) {
                Ok(true) => tracing::info!(anchors = b.anchors_pem.len(), "identity: trust anchors updated"),
                Ok(false) => {}
                Err(e) => tracing::warn!("identity: pushed trust bundle not used: {e}"),
            }
        }
        if published.changed().await.is_err() {
            return;
        }
    }
}

/// An error and its causes on one line (hyper's and tonic's errors say little alone).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
