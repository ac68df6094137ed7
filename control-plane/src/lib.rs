//! The Neutrino control plane: watch -> index -> translate -> serve.
//!
//! `watch` turns a discovery source into whole mesh views; `index` (the single writer
//! of config) debounces, translates and publishes immutable snapshots; `load` (the
//! single writer of the capacity lane) aggregates the proxies' load reports, shared
//! across replicas through Redis; `serve` streams each proxy what it subscribed to and
//! lacks, and takes in its load reports. `admin` exposes health, metrics and a dump.

pub mod admin;
pub mod debounce;
pub mod index;
pub mod load;
pub mod metrics;
pub mod model;
pub mod quantity;
pub mod serve;
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

#[derive(Debug)]
pub struct Settings {
    pub source: Source,
    /// The SPIFFE trust domain of every identity in the mesh (e.g. cluster.local).
    pub trust_domain: String,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub debounce: DebounceSettings,
    pub serve: ServeSettings,
    pub load: load::LoadSettings,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("binding {what} on {addr}: {source}; is another process using the port?")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("serving gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Runs the control plane until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    let metrics = Arc::new(metrics::Metrics::default());
    let registry = Arc::new(Registry::default());
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(4);
    let (mesh_tx, mesh_rx) = tokio::sync::watch::channel(None);
    let load = load::spawn(mesh_rx, settings.load, Arc::clone(&metrics));
    let published =
        index::spawn(settings.source.describe(), events_rx, settings.debounce, Arc::clone(&metrics), mesh_tx, &load);
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
    };
    tokio::spawn(neutrino_admin::serve(admin_listener, move |path| admin::handle(&admin_state, path)));

    let grpc_listener = TcpListener::bind(settings.grpc_addr).await.map_err(|source| RunError::Bind {
        what: "discovery gRPC",
        addr: settings.grpc_addr,
        source,
    })?;
    tracing::info!(grpc = %settings.grpc_addr, admin = %settings.admin_addr, "control plane listening");
    let service = DiscoveryService::new(published, metrics, registry, settings.serve, load.sink);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(grpc_listener), shutdown)
        .await?;
    Ok(())
}
