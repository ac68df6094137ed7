//! The proxy's one config path: a source (the control-plane stream, or a local file)
//! hands updates to the [`Applier`], which validates each as a whole and, if it passes,
//! publishes a new immutable [`Snapshot`]. Readers load snapshots without locks.
//!
//! The applier is the only writer. A rejected update changes nothing: the last good
//! snapshot stays in place.

pub mod file;
pub mod stream;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use neutrino_proto::{Resource, type_url};
use tokio::sync::watch;

pub use validate::Problem;

/// One type's resources, by name.
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// The types that must have arrived before the proxy is ready to route. `Policy` is
/// among them: a proxy that served before its policies arrived would let through
/// callers its services refuse.
pub const REQUIRED_TYPES: [&str; 3] = [type_url::SERVICE, type_url::ENDPOINTS, type_url::POLICY];

/// An immutable, validated config.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Counts published snapshots in this process.
    pub generation: u64,
    pub types: BTreeMap<String, Arc<ResourceMap>>,
    /// Types that have had at least one update applied.
    pub synced: BTreeSet<String>,
}

impl Snapshot {
    pub fn resources(&self, type_url: &str) -> Option<&ResourceMap> {
        self.types.get(type_url).map(|m| m.as_ref())
    }

    /// Ready once every required type has been applied once (possibly empty).
    pub fn is_ready(&self) -> bool {
        REQUIRED_TYPES.iter().all(|t| self.synced.contains(*t))
    }

    /// name -> version of one type, as sent on reconnect so nothing unchanged is resent.
    pub fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.resources(type_url)
            .map(|m| m.iter().map(|(n, r)| (n.clone(), r.version.clone())).collect())
            .unwrap_or_default()
    }
}

/// Where readers get the current snapshot.
#[derive(Debug)]
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    /// Carries the generation of every published snapshot, for tasks that react to
    /// config changes (never needed on the request path: that just loads).
    published: watch::Sender<u64>,
}

impl Default for ConfigStore {
    fn default() -> Self {
        ConfigStore { current: ArcSwap::default(), published: watch::Sender::new(0) }
    }
}

impl ConfigStore {
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Wakes on every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }
}

/// An update for one type: what to add or replace, and what to remove.
#[derive(Debug, Clone, Default)]
pub struct Update {
    pub type_url: String,
    pub upserts: Vec<Resource>,
    pub removed: Vec<String>,
}

/// The single writer of a [`ConfigStore`].
#[derive(Debug)]
pub struct Applier {
    store: Arc<ConfigStore>,
}

impl Applier {
    /// The one writer for `store`. Creating two for one store breaks the model.
    pub fn new(store: Arc<ConfigStore>) -> Self {
        Applier { store }
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.store.load()
    }

    /// Validates `update` against the current snapshot and publishes the result, or
    /// returns every problem and leaves the snapshot as it was.
    pub fn apply(&self, update: Update) -> Result<Arc<Snapshot>, Vec<Problem>> {
        self.apply_all(vec![update])
    }

