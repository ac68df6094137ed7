//! The proxy's admin endpoints on port 15020: `/live`, `/ready`, `/metrics` and
//! `/config_dump`. Read-only views of the config store and the stream status.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use neutrino_admin::Reply;
use serde_json::json;

use crate::config::ConfigStore;
use crate::config::stream::StreamStatus;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct AdminState {
    pub store: Arc<ConfigStore>,
    pub stream: Arc<ArcSwap<StreamStatus>>,
    pub metrics: Arc<Metrics>,
    /// The data path's view, for per-operation and per-endpoint metrics.
    pub mesh: Arc<ArcSwap<crate::route::Mesh>>,
    /// Set on shutdown: /ready turns 503 so no new traffic is sent here.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// With identity configured, the proxy is ready only once it holds a certificate.
    pub tls: Option<Arc<crate::identity::MeshTls>>,
}

pub fn handle(state: &AdminState, path: &str) -> Reply {
    match path {
        "/live" => Reply::text(200, "live\n"),
        "/ready" => {
            let snap = state.store.load();
            if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
                Reply::text(503, "not ready: shutting down\n")
            } else if state.tls.as_ref().is_some_and(|t| !t.has_certificate()) {
                Reply::text(503, "not ready: no certificate yet from the control plane's Identity service\n")
            } else if snap.is_ready() && state.mesh.load().is_ready() {
                // Ready once the data path has compiled the config, not only received it:
                // a request sent right after /ready says 200 must find its service.
                Reply::text(200, format!("ready: config generation {}\n", snap.generation))
            } else {
                let stream = state.stream.load();
                let why = stream.last_error.as_deref().unwrap_or("waiting for the first valid config");
                Reply::text(503, format!("not ready: {why}\n"))
            }
        }
        "/metrics" => {
            let snap = state.store.load();
            let routes = crate::telemetry::route_metrics::RouteCollector { mesh: Arc::clone(&state.mesh) };
            Reply::metrics(state.metrics.encode(snap.generation, snap.is_ready(), Some(routes)))
        }
        "/config_dump" => Reply::json(200, config_dump(state)),
        other => Reply::not_found(other),
    }
}

fn config_dump(state: &AdminState) -> Vec<u8> {
    let snap = state.store.load();
    let mut resources = BTreeMap::new();
    for (t, map) in &snap.types {
        let items: BTreeMap<&str, serde_json::Value> =
            map.iter().map(|(n, r)| (n.as_str(), json!({ "version": r.version, "body": r.body }))).collect();
        resources.insert(neutrino_proto::type_url::short(t).to_string(), items);
    }
    let dump = json!({
        "ready": snap.is_ready(),
        "generation": snap.generation,
        "resources": resources,
        "stream": &**state.stream.load(),
        "identity": state.tls.as_ref().map(|t| t.status()),
    });
    serde_json::to_vec_pretty(&dump).unwrap_or_default()
}
