//! The control plane's source-neutral view of the mesh: what discovery found, before it
//! is translated into resources. Sources build it; translate reads it. Plain data, no IO.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use neutrino_proto::{PolicyAction, Protocol, TlsMode};

/// Everything discovery knows, keyed by "<namespace>/<name>".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshState {
    pub services: BTreeMap<String, ServiceModel>,
    /// OpenAPI documents by origin (see [`ServiceModel::openapi`]), as the source read
    /// them: the bytes, or why they could not be read.
    pub specs: BTreeMap<String, SpecContent>,
    /// Mesh-wide and per-namespace authorization settings.
    pub policy: MeshPolicy,
}

/// What applies to every service unless something narrower says otherwise.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshPolicy {
    /// For services without allow rules (default: allow).
    pub default_action: PolicyAction,
    /// Mesh-wide TLS mode (default: permissive).
    pub tls: TlsMode,
    /// Per-namespace TLS modes, overriding `tls`.
    pub namespaces: BTreeMap<String, TlsMode>,
}

/// A service's own authorization settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePolicy {
    /// Overrides the namespace's and the mesh's TLS mode.
    pub tls: Option<TlsMode>,
    /// No rules: the mesh default applies. Rules: only what one admits is allowed.
    pub allow: Vec<AllowRuleModel>,
    /// Set when a policy for the service could not be read (Kubernetes): the service
    /// then denies every caller until it is fixed, rather than fall open. Says why.
    pub broken: Option<String>,
}

/// One allow rule, as `neutrino.mesh.v1.AllowRule` means it (every non-empty list
/// must match; empty `from`: any caller, authenticated or not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowRuleModel {
    /// SPIFFE ids or patterns (`*`, `spiffe://<td>/*`, `spiffe://<td>/ns/<ns>/*`).
    pub from: Vec<String>,
    pub operations: Vec<String>,
    /// Upper-case.
    pub methods: Vec<String>,
    /// Exact, or a prefix when ending in '*'.
    pub paths: Vec<String>,
}

/// An allow rule's problem, for sources to wrap with where the rule is.
pub fn check_rule(rule: &AllowRuleModel) -> Result<(), String> {
    for id in &rule.from {
        neutrino_proto::spiffe::check_pattern(id).map_err(|e| format!("from: {e}"))?;
    }
    for op in &rule.operations {
        if op.trim().is_empty() {
            return Err("operations: an operation id is empty".into());
        }
    }
    for m in &rule.methods {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') {
            return Err(format!("methods: {m:?} is not an HTTP method (letters, e.g. GET or POST)"));
        }
    }
    for p in &rule.paths {
        if !p.starts_with('/') {
            return Err(format!("paths: {p:?} must start with '/'"));
        }
        if p.trim_end_matches('*').contains('*') || p.ends_with("**") {
            return Err(format!("paths: {p:?} may only have one '*', at the end (a prefix)"));
        }
    }
    Ok(())
}

/// Normalises a rule's methods to upper case (sources accept `get`).
pub fn upper_methods(rule: &mut AllowRuleModel) {
    for m in &mut rule.methods {
        m.make_ascii_uppercase();
    }
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
    pub policy: ServicePolicy,
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
    /// The service account the endpoint's Neutrino proxy runs as; `None`: the endpoint
    /// has no proxy (not meshed, called in plaintext). Its SPIFFE id is made in
    /// translate, with the trust domain and the service's namespace.
    pub service_account: Option<String>,
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
