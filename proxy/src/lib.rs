//! The Neutrino sidecar proxy.
//!
//! Config path (this crate today): `config::stream` or `config::file` -> `config`
//! (validate, publish snapshot) -> readers. The data path (accept, detect, route,
//! select, forward, telemetry) reads those snapshots.

pub mod admin;
pub mod config;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::net::TcpListener;

use config::stream::{StreamSettings, StreamStatus};
use config::{Applier, ConfigStore};

/// The proxy's admin port (see ARCHITECTURE.md).
pub const ADMIN_PORT: u16 = 15020;

#[derive(Debug)]
pub enum ConfigSource {
    Stream(StreamSettings),
    File(PathBuf),
}

#[derive(Debug)]
pub struct Settings {
    pub config: ConfigSource,
    pub admin_addr: SocketAddr,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("binding {what} on {addr}: {source}; is another process using the port?")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// A running proxy's shared parts, for embedding (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct Handles {
    pub store: Arc<ConfigStore>,
    pub stream: Arc<ArcSwap<StreamStatus>>,
    pub metrics: Arc<metrics::Metrics>,
}

/// Starts the config source; returns handles to what it publishes.
pub fn start_config(source: ConfigSource) -> Handles {
    let store = Arc::new(ConfigStore::default());
    let stream = Arc::new(ArcSwap::from_pointee(StreamStatus::default()));
    let metrics = Arc::new(metrics::Metrics::default());
    let applier = Applier::new(Arc::clone(&store));
    match source {
        ConfigSource::Stream(s) => {
            tokio::spawn(config::stream::run(s, applier, Arc::clone(&stream), Arc::clone(&metrics)));
        }
        ConfigSource::File(path) => {
            tokio::spawn(config::file::run(path, applier, Arc::clone(&stream)));
        }
    }
    Handles { store, stream, metrics }
}

/// Runs the proxy until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let admin_listener = TcpListener::bind(settings.admin_addr).await.map_err(|source| RunError::Bind {
        what: "admin HTTP",
        addr: settings.admin_addr,
        source,
    })?;
    let handles = start_config(settings.config);
    let state = admin::AdminState { store: handles.store, stream: handles.stream, metrics: handles.metrics };
    tracing::info!(admin = %settings.admin_addr, "proxy started");
    tokio::select! {
        () = neutrino_admin::serve(admin_listener, move |path| admin::handle(&state, path)) => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    Ok(())
}
