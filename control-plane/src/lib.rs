//! The Neutrino control plane: watch -> index -> translate -> serve.
//!
//! `watch` turns a discovery source into whole mesh views; `index` (the single writer
//! of config) debounces, translates and publishes immutable snapshots; `load` (the
//! single writer of the capacity lane) aggregates the proxies' load reports, shared
//! across replicas through Redis; `serve` streams each proxy what it subscribed to and
//! lacks, and takes in its load reports. `identity` (when a CA is configured) signs
//! workload certificates, writes the trust-bundle lane and serves Discovery and
//! Identity over TLS on 15012. `admin` exposes health, metrics and a dump.

pub mod admin;
pub mod debounce;
pub mod identity;
pub mod index;
pub mod load;
pub mod metrics;
pub mod model;
pub mod quantity;
pub mod serve;
pub mod trace;
pub mod translate;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;

use index::DebounceSettings;
use serve::{DiscoveryService, ServeSettings, registry::Registry};
use watch::Source;

/// Default ports (see ARCHITECTURE.md).
pub const GRPC_PORT: u16 = 15010;
pub const ADMIN_PORT: u16 = 15014;
/// Discovery and Identity over TLS (issue 7), when a CA is configured.
pub const TLS_GRPC_PORT: u16 = 15012;

#[derive(Debug)]
pub struct Settings {
    pub source: Source,
    /// The SPIFFE trust domain of every identity in the mesh (e.g. cluster.local).
    pub trust_domain: String,
    /// Where push spans go (`--otlp-endpoint`); None: the `OTEL_*` variables decide.
    pub otlp_endpoint: Option<String>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub debounce: DebounceSettings,
    pub serve: ServeSettings,
    pub load: load::LoadSettings,
    /// The mesh CA and TLS on 15012; None: no CA, plaintext 15010 only.
    pub identity: Option<identity::IdentitySettings>,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("binding {what} on {addr}: {source}; is another process using the port?")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("serving gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("identity: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error("OTLP trace exporter: {0}; check --otlp-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT")]
    Trace(String),
}

/// Runs the control plane until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    let metrics = Arc::new(metrics::Metrics::default());
    let registry = Arc::new(Registry::default());
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(4);
    let (mesh_tx, mesh_rx) = tokio::sync::watch::channel(None);
    let load = load::spawn(mesh_rx, settings.load, Arc::clone(&metrics));
    // Without a CA the trust-bundle lane stays empty; its sender lives as long as `run`.
    let (identity, identity_lane, _empty_lane) = match &settings.identity {
        Some(s) => {
            let (started, lane) = identity::start(s, &settings.trust_domain, Arc::clone(&metrics))?;
            (Some((started, s.tls_addr)), lane, None)
        }
        None => {
            let (tx, rx) = identity::empty_lane();
            (None, rx, Some(tx))
        }
    };
    let published = index::spawn(
        settings.trust_domain.clone(),
        settings.source.describe(),
        events_rx,
        settings.debounce,
        Arc::clone(&metrics),
        mesh_tx,
        &load,
        identity_lane,
    );
    tokio::spawn(settings.source.run(events_tx));

    let admin_listener = TcpListener::bind(settings.admin_addr).await.map_err(|source| RunError::Bind {
        what: "admin HTTP",
        addr: settings.admin_addr,
        source,
    })?;
    let admin_state = admin::AdminState {
        published: published.clone(),
        metrics: Arc::clone(&metrics),
        registry: Arc::clone(&registry),
        identity: identity.as_ref().map(|(started, _)| Arc::clone(&started.status)),
    };
    tokio::spawn(neutrino_admin::serve(admin_listener, move |path| admin::handle(&admin_state, path)));

    let grpc_listener = TcpListener::bind(settings.grpc_addr).await.map_err(|source| RunError::Bind {
        what: "discovery gRPC",
        addr: settings.grpc_addr,
        source,
    })?;
    tracing::info!(grpc = %settings.grpc_addr, admin = %settings.admin_addr, "control plane listening");
    let counters = neutrino_otel::Counters {
        exported: metrics.trace_spans_exported.clone(),
        dropped: metrics.trace_spans_dropped.clone(),
        export_failures: metrics.trace_export_failures.clone(),
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let replica = format!("{}-{}", host.trim(), std::process::id());
    let tracer = trace::PushTracer::start(settings.otlp_endpoint.as_deref(), &replica, counters)
        .map_err(RunError::Trace)?
        .map(Arc::new);
    let mut serve_settings = settings.serve;
    serve_settings.tracer = tracer.clone();
    let service = DiscoveryService::new(published, Arc::clone(&metrics), registry, serve_settings, load.sink);
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let tls = match identity {
        Some((started, addr)) => {
            let listener = TcpListener::bind(addr).await.map_err(|source| RunError::Bind {
                what: "discovery and identity gRPC over TLS",
                addr,
                source,
            })?;
            let config = identity::tls::server_config(Arc::clone(&started.resolver))
                .map_err(|e| RunError::Identity(identity::IdentityError::Tls(e)))?;
            let incoming = identity::tls::incoming(listener, config, Arc::clone(&metrics));
            let ids = identity::service::IdentityService::new(
                started.ca,
                started.validator,
                settings.trust_domain.clone(),
                Arc::clone(&metrics),
            );
            tracing::info!(tls = %addr, "serving Discovery and Identity over TLS");
            let server = grpc_server()
                .add_service(service.clone().into_server())
                .add_service(ids.into_server())
                .serve_with_incoming_shutdown(incoming, shutdown.clone());
            Some(tokio::spawn(server))
        }
        None => None,
    };
    // Port 15010 stays plaintext Discovery only: tokens never cross it.
    grpc_server()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc_listener), shutdown)
        .await?;
    if let Some(tls) = tls {
        match tls.await {
            Ok(result) => result?,
            Err(e) => tracing::error!("TLS server task: {e}"),
        }
    }
    if let Some(t) = tracer {
        t.shutdown().await;
    }
    Ok(())
}

fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}
