//! Watch step for Kubernetes, the pure half: Kubernetes objects (Services,
//! EndpointSlices, Pods, Namespaces, and the ConfigMaps that Services name) in, one
//! whole [`MeshState`] out. It must not do IO, log, or keep state between calls: the
//! IO half (`kube.rs`) owns the watches and the OpenAPI fetches and hands their
//! results in.
//!
//! Rules (each tested in `control-plane/tests/kube_translate.rs`):
//!
//! - **Services**: every Service except `ExternalName` ones and those in a namespace
//!   labelled `neutrino.io/discovery=disabled`. Only TCP ports (UDP and SCTP are not
//!   meshed); a Service left with none is skipped. Virtual IPs are `clusterIPs`
//!   (none for headless Services); hostnames are [`model::default_hostnames`].
//! - **Protocol** of a port: `appProtocol` first (`http`; `http2`, `h2c` and
//!   `kubernetes.io/h2c`; `grpc`; `tcp`), then the port name (`http`, `http2`, `h2c`,
//!   `grpc`, `tcp`, alone or before a `-`, as in `grpc-web` or `tcp-redis`); else
//!   detected on the wire.
//! - **Endpoints** come from the EndpointSlices labelled `kubernetes.io/service-name`
//!   (IPv4 and IPv6 slices; FQDN slices are ignored), first address of each entry.
//!   `ready` missing means ready, `serving` missing means `ready`, `terminating` missing
//!   means not terminating (the API's own defaults). An endpoint that is terminating
//!   but still serving is kept with `ready: false`: its requests in flight finish and
//!   its load is still reported, but no new request goes to it. A terminating endpoint
//!   that no longer serves is dropped. A not-ready endpoint that is not terminating
//!   (starting, or failing its readiness probe) is kept with `ready: false`. An address
//!   listed in two slices (during a slice hand-over) is kept once, ready if either says
//!   so.
//! - **Target port**: the slice port named like the Service port (the number the slice
//!   controller resolved, named target ports included); without slices, a numeric
//!   `targetPort`, else the port itself. A single-port Service whose slices disagree
//!   (a rollout changing a named port) gets the slice's number on each endpoint.
//! - **Capacity** of an endpoint, from its Pod (the slice's `targetRef`): the
//!   annotation `neutrino.io/capacity` (`cpu=2,memory=4Gi,nvidia.com/gpu=1`) overrides
//!   the dimensions it names; the others come from the Pod-level `resources` when set,
//!   else from the sum over app containers (the `neutrino-proxy` sidecar and init
//!   containers are not counted) of each container's request, or its limit when it has
//!   no request. GPUs are any extended resource named `<vendor>/gpu`. An undeclared
//!   CPU counts as [`DEFAULT_CPU_MILLIS`] and undeclared memory as
//!   [`DEFAULT_MEMORY_BYTES`], so a best-effort Pod still takes traffic; an
//!   undeclared GPU is none. A bad annotation is reported and ignored.
//! - **Identity**: an endpoint whose Pod carries the injected proxy (a container or
//!   native-sidecar init container named `neutrino-proxy`) runs as the Pod's
//!   `serviceAccountName` ("default" when unset); other endpoints are not meshed.
//! - **Policy**: `AuthorizationPolicy` objects and the `neutrino.io/tls` namespace
//!   label, folded in by `kube_policy` (rules there).
//! - **OpenAPI**: the Service annotation `neutrino.io/openapi` is either
//!   `configmap:<name>/<key>` (a ConfigMap in the Service's namespace; `data` or
//!   `binaryData`) or a path (`/openapi.json`) that the Service itself serves on its
//!   first port that is not gRPC or TCP. Until a referenced ConfigMap has been read, or
//!   a path has been fetched once, the Service is published without a document.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, ResourceRequirements, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use neutrino_proto::Protocol;
use thiserror::Error;

use crate::model::{self, Capacity, EndpointModel, MeshState, PortModel, ServiceModel, SpecContent};
use crate::quantity;

pub const ANNOTATION_OPENAPI: &str = "neutrino.io/openapi";
pub const ANNOTATION_CAPACITY: &str = "neutrino.io/capacity";
pub const LABEL_DISCOVERY: &str = "neutrino.io/discovery";
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The injected sidecar's container name; its resources are not the app's capacity.
pub const PROXY_CONTAINER: &str = "neutrino-proxy";
/// Capacity of a Pod that declares no CPU: one core.
pub const DEFAULT_CPU_MILLIS: u64 = 1000;
/// Capacity of a Pod that declares no memory: 1 GiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

