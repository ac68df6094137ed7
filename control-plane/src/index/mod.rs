//! Index: the single writer of the control plane's config. It takes whole mesh views
//! from a source, debounces them, translates them and publishes immutable snapshots on
//! the config lane that every stream reads, and hands each view to `load`, the writer
//! of the capacity lane. It must not talk to proxies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::debounce::Debounce;
use crate::metrics::Metrics;
use crate::model::MeshState;
use crate::translate::{self, Snapshot};
use crate::watch::SourceEvent;

pub mod specs;

/// What the admin endpoints show about discovery.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStatus {
    pub source: String,
    /// Set once a first valid view has been published.
    pub synced: bool,
    pub generation: u64,
    pub last_error: Option<String>,
    /// Services whose OpenAPI document is broken; they keep their last good routes.
    pub openapi_errors: std::collections::BTreeMap<String, String>,
    pub services: usize,
    pub endpoints: usize,
}

/// The read side of the index, cloned into every stream and the admin server.
#[derive(Debug, Clone)]
pub struct Published {
    pub config: watch::Receiver<Arc<Snapshot>>,
    /// Written by `load`.
    pub capacity: watch::Receiver<Arc<Snapshot>>,
    pub status: Arc<ArcSwap<SourceStatus>>,
    /// Load sharing between replicas, as `load` sees it.
    pub share: Arc<ArcSwap<crate::load::ShareStatus>>,
    /// The trust-bundle lane, written by the CA task (`identity`); empty without a CA.
    pub identity: watch::Receiver<Arc<Snapshot>>,
}

#[derive(Debug, Clone, Copy)]
pub struct DebounceSettings {
    pub quiet: Duration,
    pub max_delay: Duration,
}

/// Starts the index task. It ends when the source's sender is dropped. Each published
/// view also goes to `mesh` (for the capacity lane, `load`). Endpoint identities are
/// SPIFFE ids in `trust_domain`.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    trust_domain: String,
    source_name: String,
    mut events: mpsc::Receiver<SourceEvent>,
    debounce: DebounceSettings,
    metrics: Arc<Metrics>,
    mesh_tx: watch::Sender<Option<Arc<MeshState>>>,
    load: &crate::load::Started,
    identity: watch::Receiver<Arc<Snapshot>>,
) -> Published {
    let (config_tx, config_rx) = watch::channel(Arc::new(Snapshot::default()));
    let status = Arc::new(ArcSwap::from_pointee(SourceStatus { source: source_name, ..Default::default() }));
    let published = Published {
        config: config_rx,
        capacity: load.capacity.clone(),
        status: Arc::clone(&status),
        share: Arc::clone(&load.status),
        identity,
    };

    tokio::spawn(async move {
        let mut timer = Debounce::new(debounce.quiet, debounce.max_delay);
        let mut pending: Option<MeshState> = None;
        let mut specs = specs::SpecRoutes::default();
        let mut generation = 0u64;
        loop {
            let deadline = timer.deadline();
            tokio::select! {
                ev = events.recv() => match ev {
                    None => return,
                    Some(SourceEvent::Updated(mesh)) => {
                        pending = Some(mesh);
                        timer.change(Instant::now());
                    }
                    Some(SourceEvent::Failed(why)) => {
                        tracing::error!("discovery: {why}");
                        metrics.source_errors.inc();
                        // The source's latest word is that it has no valid view: drop any
                        // pending one (it may be a half-written file that happened to
                        // parse) and keep serving the last published view.
                        if pending.take().is_some() {
                            timer = Debounce::new(debounce.quiet, debounce.max_delay);
                        }
                        let mut s = SourceStatus::clone(&status.load());
                        s.last_error = Some(why);
                        status.store(Arc::new(s));
                    }
                },
                () = sleep_until(deadline), if deadline.is_some() => {
                    if !timer.take_due(Instant::now()) {
                        continue;
                    }
                    let Some(mesh) = pending.take() else { continue };
                    let resolved = specs.resolve(&mesh);
                    for (service, why) in &resolved.errors {
                        tracing::error!(%service, "index: {why}; keeping its last good routes");
                        metrics.openapi_errors.inc();
                    }
                    let next = generation + 1;
                    let config = Snapshot::succeed(&config_tx.borrow(), next, translate::config(&mesh, &resolved.routes, &trust_domain));
                    let first = generation == 0;
                    if config.is_some() || first {
                        generation = next;
                        metrics.snapshot_generation.set(i64::try_from(generation).unwrap_or(i64::MAX));
                        metrics.snapshots_published.inc();
                        tracing::info!(generation, services = mesh.services.len(), "index: publishing snapshot");
                    }
                    // The first snapshot goes out even when empty: it is what makes
                    // streams (and so proxies) ready.
                    let empty = || Snapshot { generation: next, ..Default::default() };
                    if let Some(c) = config.or_else(|| first.then(empty)) {
                        config_tx.send_replace(Arc::new(c));
                    }
                    let endpoints = mesh.services.values().map(|s| s.endpoints.len()).sum();
                    let mut s = SourceStatus::clone(&status.load());
                    s.synced = true;
                    s.generation = generation;
                    s.last_error = None;
                    s.openapi_errors = resolved.errors;
                    s.services = mesh.services.len();
                    s.endpoints = endpoints;
                    status.store(Arc::new(s));
                    mesh_tx.send_replace(Some(Arc::new(mesh)));
                }
            }
        }
    });
    published
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await;
    }
}
