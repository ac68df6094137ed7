//! The control plane's admin endpoints: `/live`, `/ready`, `/metrics`, `/config_dump`.
//! Read-only views over the index, the registry and the metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use neutrino_admin::Reply;
use serde_json::json;

use crate::index::Published;
use crate::metrics::Metrics;
use crate::serve::registry::Registry;

#[derive(Debug, Clone)]
pub struct AdminState {
    pub published: Published,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    /// The CA's status, when identity is on.
    pub identity: Option<Arc<arc_swap::ArcSwap<crate::identity::IdentityStatus>>>,
}

pub fn handle(state: &AdminState, path: &str) -> Reply {
    match path {
        "/live" => Reply::text(200, "live\n"),
        "/ready" => {
            let status = state.published.status.load();
            if status.synced {
                // Without Redis this replica still serves (its own proxies' loads): ready,
                // but the detail says what is missing.
                let share = state.published.share.load();
                let detail = match (share.state.as_str(), &share.last_error) {
                    ("degraded", why) => format!(
                        "; load sharing degraded ({}): serving this replica's own reports",
                        why.as_deref().unwrap_or("not connected yet")
                    ),
                    _ => String::new(),
                };
                Reply::text(200, format!("ready: generation {}{detail}\n", status.generation))
            } else {
                let why = status.last_error.as_deref().unwrap_or("waiting for the first discovery sync");
                Reply::text(503, format!("not ready: {why}\n"))
            }
        }
        "/metrics" => Reply::metrics(state.metrics.encode()),
        "/config_dump" => Reply::json(200, config_dump(state)),
        other => Reply::not_found(other),
    }
}

fn config_dump(state: &AdminState) -> Vec<u8> {
    let config = state.published.config.borrow().clone();
    let capacity = state.published.capacity.borrow().clone();
    let identity = state.published.identity.borrow().clone();
    let mut resources = BTreeMap::new();
    for snap in [&config, &capacity, &identity] {
        for (t, map) in &snap.by_type {
            let versions: BTreeMap<&str, &str> = map.iter().map(|(n, r)| (n.as_str(), r.version.as_str())).collect();
            resources.insert(neutrino_proto::type_url::short(t).to_string(), json!(versions));
        }
    }
    let dump = json!({
        "source": &**state.published.status.load(),
        "load_sharing": &**state.published.share.load(),
        "generation": config.generation,
        "resources": resources,
        "proxies": state.registry.list(),
        "identity": state.identity.as_ref().map(|s| json!(&**s.load())),
    });
    serde_json::to_vec_pretty(&dump).unwrap_or_default()
}