/// Something in the cluster that was ignored, naming the object and what to change.
/// None of these stops a view from being published.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Problem {
    #[error(
        "pod {pod}: annotation {ANNOTATION_CAPACITY}={value:?} ignored: {why}; write e.g. \"cpu=2,memory=4Gi,nvidia.com/gpu=1\""
    )]
    CapacityAnnotation { pod: String, value: String, why: String },
    #[error("pod {pod}: {what} ignored: {why}")]
    Resources { pod: String, what: String, why: String },
    #[error(
        "service {service}: annotation {ANNOTATION_OPENAPI}={value:?} ignored: write \"configmap:<name>/<key>\" or a path such as \"/openapi.json\""
    )]
    OpenapiAnnotation { service: String, value: String },
    #[error(
        "service {service}: annotation {ANNOTATION_OPENAPI} names a path but the service has no HTTP port to fetch it from"
    )]
    OpenapiNoPort { service: String },
    #[error("authorization policy {policy}: {why}{}", service.as_ref().map(|s| format!("; service {s} denies every caller until it is fixed")).unwrap_or_default())]
    PolicyInvalid { policy: String, service: Option<String>, why: String },
    #[error(
        "authorization policy {policy} names service {service}, which is not in the mesh; it has no effect (spec.service is a Service in the policy's namespace)"
    )]
    PolicyNoService { policy: String, service: String },
    #[error(
        "namespace {namespace}: label {}={value:?} is neither strict nor permissive; its services are strict until it is fixed",
        super::kube_policy::LABEL_TLS
    )]
    TlsLabel { namespace: String, value: String },
}

/// Where a Service's OpenAPI document comes from, parsed from its annotation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpenapiRef {
    ConfigMap { namespace: String, name: String, key: String },
    Path(String),
}

impl OpenapiRef {
    pub fn parse(value: &str) -> Option<OpenapiRef> {
        let value = value.trim();
        if let Some(rest) = value.strip_prefix("configmap:") {
            let (name, key) = rest.split_once('/')?;
            let ok = |s: &str| !s.is_empty() && !s.contains('/');
            return (ok(name) && ok(key)).then(|| OpenapiRef::ConfigMap {
                namespace: String::new(),
                name: name.into(),
                key: key.into(),
            });
        }
        (value.starts_with('/') && !value.contains(char::is_whitespace)).then(|| OpenapiRef::Path(value.into()))
    }
}

/// What the IO half knows of a ConfigMap that a Service names.
#[derive(Debug, Clone)]
pub enum ConfigMapRead {
    /// Its watch has not finished listing yet.
    Pending,
    /// Listed; `None` when it does not exist.
    Read(Option<Arc<ConfigMap>>),
}

/// A document to fetch over HTTP from one of the Service's ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The key in [`MeshState::specs`]: `http:<namespace>/<service>:<port><path>`.
    pub origin: String,
    pub path: String,
    /// Ready endpoints that serve it, sorted.
    pub candidates: Vec<SocketAddr>,
}

/// Everything the IO half has: the four watched kinds, the named ConfigMaps by
/// `<namespace>/<name>`, and the documents fetched so far by origin.
#[derive(Debug, Default, Clone, Copy)]
pub struct Objects<'a> {
    pub services: &'a [Arc<Service>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub pods: &'a [Arc<Pod>],
    pub namespaces: &'a [Arc<Namespace>],
    pub configmaps: Option<&'a BTreeMap<String, ConfigMapRead>>,
    pub fetched: Option<&'a BTreeMap<String, SpecContent>>,
    /// `AuthorizationPolicy` objects (see `kube_policy`).
    pub policies: &'a [Arc<super::kube_policy::AuthorizationPolicy>],
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Translation {
    pub mesh: MeshState,
    /// ConfigMaps named by annotations, as (namespace, name): the IO half watches these.
    pub configmaps: BTreeSet<(String, String)>,
    pub fetches: Vec<Fetch>,
    pub problems: Vec<Problem>,
}

fn key_of(namespace: Option<&String>, name: Option<&String>) -> String {
    model::service_key(namespace.map_or("default", String::as_str), name.map_or("", String::as_str))
}

