//! Route: from where a request is going to the service it is for, and (in `table`)
//! from its method and path to the OpenAPI operation it calls.
//!
//! [`Mesh`] is the data path's compiled view of one config snapshot: services by
//! virtual IP and port and by hostname, each with its route table and endpoints. It is
//! built off the request path when a snapshot is published, reusing what did not
//! change; lookups are plain hash-map reads. It must not do IO.

pub mod policy;
pub mod table;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use neutrino_proto::{self as pb, resource::Body, type_url};

use crate::config::Snapshot;
use crate::forward::pool::EndpointConns;
use crate::select::endpoints::{Endpoint, EndpointLoad, EndpointSet};
use crate::telemetry::stats::RouteStats;
pub use policy::{Authorizer, Decision};
pub use table::{Cost, Operation, RouteTable};

/// One service, ready for the data path.
#[derive(Debug)]
pub struct ServiceEntry {
    /// "<namespace>/<name>".
    pub key: Arc<str>,
    pub namespace: Arc<str>,
    pub ports: Vec<PortEntry>,
    pub routes: RouteTable,
    pub endpoints: EndpointSet,
    /// Who may call the service, and whether plaintext is accepted: its `Policy`
    /// resource compiled, or permissive and allow-all when it has none.
    pub policy: Arc<Authorizer>,
    /// Versions this entry was compiled from, to reuse it when they are unchanged.
    service_version: String,
    endpoints_version: String,
    /// "" when the service has no `Policy` resource.
    policy_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortEntry {
    pub port: u16,
    pub target_port: u16,
    pub protocol: pb::Protocol,
}

impl ServiceEntry {
    pub fn port(&self, port: u16) -> Option<&PortEntry> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Where to send a request for service port `port` on `endpoint`.
    pub fn target(&self, endpoint: &Endpoint, port: &PortEntry) -> SocketAddr {
        if endpoint.addr.port() == 0 { SocketAddr::new(endpoint.addr.ip(), port.target_port) } else { endpoint.addr }
    }
}

/// The data path's view of the mesh.
#[derive(Debug, Default)]
pub struct Mesh {
    services: Vec<Arc<ServiceEntry>>,
    by_vip: HashMap<SocketAddr, u32>,
    by_host: HashMap<Box<str>, u32>,
    /// Endpoint load counters by (service, address), carried across snapshots.
    loads: HashMap<(Arc<str>, SocketAddr), Arc<EndpointLoad>>,
    /// Idle upstream connections by endpoint address, carried across snapshots: a
    /// config change must not close them.
    conns: HashMap<SocketAddr, Arc<EndpointConns>>,
    /// Capacity by pod name, so a proxy finds its own pod's capacity.
    pods: HashMap<Arc<str>, [u64; 3]>,
    /// The services a pod is an endpoint of (indexes into `services`), for inbound.
    pod_services: HashMap<Arc<str>, Vec<u32>>,
    /// Operation counters by (service, operation id), carried across snapshots.
    stats: HashMap<(Arc<str>, Arc<str>), Arc<RouteStats>>,
    /// The SPIFFE id each meshed endpoint's proxy presents, by address: what the
    /// outbound side verifies a peer against.
    identities: HashMap<IpAddr, Arc<str>>,
    /// Compiled from a ready snapshot (or after one): the data path knows the mesh.
    ready: bool,
}

impl Mesh {
    /// The service behind a virtual IP and port, if any.
    pub fn by_destination(&self, dst: SocketAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_vip.get(&dst).map(|&i| &self.services[i as usize])
    }

    /// The service a Host / :authority names. `host` may carry a port; a bare name is
    /// resolved in `namespace` (the proxy's own), as Kubernetes DNS would.
    pub fn by_host(&self, host: &str, namespace: &str) -> Option<&Arc<ServiceEntry>> {
        let name = strip_port(host);
        let found = |n: &str| self.by_host.get(n).map(|&i| &self.services[i as usize]);
        if let Some(s) = found(name) {
            return Some(s);
        }
        if !name.contains('.') && !name.is_empty() {
            let mut qualified = String::with_capacity(name.len() + namespace.len() + 1);
            qualified.push_str(name);
            qualified.push('.');
            qualified.push_str(namespace);
            return found(&qualified);
        }
        None
    }

    /// The capacity vector of `pod`, as its endpoint entry gives it.
    pub fn capacity_of_pod(&self, pod: &str) -> Option<[u64; 3]> {
        self.pods.get(pod).copied()
    }

