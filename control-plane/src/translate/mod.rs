//! Translate: the mesh model into versioned `neutrino.mesh.v1` resources.
//!
//! Pure functions. A resource's version is a hash of its content, so re-translating an
//! unchanged service yields the same version and nothing is pushed for it. Must not do
//! IO or keep state between calls.

use std::collections::BTreeMap;
use std::sync::Arc;

pub mod openapi;

use neutrino_proto::{self as pb, Resource, resource::Body, type_url};

use crate::model::{Capacity, MeshPolicy, MeshState, Reports, ServiceModel, pod_key};

/// The trust domain when none is configured (`--trust-domain`), as in Kubernetes.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// One type's resources, by name.
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// An immutable set of resources per type URL, as published to every stream.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every published change; reported as `system_version`.
    pub generation: u64,
    pub by_type: BTreeMap<&'static str, Arc<ResourceMap>>,
    /// Per type, what differs from the previous snapshot of the same lane: lets a stream
    /// that is up to date look at only those names instead of the whole type.
    pub changes: BTreeMap<&'static str, Arc<Changes>>,
}

/// Names added, changed or removed since the snapshot of generation `since`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub since: u64,
    pub names: Vec<String>,
}

impl Snapshot {
    /// The snapshot after `previous` holding `by_type`. Types whose content did not
    /// change keep `previous`'s map (the same `Arc`, so streams can skip them with a
    /// pointer comparison); the others record which names changed. None when nothing
    /// changed at all.
    pub fn succeed(
        previous: &Snapshot,
        generation: u64,
        by_type: BTreeMap<&'static str, Arc<ResourceMap>>,
    ) -> Option<Snapshot> {
        let mut next = Snapshot { generation, by_type: BTreeMap::new(), changes: BTreeMap::new() };
        let mut changed = previous.by_type.keys().any(|t| !by_type.contains_key(t));
        for (t, map) in by_type {
            match previous.by_type.get(t) {
                Some(old) if same_versions(old, &map) => {
                    next.by_type.insert(t, Arc::clone(old));
                }
                old => {
                    changed = true;
                    let names = match old {
                        Some(old) => changed_names(old, &map),
                        None => map.keys().cloned().collect(),
                    };
                    next.changes.insert(t, Arc::new(Changes { since: previous.generation, names }));
                    next.by_type.insert(t, map);
                }
            }
        }
        changed.then_some(next)
    }

    pub fn resources(&self, type_url: &str) -> Option<&ResourceMap> {
        self.by_type.get(type_url).map(|m| m.as_ref())
    }

    /// True when both hold the same names at the same versions.
    #[cfg(test)]
    pub fn same_content(&self, other: &Snapshot) -> bool {
        self.by_type.len() == other.by_type.len()
            && self.by_type.iter().zip(other.by_type.iter()).all(|((ta, a), (tb, b))| {
                ta == tb
                    && a.len() == b.len()
                    && a.iter().zip(b.iter()).all(|((na, ra), (nb, rb))| na == nb && ra.version == rb.version)
            })
    }
}

fn same_versions(a: &ResourceMap, b: &ResourceMap) -> bool {
    a.len() == b.len() && a.iter().zip(b.iter()).all(|((na, ra), (nb, rb))| na == nb && ra.version == rb.version)
}

/// Names in either map whose version differs (or that only one has), sorted.
fn changed_names(old: &ResourceMap, new: &ResourceMap) -> Vec<String> {
    let mut names: Vec<String> = new
        .iter()
        .filter(|(n, r)| old.get(*n).map(|o| &o.version) != Some(&r.version))
        .map(|(n, _)| n.clone())
        .chain(old.keys().filter(|n| !new.contains_key(*n)).cloned())
        .collect();
    names.sort();
    names
}

/// The config lane: `Service` (with routes from `routes`, by service key), `Endpoints`
/// (meshed endpoints' identities in `trust_domain`) and `Policy`, one of each per
/// service.
pub fn config(
    mesh: &MeshState,
    routes: &BTreeMap<String, Arc<openapi::Routes>>,
    trust_domain: &str,
) -> BTreeMap<&'static str, Arc<ResourceMap>> {
    let mut services = ResourceMap::new();
    let mut endpoints = ResourceMap::new();
    let mut policies = ResourceMap::new();
    for (key, svc) in &mesh.services {
        services.insert(
            key.clone(),
            Arc::new(Resource::with_content_version(
                key.clone(),
                Body::Service(service(svc, routes.get(key).map(|r| &**r))),
            )),
        );
        endpoints.insert(
            key.clone(),
            Arc::new(Resource::with_content_version(
                key.clone(),
                Body::Endpoints(endpoints_of(key, svc, trust_domain)),
            )),
        );
        policies.insert(
            key.clone(),
            Arc::new(Resource::with_content_version(key.clone(), Body::Policy(policy(key, svc, &mesh.policy)))),
        );
    }
    BTreeMap::from([
        (type_url::SERVICE, Arc::new(services)),
        (type_url::ENDPOINTS, Arc::new(endpoints)),
        (type_url::POLICY, Arc::new(policies)),
    ])
}