/// The whole translation. Output order does not depend on input order.
pub fn translate(objects: Objects<'_>) -> Translation {
    let mut out = Translation::default();
    let disabled: BTreeSet<&str> = objects
        .namespaces
        .iter()
        .filter(|n| n.metadata.labels.as_ref().and_then(|l| l.get(LABEL_DISCOVERY)).is_some_and(|v| v == "disabled"))
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let pods: HashMap<String, &Pod> =
        objects.pods.iter().map(|p| (key_of(p.metadata.namespace.as_ref(), p.metadata.name.as_ref()), &**p)).collect();
    let mut slices: HashMap<String, Vec<&EndpointSlice>> = HashMap::new();
    for s in objects.slices {
        let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else { continue };
        slices.entry(key_of(s.metadata.namespace.as_ref(), Some(svc))).or_default().push(s);
    }
    for list in slices.values_mut() {
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    let mut capacities: HashMap<String, Capacity> = HashMap::new();
    let mut capacity_of = |pod: &Pod, problems: &mut Vec<Problem>| -> Capacity {
        let key = key_of(pod.metadata.namespace.as_ref(), pod.metadata.name.as_ref());
        *capacities.entry(key.clone()).or_insert_with(|| pod_capacity(&key, pod, problems))
    };

    let mut services: Vec<&Service> = objects.services.iter().map(|s| &**s).collect();
    services.sort_by_key(|s| key_of(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()));
    for svc in services {
        let (Some(name), Some(spec)) = (&svc.metadata.name, &svc.spec) else { continue };
        let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        if spec.type_.as_deref() == Some("ExternalName") || disabled.contains(namespace.as_str()) {
            continue;
        }
        let key = model::service_key(&namespace, name);
        let own_slices = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
        let svc_ports: Vec<&ServicePort> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP") && (1..=65535).contains(&p.port))
            .collect();
        if svc_ports.is_empty() {
            continue;
        }
        let ports: Vec<PortModel> = svc_ports.iter().map(|p| port_model(p, own_slices)).collect();
        let mut virtual_ips: Vec<IpAddr> = spec.cluster_ips.iter().flatten().filter_map(|ip| ip.parse().ok()).collect();
        if virtual_ips.is_empty() {
            virtual_ips.extend(spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()));
        }

        // Endpoints, deduplicated by address.
        let mut by_addr: BTreeMap<IpAddr, EndpointModel> = BTreeMap::new();
        for slice in own_slices {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let slice_port = |name: Option<&String>| {
                slice.ports.iter().flatten().find(|p| p.name.as_deref().unwrap_or("") == name.map_or("", |n| n))
            };
            // Only a single-port Service can say "this endpoint listens elsewhere".
            let port = match (svc_ports.as_slice(), ports.as_slice()) {
                ([sp], [pm]) => slice_port(sp.name.as_ref())
                    .and_then(|p| p.port)
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|&n| n != pm.target_port && n != 0)
                    .unwrap_or(0),
                _ => 0,
            };
            let slice_ns = slice.metadata.namespace.clone().unwrap_or_else(|| namespace.clone());
            for ep in &slice.endpoints {
                let Some(address) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
                let cond = ep.conditions.as_ref();
                let ready = cond.and_then(|c| c.ready).unwrap_or(true);
                let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
                if terminating && !serving {
                    continue;
                }
                let ready = ready && !terminating;
                let target = ep.target_ref.as_ref().filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"));
                let pod_name = target.and_then(|r| r.name.clone()).unwrap_or_default();
                let pod = target
                    .and_then(|r| pods.get(&model::pod_key(r.namespace.as_deref().unwrap_or(&slice_ns), &pod_name)));
                let capacity = match pod {
                    Some(pod) => capacity_of(pod, &mut out.problems),
                    None => default_capacity(),
                };
                let labels = pod.and_then(|p| p.metadata.labels.clone()).unwrap_or_default();
                let model = EndpointModel {
                    address,
                    port,
                    zone: ep.zone.clone().unwrap_or_default(),
                    labels,
                    ready,
                    capacity,
                    pod: pod_name,
                    service_account: pod.and_then(|p| meshed_service_account(p)),
                };
                match by_addr.get_mut(&address) {
                    Some(seen) if !seen.ready && model.ready => *seen = model,
                    Some(_) => {}
                    None => {
                        by_addr.insert(address, model);
                    }
                }
            }
        }
        let endpoints: Vec<EndpointModel> = by_addr.into_values().collect();

        let openapi = svc.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_OPENAPI)).and_then(|value| {
            let parsed = OpenapiRef::parse(value);
            if parsed.is_none() {
                out.problems.push(Problem::OpenapiAnnotation { service: key.clone(), value: value.clone() });
            }
            parsed
        });
        let openapi = match openapi {
            None => None,
            Some(OpenapiRef::ConfigMap { name: cm, key: data_key, .. }) => {
                out.configmaps.insert((namespace.clone(), cm.clone()));
                let origin = format!("configmap:{namespace}/{cm}/{data_key}");
                let read = objects.configmaps.and_then(|m| m.get(&model::service_key(&namespace, &cm)));
                match read {
                    None | Some(ConfigMapRead::Pending) => None,
                    Some(ConfigMapRead::Read(cm_obj)) => {
                        let content = configmap_document(cm_obj.as_deref(), &namespace, &cm, &data_key);
                        out.mesh.specs.insert(origin.clone(), content);
                        Some(origin)
                    }
                }
            }
            Some(OpenapiRef::Path(path)) => {
                let http =
                    svc_ports.iter().zip(&ports).find(|(_, p)| !matches!(p.protocol, Protocol::Grpc | Protocol::Tcp));
                match http {
                    None => {
                        out.problems.push(Problem::OpenapiNoPort { service: key.clone() });
                        None
                    }
                    Some((_, p)) => {
                        let origin = format!("http:{key}:{}{path}", p.port);
                        let candidates = endpoints
                            .iter()
                            .filter(|e| e.ready)
                            .map(|e| SocketAddr::new(e.address, if e.port != 0 { e.port } else { p.target_port }))
                            .collect();
                        out.fetches.push(Fetch { origin: origin.clone(), path, candidates });
                        let fetched = objects.fetched.and_then(|f| f.get(&origin));
                        fetched.map(|content| {
                            out.mesh.specs.insert(origin.clone(), content.clone());
                            origin
                        })
                    }
                }
            }
        };

        out.mesh.services.insert(
            key,
            ServiceModel {
                name: name.clone(),
                namespace: namespace.clone(),
                ports,
                virtual_ips,
                hostnames: model::default_hostnames(&namespace, name),
                openapi,
                endpoints,
                policy: Default::default(),
            },
        );
    }
    super::kube_policy::apply(&mut out.mesh, objects.namespaces, objects.policies, &mut out.problems);
    out
}