    /// The first service `pod` is an endpoint of: where its inbound requests count.
    pub fn service_of_pod(&self, pod: &str) -> Option<&Arc<ServiceEntry>> {
        self.pod_services.get(pod).and_then(|v| v.first()).map(|&i| &self.services[i as usize])
    }

    /// The SPIFFE id discovery says the proxy at `ip` presents; `None`: not meshed
    /// (called in plaintext). When services disagree about one address, the first
    /// service by name wins (a pod has one service account, so they should not).
    pub fn identity_of(&self, ip: IpAddr) -> Option<&Arc<str>> {
        self.identities.get(&ip)
    }

    /// Every endpoint's idle connections, for the reaper (`forward::pool`).
    pub fn endpoint_conns(&self) -> impl Iterator<Item = &Arc<EndpointConns>> {
        self.conns.values()
    }

    /// True once compiled from a ready config snapshot; stays true after.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    pub fn services(&self) -> &[Arc<ServiceEntry>] {
        &self.services
    }

    /// Compiles `snapshot`, reusing entries of `previous` whose versions are unchanged
    /// and keeping every surviving endpoint's load counters.
    pub fn compile(snapshot: &Snapshot, previous: &Mesh) -> Mesh {
        let mut mesh = Mesh { ready: previous.ready || snapshot.is_ready(), ..Mesh::default() };
        let reuse: HashMap<&str, &Arc<ServiceEntry>> = previous.services.iter().map(|s| (&*s.key, s)).collect();
        let empty = Default::default();
        let services = snapshot.resources(type_url::SERVICE).unwrap_or(&empty);
        let endpoints = snapshot.resources(type_url::ENDPOINTS).unwrap_or(&empty);
        let capacity = snapshot.resources(type_url::CAPACITY).unwrap_or(&empty);
        let policies = snapshot.resources(type_url::POLICY).unwrap_or(&empty);
        for (name, res) in services {
            let Some(Body::Service(svc)) = &res.body else { continue };
            let eps = endpoints.get(name);
            let eps_version = eps.map(|e| e.version.as_str()).unwrap_or("");
            let pol = policies.get(name);
            let pol_version = pol.map(|p| p.version.as_str()).unwrap_or("");
            let old = reuse.get(name.as_str());
            let entry = match old {
                Some(old)
                    if old.service_version == res.version
                        && old.endpoints_version == eps_version
                        && old.policy_version == pol_version =>
                {
                    Arc::clone(old)
                }
                _ => {
                    let eps_body = eps.and_then(|e| match &e.body {
                        Some(Body::Endpoints(b)) => Some(b),
                        _ => None,
                    });
                    let policy = match (old, pol.and_then(|p| p.body.as_ref())) {
                        (Some(old), _) if old.policy_version == pol_version => Arc::clone(&old.policy),
                        (_, Some(Body::Policy(p))) => Arc::new(Authorizer::compile(p)),
                        _ => Authorizer::allow_all(),
                    };
                    let versions = [res.version.as_str(), eps_version, pol_version];
                    Arc::new(compile_service(name, versions, svc, eps_body, policy, previous))
                }
            };
            let idx = mesh.services.len() as u32;
            for vip in &svc.virtual_ips {
                if let Ok(ip) = vip.parse::<IpAddr>() {
                    for p in &entry.ports {
                        mesh.by_vip.insert(SocketAddr::new(ip, p.port), idx);
                    }
                }
            }
            for h in &svc.hostnames {
                mesh.by_host.insert(h.to_ascii_lowercase().into_boxed_str(), idx);
            }
            let report = capacity.get(name).and_then(|c| match &c.body {
                Some(Body::Capacity(c)) => Some(c),
                _ => None,
            });
            apply_reports(&entry, report);
            for e in &entry.endpoints.endpoints {
                mesh.loads.insert((Arc::clone(&entry.key), e.addr), Arc::clone(&e.load));
                mesh.conns.entry(e.addr).or_insert_with(|| Arc::clone(&e.conns));
                if let Some(id) = &e.identity {
                    mesh.identities.entry(e.addr.ip()).or_insert_with(|| Arc::clone(id));
                }
                if !e.pod.is_empty() {
                    mesh.pods.insert(Arc::clone(&e.pod), e.capacity);
                    let of_pod = mesh.pod_services.entry(Arc::clone(&e.pod)).or_default();
                    if !of_pod.contains(&idx) {
                        of_pod.push(idx);
                    }
                }
            }
            for op in entry.routes.operations() {
                mesh.stats.insert((Arc::clone(&entry.key), Arc::clone(&op.operation_id)), Arc::clone(&op.stats));
            }
            mesh.services.push(entry);
        }
        mesh
    }
}