/// A service's effective policy: its TLS mode is its own, else its namespace's, else
/// the mesh's; its rules are its own, and without rules the mesh default decides. A
/// service whose policy could not be read denies everyone.
fn policy(key: &str, svc: &ServiceModel, mesh: &MeshPolicy) -> pb::Policy {
    let tls = svc.policy.tls.or_else(|| mesh.namespaces.get(&svc.namespace).copied()).unwrap_or(mesh.tls);
    if svc.policy.broken.is_some() {
        return pb::Policy {
            service: key.to_string(),
            tls_mode: tls as i32,
            default_action: pb::PolicyAction::Deny as i32,
            allow: vec![],
        };
    }
    pb::Policy {
        service: key.to_string(),
        tls_mode: tls as i32,
        default_action: mesh.default_action as i32,
        allow: svc
            .policy
            .allow
            .iter()
            .map(|r| pb::AllowRule {
                identities: r.from.clone(),
                operations: r.operations.clone(),
                methods: r.methods.clone(),
                paths: r.paths.clone(),
            })
            .collect(),
    }
}

/// The SPIFFE id of `service_account` in `namespace`. Written out even when a part is
/// not valid (the sources check service accounts, the binary the trust domain), so
/// that a mistake is refused loudly by every proxy rather than turned into plaintext.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// A load report counts for this long after it was measured; then its endpoint's load
/// is unknown (the proxies' own expiry is the same).
pub const REPORT_TTL_MS: u64 = 3_000;
/// Loads are rounded down to this many parts per million, so noise below 0.1 % does
/// not make a new version.
const PPM_STEP: u64 = 1_000;

/// The capacity lane: one `Capacity` per service, listing the endpoints whose pods
/// reported their load within `REPORT_TTL_MS` of `now_ms` (Unix ms). An endpoint
/// without a fresh report is left out: proxies then treat its load as unknown.
pub fn capacity(mesh: &MeshState, reports: &Reports, now_ms: u64) -> BTreeMap<&'static str, Arc<ResourceMap>> {
    let ppm = |used: u64, cap: u64| {
        if cap == 0 {
            return 0;
        }
        let p = (u128::from(used) * 1_000_000 / u128::from(cap)).min(u128::from(u32::MAX)) as u64;
        (p / PPM_STEP * PPM_STEP) as u32
    };
    let map = mesh
        .services
        .iter()
        .map(|(key, svc)| {
            let loads = svc
                .endpoints
                .iter()
                .filter(|e| !e.pod.is_empty())
                .filter_map(|e| {
                    let r = reports.get(&pod_key(&svc.namespace, &e.pod))?;
                    if now_ms.saturating_sub(r.measured_at_ms) >= REPORT_TTL_MS {
                        return None;
                    }
                    Some(pb::EndpointLoad {
                        address: e.address.to_string(),
                        port: u32::from(e.port),
                        cpu_ppm: ppm(r.in_flight[0], e.capacity.cpu_millis),
                        memory_ppm: ppm(r.in_flight[1], e.capacity.memory_bytes),
                        gpu_ppm: ppm(r.in_flight[2], e.capacity.gpu),
                        // To the second: a steady load makes a new version once a second.
                        reported_at_ms: r.measured_at_ms / 1000 * 1000,
                    })
                })
                .collect();
            let body = Body::Capacity(pb::Capacity { service: key.clone(), loads });
            (key.clone(), Arc::new(Resource::with_content_version(key.clone(), body)))
        })
        .collect();
    BTreeMap::from([(type_url::CAPACITY, Arc::new(map))])
}

fn service(svc: &ServiceModel, routes: Option<&openapi::Routes>) -> pb::Service {
    pb::Service {
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        ports: svc
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: String::new(),
                port: u32::from(p.port),
                target_port: u32::from(p.target_port),
                protocol: p.protocol as i32,
            })
            .collect(),
        virtual_ips: svc.virtual_ips.iter().map(ToString::to_string).collect(),
        hostnames: svc.hostnames.clone(),
        routes: routes.map(|r| r.routes.clone()).unwrap_or_default(),
        default_cost: Some(routes.map(|r| r.default_cost).unwrap_or(openapi::DEFAULT_COST)),
    }
}