/// The service account a Pod's Neutrino proxy runs as: `spec.serviceAccountName`
/// (Kubernetes' default is "default") when the Pod carries the injected proxy (a
/// container or native-sidecar init container named [`PROXY_CONTAINER`]); `None` for a
/// Pod without one, which is not meshed.
pub fn meshed_service_account(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let proxy = |c: &k8s_openapi::api::core::v1::Container| c.name == PROXY_CONTAINER;
    let meshed = spec.containers.iter().any(proxy) || spec.init_containers.iter().flatten().any(proxy);
    meshed.then(|| spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()))
}

fn port_model(p: &ServicePort, slices: &[&EndpointSlice]) -> PortModel {
    let port = u16::try_from(p.port).unwrap_or(0);
    let from_slice = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|sp| sp.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or(""))
        .and_then(|sp| sp.port)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n != 0);
    let numeric = match &p.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|&n| n != 0),
        _ => None,
    };
    PortModel {
        port,
        target_port: from_slice.or(numeric).unwrap_or(port),
        protocol: protocol_of(p.app_protocol.as_deref(), p.name.as_deref()),
    }
}

/// A port's protocol from its `appProtocol`, else its name.
pub fn protocol_of(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let known = |s: &str| match s.to_ascii_lowercase().as_str() {
        "http" | "http1" => Some(Protocol::Http1),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" => Some(Protocol::Grpc),
        "tcp" => Some(Protocol::Tcp),
        _ => None,
    };
    app_protocol
        .and_then(known)
        .or_else(|| name.and_then(|n| known(n.split('-').next().unwrap_or(n))))
        .unwrap_or(Protocol::Unspecified)
}

fn configmap_document(cm: Option<&ConfigMap>, namespace: &str, name: &str, key: &str) -> SpecContent {
    let Some(cm) = cm else {
        return Err(format!(
            "OpenAPI document: ConfigMap {namespace}/{name} does not exist; create it or fix the {ANNOTATION_OPENAPI} annotation"
        ));
    };
    if let Some(text) = cm.data.as_ref().and_then(|d| d.get(key)) {
        return Ok(Arc::from(text.as_bytes()));
    }
    if let Some(bytes) = cm.binary_data.as_ref().and_then(|d| d.get(key)) {
        return Ok(Arc::from(bytes.0.as_slice()));
    }
    Err(format!(
        "OpenAPI document: ConfigMap {namespace}/{name} has no key {key:?} in data or binaryData; fix the {ANNOTATION_OPENAPI} annotation"
    ))
}

/// Which capacity dimension a resource name counts toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Cpu,
    Memory,
    Gpu,
}

fn dim_of(resource: &str) -> Option<Dim> {
    match resource {
        "cpu" => Some(Dim::Cpu),
        "memory" => Some(Dim::Memory),
        "gpu" => Some(Dim::Gpu),
        r if r.ends_with("/gpu") => Some(Dim::Gpu),
        _ => None,
    }
}

