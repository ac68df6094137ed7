//! What one proxy holds of one resource type, and what it is owed.
//!
//! Pure bookkeeping for incremental xDS: subscriptions (names or the wildcard), the
//! version of each resource the proxy holds, and the delta between that and a
//! snapshot. It must not send anything or look at the clock.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use neutrino_proto::{DiscoveryRequest, Resource, WILDCARD};

use crate::translate::ResourceMap;

/// Marks a name the proxy asked for and was told does not exist.
const ABSENT: &str = "";

#[derive(Debug, Default)]
pub struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// name -> version the proxy holds (or was last sent; a NACK does not undo this, so
    /// a rejected version is never re-sent: only a newer one is).
    held: HashMap<String, String>,
    /// Nonce of the response awaiting an ACK or NACK.
    pub in_flight: Option<String>,
    /// Something changed while a response was in flight.
    pub dirty: bool,
    /// The first response for this subscription has gone out (even if it was empty).
    pub initial_sent: bool,
    /// The map last diffed against and its snapshot's generation: an unchanged map
    /// needs no diff, and a map one step newer needs only its changed names looked at.
    pub last_diffed: Option<(Arc<ResourceMap>, u64)>,
}

#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub resources: Vec<Arc<Resource>>,
    pub removed: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

impl Subscription {
    /// Applies a request's subscription fields. `first` is true for the first request of
    /// this type on the stream, the only one whose initial versions count.
    pub fn update(&mut self, req: &DiscoveryRequest, first: bool) {
        if first || !req.subscribe.is_empty() || !req.unsubscribe.is_empty() {
            // What the proxy wants changed: the next diff looks at everything.
            self.last_diffed = None;
        }
        if first {
            // As in xDS: an empty first subscription means "everything".
            if req.subscribe.is_empty() {
                self.wildcard = true;
            }
            self.held.extend(req.initial_resource_versions.iter().map(|(n, v)| (n.clone(), v.clone())));
        }
        for name in &req.subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in &req.unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                self.names.remove(name);
            }
            // The proxy drops what it unsubscribes from: forget it so a later
            // re-subscription sends it again.
            if !self.wildcard {
                self.held.remove(name);
            }
        }
        if !self.wildcard {
            let names = &self.names;
            self.held.retain(|n, _| names.contains(n));
        }
    }

    /// What must be sent so the proxy holds exactly what `snapshot` has of its names.
    pub fn diff(&self, snapshot: Option<&ResourceMap>) -> Delta {
        let empty = ResourceMap::new();
        let snapshot = snapshot.unwrap_or(&empty);
        let mut delta = Delta::default();
        let mut owed = |name: &String, r: &Arc<Resource>| {
            if self.held.get(name).map(String::as_str) != Some(r.version.as_str()) {
                delta.resources.push(Arc::clone(r));
            }
        };
        if self.wildcard {
            snapshot.iter().for_each(|(n, r)| owed(n, r));
        } else {
            for n in &self.names {
                if let Some(r) = snapshot.get(n) {
                    owed(n, r);
                }
            }
        }
        for (name, version) in &self.held {
            if version != ABSENT && !snapshot.contains_key(name) {
                delta.removed.push(name.clone());
            }
        }
        for name in &self.names {
            if !snapshot.contains_key(name) && !self.held.contains_key(name) {
                delta.removed.push(name.clone());
            }
        }
        delta.removed.sort();
        delta.removed.dedup();
        delta
    }

    /// Like [`Subscription::diff`], looking only at `names` (the names that changed in
    /// `snapshot` since the snapshot last diffed).
    pub fn diff_names(&self, snapshot: &ResourceMap, names: &[String]) -> Delta {
        let mut delta = Delta::default();
        for name in names {
            let wanted = self.wildcard || self.names.contains(name);
            if !wanted {
                continue;
            }
            match (snapshot.get(name), self.held.get(name)) {
                (Some(r), held) if held.map(String::as_str) != Some(r.version.as_str()) => {
                    delta.resources.push(Arc::clone(r));
                }
                (None, Some(v)) if v != ABSENT => delta.removed.push(name.clone()),
                (None, None) if self.names.contains(name) => delta.removed.push(name.clone()),
                _ => {}
            }
        }
        delta
    }

    /// Records that `delta` was sent.
    pub fn sent(&mut self, delta: &Delta) {
        for r in &delta.resources {
            self.held.insert(r.name.clone(), r.version.clone());
        }
        for name in &delta.removed {
            if self.names.contains(name) {
                self.held.insert(name.clone(), ABSENT.to_string());
            } else {
                self.held.remove(name);
            }
        }
        self.initial_sent = true;
    }

    /// How many resources the proxy holds; for dumps and memory estimates.
    pub fn held_count(&self) -> usize {
        self.held.values().filter(|v| v.as_str() != ABSENT).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neutrino_proto::{Endpoints, resource::Body};

    fn res(name: &str, n: usize) -> Arc<Resource> {
        let body = Body::Endpoints(Endpoints { service: name.into(), endpoints: vec![Default::default(); n] });
        Arc::new(Resource::with_content_version(name.into(), body))
    }

    fn snap(items: &[(&str, usize)]) -> ResourceMap {
        items.iter().map(|(n, k)| (n.to_string(), res(n, *k))).collect()
    }

    fn req(sub: &[&str], unsub: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            subscribe: sub.iter().map(|s| s.to_string()).collect(),
            unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn names(d: &Delta) -> Vec<&str> {
        d.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn wildcard_gets_everything_then_only_changes() {
        let mut s = Subscription::default();
        s.update(&req(&["*"], &[]), true);
        let v1 = snap(&[("a", 1), ("b", 1)]);
        let d = s.diff(Some(&v1));
        assert_eq!(names(&d), ["a", "b"]);
        s.sent(&d);
        assert!(s.diff(Some(&v1)).is_empty());
        let v2 = snap(&[("a", 2), ("c", 1)]);
        let d = s.diff(Some(&v2));
        assert_eq!(names(&d), ["a", "c"]);
        assert_eq!(d.removed, ["b"]);
        s.sent(&d);
        assert!(s.diff(Some(&v2)).is_empty());
    }

    #[test]
    fn empty_first_subscription_is_the_wildcard() {
        let mut s = Subscription::default();
        s.update(&req(&[], &[]), true);
        assert_eq!(names(&s.diff(Some(&snap(&[("a", 1)])))), ["a"]);
    }

    #[test]
    fn resume_skips_what_the_proxy_already_holds() {
        let v1 = snap(&[("a", 1), ("b", 1), ("gone", 1)]);
        let mut r = req(&["*"], &[]);
        r.initial_resource_versions = v1.iter().map(|(n, x)| (n.clone(), x.version.clone())).collect();
        let v2 = snap(&[("a", 1), ("b", 2)]);
        let mut s = Subscription::default();
        s.update(&r, true);
        let d = s.diff(Some(&v2));
        assert_eq!(names(&d), ["b"]);
        assert_eq!(d.removed, ["gone"]);
    }

    #[test]
    fn named_subscriptions_and_missing_names() {
        let mut s = Subscription::default();
        s.update(&req(&["a", "nope"], &[]), true);
        let v = snap(&[("a", 1), ("b", 1)]);
        let d = s.diff(Some(&v));
        assert_eq!(names(&d), ["a"]);
        assert_eq!(d.removed, ["nope"], "a missing name is reported as removed");
        s.sent(&d);
        assert!(s.diff(Some(&v)).is_empty(), "told once, not on every push");
        // It appears later: now it is sent.
        let v2 = snap(&[("a", 1), ("nope", 1)]);
        assert_eq!(names(&s.diff(Some(&v2))), ["nope"]);
    }

    #[test]
    fn unsubscribe_forgets_and_resubscribe_resends() {
        let mut s = Subscription::default();
        s.update(&req(&["a"], &[]), true);
        let v = snap(&[("a", 1)]);
        let d = s.diff(Some(&v));
        s.sent(&d);
        s.update(&req(&[], &["a"]), false);
        assert!(s.diff(Some(&v)).is_empty());
        s.update(&req(&["a"], &[]), false);
        assert_eq!(names(&s.diff(Some(&v))), ["a"]);
    }

    #[test]
    fn diffing_only_changed_names_gives_the_same_delta_as_a_full_diff() {
        let mut s = Subscription::default();
        s.update(&req(&["*", "later"], &[]), true);
        let v1 = snap(&[("a", 1), ("b", 1), ("c", 1)]);
        let d = s.diff(Some(&v1));
        s.sent(&d);
        let v2 = snap(&[("a", 2), ("c", 1), ("later", 1)]);
        let changed: Vec<String> = ["a", "b", "later"].iter().map(|x| x.to_string()).collect();
        assert_eq!(s.diff_names(&v2, &changed), s.diff(Some(&v2)));
        let d = s.diff_names(&v2, &changed);
        assert_eq!(names(&d), ["a", "later"]);
        assert_eq!(d.removed, ["b"]);
    }

    #[test]
    fn a_sent_version_is_not_owed_again_even_if_rejected() {
        let mut s = Subscription::default();
        s.update(&req(&["*"], &[]), true);
        let v = snap(&[("a", 1)]);
        let d = s.diff(Some(&v));
        s.sent(&d);
        // The proxy NACKs: nothing in Subscription changes, so the same version is
        // not owed again; a new version is.
        assert!(s.diff(Some(&v)).is_empty());
        assert_eq!(names(&s.diff(Some(&snap(&[("a", 2)])))), ["a"]);
    }
}