/// Sets each endpoint's reported load from the service's `Capacity` resource (parts per
/// million of its capacity, per dimension, as measured at `reported_at_ms` on the
/// backend's clock); endpoints without one keep what they had. The report counts all
/// callers, this proxy included: what it holds there now is counted live instead.
fn apply_reports(entry: &ServiceEntry, report: Option<&pb::Capacity>) {
    let Some(report) = report.filter(|r| !r.loads.is_empty()) else { return };
    let now = crate::select::endpoints::now_ms();
    let wall =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    for e in &entry.endpoints.endpoints {
        let found = report
            .loads
            .iter()
            .find(|l| l.address.parse::<IpAddr>().ok() == Some(e.addr.ip()) && l.port as u16 == e.addr.port());
        // A pushed report without an entry means "no news", not "idle": keep what an
        // in-band report may have said until it expires.
        let Some(l) = found else { continue };
        let ours = e.load.in_flight();
        let scale = |d: usize, ppm: u32| {
            let total = (u128::from(e.capacity[d]) * u128::from(ppm) / 1_000_000) as u64;
            total.saturating_sub(ours[d])
        };
        let others = [scale(0, l.cpu_ppm), scale(1, l.memory_ppm), scale(2, l.gpu_ppm)];
        // Its age by the wall clock, carried over to this process's monotonic clock.
        let age = wall.saturating_sub(l.reported_at_ms);
        e.load.set_reported(others, now.saturating_sub(age));
    }
}

