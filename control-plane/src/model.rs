//! The control plane's source-neutral view of the mesh: what discovery found, before it
//! is translated into resources. Sources build it; translate reads it. Plain data, no IO.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use neutrino_proto::Protocol;

/// Everything discovery knows, keyed by "<namespace>/<name>".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshState {
    pub services: BTreeMap<String, ServiceModel>,
    /// OpenAPI documents by origin (see [`ServiceModel::openapi`]), as the source read
    /// them: the bytes, or why they could not be read.
    pub specs: BTreeMap<String, SpecContent>,
}

/// A document's bytes, or why the source could not get them.
pub type SpecContent = Result<Arc<[u8]>, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceModel {
    pub name: String,
    pub namespace: String,
    pub ports: Vec<PortModel>,
    pub virtual_ips: Vec<IpAddr>,
    pub hostnames: Vec<String>,
    /// Where the service's OpenAPI document comes from: a key of [`MeshState::specs`]
    /// (for the file source, the document's path, resolved against the mesh file's
    /// directory).
    pub openapi: Option<String>,
    pub endpoints: Vec<EndpointModel>,
}

impl ServiceModel {
    pub fn key(&self) -> String {
        service_key(&self.namespace, &self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortModel {
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpu: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointModel {
    pub address: IpAddr,
    /// 0: the service port's target port.
    pub port: u16,
    pub zone: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub capacity: Capacity,
    pub pod: String,
}

/// The load a pod's inbound proxy reported: the cost in flight from all callers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    /// cpu millis, memory bytes, GPUs.
    pub in_flight: [u64; 3],
    /// Milliseconds since the Unix epoch when it was measured.
    pub measured_at_ms: u64,
}

/// Reports by pod key ("<namespace>/<pod>", see [`pod_key`]).
pub type Reports = std::collections::HashMap<String, LoadReport>;

/// How a pod is named in load reports: "<namespace>/<pod>".
pub fn pod_key(namespace: &str, pod: &str) -> String {
    format!("{namespace}/{pod}")
}

/// Resource names of per-service resources: "<namespace>/<name>".
pub fn service_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The names a service answers to by default, as Kubernetes DNS would give them.
/// The bare `<name>` is not among them: it means different services in different
/// namespaces, so a proxy resolves it against its own namespace.
pub fn default_hostnames(namespace: &str, name: &str) -> Vec<String> {
    vec![
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ]
}