fn endpoints_of(key: &str, svc: &ServiceModel, trust_domain: &str) -> pb::Endpoints {
    pb::Endpoints {
        service: key.to_string(),
        endpoints: svc
            .endpoints
            .iter()
            .map(|e| pb::Endpoint {
                address: e.address.to_string(),
                port: u32::from(e.port),
                zone: e.zone.clone(),
                labels: e.labels.clone(),
                ready: e.ready,
                capacity: Some(vector(e.capacity)),
                pod: e.pod.clone(),
                identity: e
                    .service_account
                    .as_deref()
                    .map(|sa| spiffe_id(trust_domain, &svc.namespace, sa))
                    .unwrap_or_default(),
            })
            .collect(),
    }
}

fn vector(c: Capacity) -> pb::ResourceVector {
    pb::ResourceVector { cpu_millis: c.cpu_millis, memory_bytes: c.memory_bytes, gpu: c.gpu }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::mesh_file;
    use std::path::Path;

    const TD: &str = DEFAULT_TRUST_DOMAIN;

    fn mesh(cpu: &str) -> MeshState {
        let text = format!(
            "services:\n- name: a\n  ports: [{{port: 80}}]\n  endpoints:\n  - {{address: 10.0.0.1, capacity: {{cpu: \"{cpu}\", memory: 1Gi}}}}\n- name: b\n  ports: [{{port: 81}}]\n"
        );
        mesh_file::parse(Path::new("m.yaml"), text.as_bytes()).expect("valid")
    }

    #[test]
    fn unchanged_services_keep_their_versions() {
        let before = config(&mesh("1"), &BTreeMap::new(), TD);
        let after = config(&mesh("2"), &BTreeMap::new(), TD);
        let v = |m: &BTreeMap<&str, Arc<ResourceMap>>, t: &str, n: &str| m[t][n].version.clone();
        assert_eq!(v(&before, type_url::SERVICE, "default/a"), v(&after, type_url::SERVICE, "default/a"));
        assert_ne!(v(&before, type_url::ENDPOINTS, "default/a"), v(&after, type_url::ENDPOINTS, "default/a"));
        assert_eq!(v(&before, type_url::ENDPOINTS, "default/b"), v(&after, type_url::ENDPOINTS, "default/b"));
    }

    #[test]
    fn endpoints_carry_capacity_in_integer_units() {
        let cfg = config(&mesh("500m"), &BTreeMap::new(), TD);
        let Some(Body::Endpoints(eps)) = &cfg[type_url::ENDPOINTS]["default/a"].body else { panic!("endpoints body") };
        let cap = eps.endpoints[0].capacity.expect("capacity");
        assert_eq!((cap.cpu_millis, cap.memory_bytes), (500, 1 << 30));
    }

    #[test]
    fn snapshot_content_comparison() {
        let snap = |g, cpu| Snapshot {
            generation: g,
            by_type: config(&mesh(cpu), &BTreeMap::new(), TD),
            ..Default::default()
        };
        let (a, b, c) = (snap(1, "1"), snap(2, "1"), snap(3, "3"));
        assert!(a.same_content(&b));
        assert!(!a.same_content(&c));
        assert!(Snapshot::succeed(&a, 2, b.by_type.clone()).is_none(), "nothing changed");
        let next = Snapshot::succeed(&a, 2, c.by_type.clone()).expect("changed");
        assert!(Arc::ptr_eq(&next.by_type[type_url::SERVICE], &a.by_type[type_url::SERVICE]), "unchanged type reused");
        assert!(!next.changes.contains_key(type_url::SERVICE));
        assert_eq!(*next.changes[type_url::ENDPOINTS], Changes { since: 1, names: vec!["default/a".to_string()] });
    }

    #[test]
    fn fresh_reports_become_loads_and_stale_ones_are_left_out() {
        let text = "services:\n- name: a\n  ports: [{port: 80}]\n  endpoints:\n  - {address: 10.0.0.1, name: a-1, capacity: {cpu: \"2\", memory: 1Gi}}\n  - {address: 10.0.0.2, name: a-2, capacity: {cpu: \"2\", memory: 1Gi}}\n";
        let m = mesh_file::parse(Path::new("m.yaml"), text.as_bytes()).expect("valid");
        let mut reports = Reports::new();
        reports.insert(
            pod_key("default", "a-1"),
            crate::model::LoadReport { in_flight: [1501, 0, 0], measured_at_ms: 10_400 },
        );
        reports.insert(
            pod_key("default", "a-2"),
            crate::model::LoadReport { in_flight: [9, 0, 0], measured_at_ms: 7_000 },
        );
        let cap = capacity(&m, &reports, 10_500);
        let Some(Body::Capacity(c)) = &cap[type_url::CAPACITY]["default/a"].body else { panic!("capacity body") };
        assert_eq!(c.loads.len(), 1, "a-2's report is 3.5 s old: unknown");
        assert_eq!((c.loads[0].address.as_str(), c.loads[0].cpu_ppm), ("10.0.0.1", 750_000));
        assert_eq!(c.loads[0].reported_at_ms, 10_000);
        // The same load measured again within the second: the same version, nothing to push.
        reports.get_mut("default/a-1").expect("a-1").measured_at_ms = 10_900;
        let again = capacity(&m, &reports, 10_950);
        assert_eq!(again[type_url::CAPACITY]["default/a"].version, cap[type_url::CAPACITY]["default/a"].version);
    }

    fn body<'a>(cfg: &'a BTreeMap<&str, Arc<ResourceMap>>, t: &str, name: &str) -> &'a Body {
        cfg[t][name].body.as_ref().expect("body")
    }

    #[test]
    fn identities_and_effective_policies() {
        let text = "policy:\n  default: deny\n  namespaces: {pay: {tls: strict}}\nservices:\n- name: ledger\n  namespace: pay\n  serviceAccount: ledger\n  ports: [{port: 80}]\n  policy:\n    allow: [{from: [\"spiffe://example.org/ns/shop/*\"], methods: [get]}]\n  endpoints:\n  - {address: 10.0.0.1, capacity: {cpu: 1, memory: 1Gi}}\n  - {address: 10.0.0.2, serviceAccount: \"\", capacity: {cpu: 1, memory: 1Gi}}\n- name: web\n  ports: [{port: 80}]\n  policy: {tls: strict}\n- name: open\n  namespace: pay\n  ports: [{port: 80}]\n  policy: {tls: permissive}\n- name: plain\n  ports: [{port: 80}]\n";
        let m = mesh_file::parse(Path::new("m.yaml"), text.as_bytes()).expect("valid");
        let cfg = config(&m, &BTreeMap::new(), "example.org");
        let Body::Endpoints(eps) = body(&cfg, type_url::ENDPOINTS, "pay/ledger") else { panic!("endpoints") };
        assert_eq!(eps.endpoints[0].identity, "spiffe://example.org/ns/pay/sa/ledger");
        assert_eq!(eps.endpoints[1].identity, "", "opted out: not meshed");
        assert_eq!(cfg[type_url::POLICY].len(), 4, "one Policy per service");
        let policy = |name| match body(&cfg, type_url::POLICY, name) {
            Body::Policy(p) => p.clone(),
            _ => panic!("policy"),
        };
        let ledger = policy("pay/ledger");
        assert_eq!(ledger.service, "pay/ledger");
        assert_eq!(ledger.tls_mode, pb::TlsMode::Strict as i32, "from the namespace");
        assert_eq!(ledger.default_action, pb::PolicyAction::Deny as i32);
        assert_eq!(
            ledger.allow,
            vec![pb::AllowRule {
                identities: vec!["spiffe://example.org/ns/shop/*".into()],
                methods: vec!["GET".into()],
                ..Default::default()
            }]
        );
        assert_eq!(policy("default/web").tls_mode, pb::TlsMode::Strict as i32, "its own");
        assert_eq!(policy("pay/open").tls_mode, pb::TlsMode::Permissive as i32, "its own beats the namespace's");
        let plain = policy("default/plain");
        assert_eq!((plain.tls_mode, plain.allow.len()), (pb::TlsMode::Permissive as i32, 0), "the mesh's");
        // Versions follow content: another trust domain changes Endpoints, not Policy.
        let other = config(&m, &BTreeMap::new(), "cluster.local");
        assert_ne!(other[type_url::ENDPOINTS]["pay/ledger"].version, cfg[type_url::ENDPOINTS]["pay/ledger"].version);
        assert_eq!(other[type_url::POLICY]["pay/ledger"].version, cfg[type_url::POLICY]["pay/ledger"].version);
    }

    #[test]
    fn a_broken_policy_denies_everyone() {
        let mut m = mesh("1");
        let a = m.services.get_mut("default/a").expect("a");
        a.policy.allow.push(crate::model::AllowRuleModel { from: vec!["*".into()], ..Default::default() });
        a.policy.broken = Some("authorization policy default/x: spec: bad".into());
        let cfg = config(&m, &BTreeMap::new(), TD);
        let Body::Policy(p) = body(&cfg, type_url::POLICY, "default/a") else { panic!("policy") };
        assert_eq!((p.default_action, p.allow.len()), (pb::PolicyAction::Deny as i32, 0));
        let Body::Policy(b) = body(&cfg, type_url::POLICY, "default/b") else { panic!("policy") };
        assert_eq!((b.default_action, b.allow.len()), (pb::PolicyAction::Allow as i32, 0));
    }
}
