//! Source of config in local mode: a mesh file read and translated exactly as the
//! control plane would, then fed through the same applier (validate, publish) as the
//! stream. Edits to the file are picked up live. It must not publish by itself.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use neutrino_control_plane::index::specs::SpecRoutes;
use neutrino_control_plane::translate;
use neutrino_control_plane::watch::{SourceEvent, file::FileSource};
use tokio::sync::mpsc;

use super::stream::StreamStatus;
use super::{Applier, Update};

/// Runs until the process ends; endpoint identities in the default trust domain.
pub async fn run(path: PathBuf, applier: Applier, status: Arc<ArcSwap<StreamStatus>>) {
    run_in(path, translate::DEFAULT_TRUST_DOMAIN.to_string(), applier, status).await;
}

/// Runs until the process ends; meshed endpoints' identities are SPIFFE ids in
/// `trust_domain`, as the control plane given the same `--trust-domain` would make them.
pub async fn run_in(path: PathBuf, trust_domain: String, applier: Applier, status: Arc<ArcSwap<StreamStatus>>) {
    let shown = path.display().to_string();
    status.store(Arc::new(StreamStatus { control_plane: shown.clone(), state: "local".into(), ..Default::default() }));
    let (tx, mut rx) = mpsc::channel(2);
    tokio::spawn(FileSource::new(path).run(tx));
    let mut specs = SpecRoutes::default();
    while let Some(event) = rx.recv().await {
        let mesh = match event {
            SourceEvent::Updated(mesh) => mesh,
            SourceEvent::Failed(why) => {
                tracing::error!("config: {why}");
                set_error(&status, why);
                continue;
            }
        };
        let current = applier.current();
        let resolved = specs.resolve(&mesh);
        for (service, why) in &resolved.errors {
            tracing::error!(%service, "config: {why}; keeping its last good routes");
        }
        let mut types = translate::config(&mesh, &resolved.routes, &trust_domain);
        // No proxy reports load in file mode: every endpoint's load is unknown.
        types.extend(translate::capacity(&mesh, &Default::default(), 0));
        let mut updates = Vec::new();
        for (type_url, wanted) in types {
            let held = current.resources(type_url);
            let upserts = wanted
                .values()
                .filter(|r| held.and_then(|h| h.get(&r.name)).map(|h| &h.version) != Some(&r.version))
                .map(|r| neutrino_proto::Resource::clone(r))
                .collect();
            let removed =
                held.map(|h| h.keys().filter(|n| !wanted.contains_key(*n)).cloned().collect()).unwrap_or_default();
            updates.push(Update { type_url: type_url.to_string(), upserts, removed });
        }
        // All types at once, so a rejected Service never leaves new Endpoints behind.
        match applier.apply_all(updates) {
            Ok(snapshot) => {
                tracing::info!(file = %shown, generation = snapshot.generation, "config: applied local config");
                set_error(&status, None::<String>);
            }
            Err(problems) => {
                let reasons: Vec<String> = problems.iter().map(ToString::to_string).collect();
                let why = format!("{shown}: rejected, keeping the last good config: {}", reasons.join("; "));
                tracing::error!("config: {why}");
                set_error(&status, why);
            }
        }
    }
}

fn set_error(status: &ArcSwap<StreamStatus>, why: impl Into<Option<String>>) {
    let mut s = StreamStatus::clone(&status.load());
    s.last_error = why.into();
    status.store(Arc::new(s));
}