    /// Like [`Applier::apply`] for several types at once: all are applied, or none.
    pub fn apply_all(&self, updates: Vec<Update>) -> Result<Arc<Snapshot>, Vec<Problem>> {
        let current = self.store.load();
        let mut next = Snapshot::clone(&current);
        let mut problems = Vec::new();
        for update in updates {
            next = match candidate(next, update) {
                Ok(n) => n,
                Err((n, p)) => {
                    problems.extend(p);
                    n
                }
            };
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        next.generation = current.generation + 1;
        let next = Arc::new(next);
        self.store.current.store(Arc::clone(&next));
        self.store.published.send_replace(next.generation);
        Ok(next)
    }
}

/// `base` with `update` applied, or `base` unchanged and the problems found.
fn candidate(mut base: Snapshot, update: Update) -> Result<Snapshot, (Snapshot, Vec<Problem>)> {
    let mut map = base.resources(&update.type_url).cloned().unwrap_or_default();
    for name in &update.removed {
        map.remove(name);
    }
    for r in &update.upserts {
        map.insert(r.name.clone(), Arc::new(r.clone()));
    }
    let none = ResourceMap::new();
    let services_after =
        if update.type_url == type_url::SERVICE { &map } else { base.resources(type_url::SERVICE).unwrap_or(&none) };
    let problems = validate::check(&update.type_url, &update.upserts, services_after);
    if !problems.is_empty() {
        return Err((base, problems));
    }
    base.types.insert(update.type_url.clone(), Arc::new(map));
    base.synced.insert(update.type_url);
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use neutrino_proto::{self as pb, resource::Body};

    fn eps(name: &str, addr: &str) -> Resource {
        Resource::with_content_version(
            name.into(),
            Body::Endpoints(pb::Endpoints {
                service: name.into(),
                endpoints: vec![pb::Endpoint {
                    address: addr.into(),
                    capacity: Some(pb::ResourceVector { cpu_millis: 1, ..Default::default() }),
                    ..Default::default()
                }],
            }),
        )
    }

    fn update(upserts: Vec<Resource>, removed: &[&str]) -> Update {
        Update {
            type_url: type_url::ENDPOINTS.into(),
            upserts,
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_rejected_update_keeps_the_last_good_snapshot() {
        let applier = Applier::new(Arc::default());
        let good = applier.apply(update(vec![eps("d/a", "10.0.0.1")], &[])).expect("valid");
        let err = applier
            .apply(update(vec![eps("d/b", "10.0.0.2"), eps("d/a", "bogus")], &["d/a"]))
            .expect_err("one bad resource rejects the whole update");
        assert_eq!(err.len(), 1);
        let now = applier.current();
        assert_eq!(now.generation, good.generation);
        assert_eq!(now.versions(type_url::ENDPOINTS), good.versions(type_url::ENDPOINTS));
        assert!(now.resources(type_url::ENDPOINTS).expect("map").contains_key("d/a"));
    }

    #[test]
    fn apply_all_is_all_or_nothing() {
        let applier = Applier::new(Arc::default());
        let services = Update { type_url: type_url::SERVICE.into(), ..Default::default() };
        let err = applier.apply_all(vec![services.clone(), update(vec![eps("d/a", "bogus")], &[])]);
        assert!(err.is_err());
        assert_eq!(applier.current().generation, 0, "the valid Service update was not applied alone");
        let policies = Update { type_url: type_url::POLICY.into(), ..Default::default() };
        let ok = applier.apply_all(vec![services, update(vec![eps("d/a", "10.0.0.1")], &[]), policies]).expect("valid");
        assert_eq!(ok.generation, 1, "one snapshot for the whole set");
        assert!(ok.is_ready());
    }

    #[test]
    fn deltas_add_replace_and_remove() {
        let applier = Applier::new(Arc::default());
        applier.apply(update(vec![eps("d/a", "10.0.0.1"), eps("d/b", "10.0.0.2")], &[])).expect("valid");
        let s = applier.apply(update(vec![eps("d/a", "10.0.0.9")], &["d/b"])).expect("valid");
        let m = s.resources(type_url::ENDPOINTS).expect("map");
        assert_eq!(m.keys().collect::<Vec<_>>(), ["d/a"]);
        assert_eq!(m["d/a"].version, eps("d/a", "10.0.0.9").version);
    }

    #[test]
    fn ready_after_every_required_type_synced_once() {
        let applier = Applier::new(Arc::default());
        assert!(!applier.current().is_ready());
        applier.apply(update(vec![], &[])).expect("empty endpoints");
        assert!(!applier.current().is_ready());
        applier.apply(Update { type_url: type_url::SERVICE.into(), ..Default::default() }).expect("empty services");
        assert!(!applier.current().is_ready(), "not before its policies: it would serve callers they refuse");
        applier.apply(Update { type_url: type_url::POLICY.into(), ..Default::default() }).expect("empty policies");
        assert!(applier.current().is_ready());
    }
}