fn parse_dim(dim: Dim, value: &str) -> Result<u64, quantity::QuantityError> {
    match dim {
        Dim::Cpu => quantity::cpu_millis(value),
        Dim::Memory => quantity::memory_bytes(value),
        Dim::Gpu => quantity::whole_units(value),
    }
}

/// Capacity per dimension, `None` where nothing declared it.
type Declared = [Option<u64>; 3];

fn index(dim: Dim) -> usize {
    match dim {
        Dim::Cpu => 0,
        Dim::Memory => 1,
        Dim::Gpu => 2,
    }
}

/// Adds what one `resources` block declares: per dimension the requests, else the limits.
fn add_resources(into: &mut Declared, r: &ResourceRequirements, pod: &str, what: &str, problems: &mut Vec<Problem>) {
    let mut own: Declared = [None; 3];
    for map in [r.limits.as_ref(), r.requests.as_ref()].into_iter().flatten() {
        let mut from_map: Declared = [None; 3];
        for (name, Quantity(value)) in map {
            let Some(dim) = dim_of(name) else { continue };
            match parse_dim(dim, value) {
                Ok(v) => {
                    let slot = &mut from_map[index(dim)];
                    *slot = Some(slot.unwrap_or(0).saturating_add(v));
                }
                Err(e) => problems.push(Problem::Resources {
                    pod: pod.into(),
                    what: format!("{what} {name}"),
                    why: e.to_string(),
                }),
            }
        }
        // Requests (read second) replace limits dimension by dimension.
        for (slot, v) in own.iter_mut().zip(from_map) {
            if v.is_some() {
                *slot = v;
            }
        }
    }
    for (slot, v) in into.iter_mut().zip(own) {
        if let Some(v) = v {
            *slot = Some(slot.unwrap_or(0).saturating_add(v));
        }
    }
}

/// A Pod's capacity (the rules are in the module docs). `key` is "<namespace>/<pod>".
pub fn pod_capacity(key: &str, pod: &Pod, problems: &mut Vec<Problem>) -> Capacity {
    let mut declared: Declared = [None; 3];
    if let Some(spec) = &pod.spec {
        let mut pod_level: Declared = [None; 3];
        if let Some(r) = &spec.resources {
            add_resources(&mut pod_level, r, key, "pod resources", problems);
        }
        let mut containers: Declared = [None; 3];
        for c in spec.containers.iter().filter(|c| c.name != PROXY_CONTAINER) {
            if let Some(r) = &c.resources {
                add_resources(&mut containers, r, key, &format!("container {} resources", c.name), problems);
            }
        }
        for ((slot, p), c) in declared.iter_mut().zip(pod_level).zip(containers) {
            *slot = p.or(c);
        }
    }
    if let Some(value) = pod.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_CAPACITY)) {
        match parse_capacity_annotation(value) {
            Ok(over) => {
                for (slot, v) in declared.iter_mut().zip(over) {
                    if v.is_some() {
                        *slot = v;
                    }
                }
            }
            Err(why) => problems.push(Problem::CapacityAnnotation { pod: key.into(), value: value.clone(), why }),
        }
    }
    let capacity = Capacity {
        cpu_millis: declared[0].unwrap_or(DEFAULT_CPU_MILLIS),
        memory_bytes: declared[1].unwrap_or(DEFAULT_MEMORY_BYTES),
        gpu: declared[2].unwrap_or(0),
    };
    // Requests of zero everywhere: a proxy refuses an endpoint without capacity.
    if capacity == Capacity::default() { default_capacity() } else { capacity }
}

fn default_capacity() -> Capacity {
    Capacity { cpu_millis: DEFAULT_CPU_MILLIS, memory_bytes: DEFAULT_MEMORY_BYTES, gpu: 0 }
}

/// `cpu=2,memory=4Gi,nvidia.com/gpu=1`: the dimensions named, all or nothing.
pub fn parse_capacity_annotation(value: &str) -> Result<[Option<u64>; 3], String> {
    let mut out = [None; 3];
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, q) = item.split_once('=').ok_or_else(|| format!("{item:?} is not name=quantity"))?;
        let dim = dim_of(name.trim())
            .ok_or_else(|| format!("unknown resource {:?} (cpu, memory, <vendor>/gpu)", name.trim()))?;
        let v = parse_dim(dim, q.trim()).map_err(|e| e.to_string())?;
        out[index(dim)] = Some(v);
    }
    if out.iter().all(Option::is_none) {
        return Err("it names no resource".into());
    }
    if out.iter().flatten().all(|v| *v == 0) {
        return Err("every resource it names is zero".into());
    }
    Ok(out)
}