/// `versions`: of the Service, Endpoints and Policy resources ("" when absent).
fn compile_service(
    name: &str,
    versions: [&str; 3],
    svc: &pb::Service,
    eps: Option<&pb::Endpoints>,
    policy: Arc<Authorizer>,
    previous: &Mesh,
) -> ServiceEntry {
    let key: Arc<str> = Arc::from(name);
    let ports = svc
        .ports
        .iter()
        .map(|p| PortEntry {
            port: p.port as u16,
            target_port: if p.target_port == 0 { p.port as u16 } else { p.target_port as u16 },
            protocol: pb::Protocol::try_from(p.protocol).unwrap_or(pb::Protocol::Unspecified),
        })
        .collect();
    let default_cost = svc.default_cost.map(Cost::from).unwrap_or_default();
    let serving = previous.loads.keys().any(|(k, _)| *k == key);
    let now = crate::select::endpoints::now_ms();
    let endpoints = eps
        .map(|e| {
            e.endpoints
                .iter()
                .filter_map(|ep| {
                    let addr = SocketAddr::new(ep.address.parse().ok()?, ep.port as u16);
                    let cap = ep.capacity.unwrap_or_default();
                    let load = previous.loads.get(&(Arc::clone(&key), addr)).cloned().unwrap_or_else(|| {
                        // Joining endpoints that already serve: warm up gradually.
                        // At start-up, or for a new service, all start warm.
                        Arc::new(if serving { EndpointLoad::starting(now) } else { EndpointLoad::default() })
                    });
                    Some(Endpoint {
                        addr,
                        capacity: [cap.cpu_millis, cap.memory_bytes, cap.gpu],
                        ready: ep.ready,
                        pod: Arc::from(ep.pod.as_str()),
                        zone: Arc::from(ep.zone.as_str()),
                        identity: (!ep.identity.is_empty()).then(|| Arc::from(ep.identity.as_str())),
                        load,
                        conns: previous.conns.get(&addr).cloned().unwrap_or_default(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut routes = RouteTable::compile(&svc.routes, default_cost);
    routes.attach_stats(|op| previous.stats.get(&(Arc::clone(&key), Arc::from(op))).cloned().unwrap_or_default());
    ServiceEntry {
        namespace: Arc::from(svc.namespace.as_str()),
        key,
        ports,
        routes,
        endpoints: EndpointSet::new(endpoints),
        policy,
        service_version: versions[0].to_string(),
        endpoints_version: versions[1].to_string(),
        policy_version: versions[2].to_string(),
    }
}

/// "host:port" -> "host"; "[::1]:80" -> "::1"; lower-case is the caller's concern.
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Applier, Update};

    fn snapshot(cpu: u64, extra_route: bool) -> Arc<Snapshot> {
        let mut routes = vec![pb::Route {
            path_template: "/a".into(),
            method: "GET".into(),
            operation_id: "getA".into(),
            ..Default::default()
        }];
        if extra_route {
            routes.push(pb::Route { path_template: "/b".into(), operation_id: "b".into(), ..Default::default() });
        }
        let svc = pb::Service {
            name: "orders".into(),
            namespace: "shop".into(),
            ports: vec![pb::ServicePort { port: 80, target_port: 8080, ..Default::default() }],
            virtual_ips: vec!["10.96.0.10".into()],
            hostnames: vec!["orders.shop".into(), "orders.shop.svc.cluster.local".into()],
            routes,
            ..Default::default()
        };
        let eps = pb::Endpoints {
            service: "shop/orders".into(),
            endpoints: vec![pb::Endpoint {
                address: "10.1.0.1".into(),
                ready: true,
                capacity: Some(pb::ResourceVector { cpu_millis: cpu, memory_bytes: 1, gpu: 0 }),
                ..Default::default()
            }],
        };
        let applier = Applier::new(Arc::default());
        applier
            .apply_all(vec![
                Update {
                    type_url: type_url::SERVICE.into(),
                    upserts: vec![pb::Resource::with_content_version("shop/orders".into(), Body::Service(svc))],
                    removed: vec![],
                },
                Update {
                    type_url: type_url::ENDPOINTS.into(),
                    upserts: vec![pb::Resource::with_content_version("shop/orders".into(), Body::Endpoints(eps))],
                    removed: vec![],
                },
            ])
            .expect("valid")
    }

    #[test]
    fn finds_services_by_virtual_ip_and_by_host() {
        let m = Mesh::compile(&snapshot(1000, false), &Mesh::default());
        let vip: SocketAddr = "10.96.0.10:80".parse().expect("addr");
        assert_eq!(&*m.by_destination(vip).expect("vip").key, "shop/orders");
        assert!(m.by_destination("10.96.0.10:81".parse().expect("addr")).is_none());
        assert_eq!(&*m.by_host("orders.shop:80", "x").expect("host").key, "shop/orders");
        assert_eq!(&*m.by_host("orders", "shop").expect("bare name, own namespace").key, "shop/orders");
        assert!(m.by_host("orders", "default").is_none(), "bare name in another namespace");
        let s = m.by_destination(vip).expect("vip");
        let target = s.target(&s.endpoints.endpoints[0], s.port(80).expect("port"));
        assert_eq!(target, "10.1.0.1:8080".parse::<SocketAddr>().expect("addr"));
    }

    #[test]
    fn load_counters_survive_config_pushes() {
        let first = Mesh::compile(&snapshot(1000, false), &Mesh::default());
        let load = Arc::clone(&first.services()[0].endpoints.endpoints[0].load);
        let _held = crate::select::endpoints::InFlight::new(Arc::clone(&load), [300, 0, 0]);
        // Unchanged: the same entry. Changed routes or capacity: a new entry, same load.
        let same = Mesh::compile(&snapshot(1000, false), &first);
        assert!(Arc::ptr_eq(&same.services()[0], &first.services()[0]));
        let changed = Mesh::compile(&snapshot(2000, true), &same);
        let e = &changed.services()[0].endpoints.endpoints[0];
        assert_eq!(e.capacity[0], 2000);
        assert_eq!(e.load.in_flight(), [300, 0, 0]);
        assert_eq!(changed.services()[0].routes.len(), 2);
    }

    #[test]
    fn endpoints_joining_a_serving_service_start_cold() {
        let first = Mesh::compile(&snapshot(1000, false), &Mesh::default());
        let now = crate::select::endpoints::now_ms();
        assert_eq!(first.services()[0].endpoints.endpoints[0].load.cold(now), 0.0, "start-up: warm");
        let mut previous = Mesh::compile(&snapshot(1000, false), &Mesh::default());
        // Forget the endpoint's counters as if it had been replaced by a new one.
        let key = previous.loads.keys().next().expect("one").clone();
        let kept = previous.loads.remove(&key).expect("load");
        previous.loads.insert((Arc::clone(&key.0), "10.9.9.9:1".parse().expect("addr")), kept);
        let next = Mesh::compile(&snapshot(2000, true), &previous);
        assert!(next.services()[0].endpoints.endpoints[0].load.cold(now) > 0.5, "joined later: cold");
    }

    #[test]
    fn reported_load_from_the_capacity_lane_counts_in_selection() {
        let snap = snapshot(1000, false);
        let applier = Applier::new(Arc::default());
        let mut all = vec![];
        for t in [type_url::SERVICE, type_url::ENDPOINTS] {
            all.push(Update {
                type_url: t.into(),
                upserts: snap.resources(t).expect("type").values().map(|r| pb::Resource::clone(r)).collect(),
                removed: vec![],
            });
        }
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
        let load = pb::EndpointLoad {
            address: "10.1.0.1".into(),
            port: 0,
            cpu_ppm: 900_000,
            reported_at_ms: wall as u64 - 500,
            ..Default::default()
        };
        all.push(Update {
            type_url: type_url::CAPACITY.into(),
            upserts: vec![pb::Resource::with_content_version(
                "shop/orders".into(),
                Body::Capacity(pb::Capacity { service: "shop/orders".into(), loads: vec![load] }),
            )],
            removed: vec![],
        });
        let with_report = applier.apply_all(all).expect("valid");
        let m = Mesh::compile(&with_report, &Mesh::default());
        let s = &m.services()[0];
        assert_eq!(s.endpoints.endpoints[0].load.used(crate::select::endpoints::now_ms()), [900, 0, 0]);
        // 90 % reported busy: a request for 200 millicores no longer fits.
        assert!(s.endpoints.pick(&[200, 0, 0], None).is_err());
        assert!(s.endpoints.pick(&[100, 0, 0], None).is_ok());
    }

    /// `snapshot(1000, false)` plus a `Policy` (when given) and an identity on the endpoint.
    fn with_policy(policy: Option<pb::Policy>, identity: &str) -> Arc<Snapshot> {
        let base = snapshot(1000, false);
        let mut updates = vec![];
        for t in [type_url::SERVICE, type_url::ENDPOINTS] {
            let mut upserts: Vec<pb::Resource> =
                base.resources(t).expect("type").values().map(|r| pb::Resource::clone(r)).collect();
            if let Some(Body::Endpoints(mut e)) = upserts[0].body.clone() {
                e.endpoints[0].identity = identity.into();
                upserts[0] = pb::Resource::with_content_version(upserts[0].name.clone(), Body::Endpoints(e));
            }
            updates.push(Update { type_url: t.into(), upserts, removed: vec![] });
        }
        let upserts = policy
            .into_iter()
            .map(|p| pb::Resource::with_content_version("shop/orders".into(), Body::Policy(p)))
            .collect();
        updates.push(Update { type_url: type_url::POLICY.into(), upserts, removed: vec![] });
        Applier::new(Arc::default()).apply_all(updates).expect("valid")
    }

    #[test]
    fn services_carry_their_policy_and_endpoints_their_identity() {
        const ID: &str = "spiffe://cluster.local/ns/shop/sa/orders";
        let open = Mesh::compile(&with_policy(None, ""), &Mesh::default());
        let s = &open.services()[0];
        assert_eq!(s.policy.tls_mode(), pb::TlsMode::Permissive, "no Policy: permissive");
        assert!(s.policy.authorize(None, None).is_allowed(), "no Policy: allow");
        assert_eq!(s.endpoints.endpoints[0].identity, None);
        assert_eq!(open.identity_of("10.1.0.1".parse().expect("ip")), None, "not meshed");

        let strict = pb::Policy {
            service: "shop/orders".into(),
            tls_mode: pb::TlsMode::Strict as i32,
            allow: vec![pb::AllowRule { identities: vec![ID.into()], ..Default::default() }],
            ..Default::default()
        };
        let closed = Mesh::compile(&with_policy(Some(strict.clone()), ID), &open);
        let s = &closed.services()[0];
        assert!(!Arc::ptr_eq(s, &open.services()[0]), "a new policy version recompiles the entry");
        assert_eq!(s.policy.tls_mode(), pb::TlsMode::Strict);
        assert!(s.policy.authorize(Some(ID), None).is_allowed());
        assert!(!s.policy.authorize(Some("spiffe://cluster.local/ns/shop/sa/other"), None).is_allowed());
        assert_eq!(s.endpoints.endpoints[0].identity.as_deref(), Some(ID));
        assert_eq!(closed.identity_of("10.1.0.1".parse().expect("ip")).map(|i| &**i), Some(ID));
        assert_eq!(closed.identity_of("10.1.0.2".parse().expect("ip")), None);

        let same = Mesh::compile(&with_policy(Some(strict), ID), &closed);
        assert!(Arc::ptr_eq(&same.services()[0], &closed.services()[0]), "unchanged versions: reused");
        let removed = Mesh::compile(&with_policy(None, ID), &same);
        assert!(removed.services()[0].policy.authorize(None, None).is_allowed(), "Policy removed: allow again");
    }

    #[test]
    fn authorities() {
        assert_eq!(strip_port("a.b:8080"), "a.b");
        assert_eq!(strip_port("[fd00::1]:80"), "fd00::1");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("fd00::1"), "fd00::1");
    }
}
