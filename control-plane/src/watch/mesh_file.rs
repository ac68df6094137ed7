//! Parses and checks the mesh file (format: docs/mesh-file.md) into a [`MeshState`].
//!
//! A pure function of the file's bytes and path: every error names the file, a line
//! when one can be found, and what to change. It must not read other files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use neutrino_proto::Protocol;
use serde::Deserialize;
use thiserror::Error;

use super::mesh_policy::{self, FileMeshPolicy, FileServicePolicy};
use crate::model::{self, Capacity, EndpointModel, MeshState, PortModel, ServiceModel};
use crate::quantity;

#[derive(Debug, Error)]
pub enum MeshFileError {
    #[error("{path}:{line}:{column}: {message}")]
    Syntax { path: String, line: usize, column: usize, message: String },
    #[error("{path}:{line}: {what}: {message}")]
    Invalid { path: String, line: usize, what: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Vec<FileService>,
    #[serde(default)]
    policy: Option<FileMeshPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileService {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    ports: Vec<FilePort>,
    #[serde(default, rename = "virtualIP")]
    virtual_ip: Option<IpAddr>,
    #[serde(default, rename = "virtualIPs")]
    virtual_ips: Vec<IpAddr>,
    #[serde(default)]
    hostnames: Option<Vec<String>>,
    #[serde(default)]
    openapi: Option<PathBuf>,
    #[serde(default)]
    endpoints: Vec<FileEndpoint>,
    /// The default for the endpoints' `serviceAccount`.
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    policy: Option<FileServicePolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default)]
    protocol: FileProtocol,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum FileProtocol {
    #[default]
    Auto,
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    address: IpAddr,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "yes")]
    ready: bool,
    capacity: FileCapacity,
    #[serde(default)]
    name: String,
    /// Set: the endpoint runs a Neutrino proxy as this service account; "": it does not
    /// (even when the service gives a default).
    #[serde(default, rename = "serviceAccount")]
    service_account: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCapacity {
    #[serde(deserialize_with = "cpu")]
    cpu: u64,
    #[serde(deserialize_with = "memory")]
    memory: u64,
    #[serde(default, deserialize_with = "devices")]
    gpu: u64,
}

fn default_namespace() -> String {
    "default".to_string()
}

fn yes() -> bool {
    true
}

/// A quantity written as a YAML string ("500m") or number (4, 0.5).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawQuantity {
    Text(String),
    Int(u64),
    Float(f64),
}

impl RawQuantity {
    fn text(self) -> String {
        match self {
            RawQuantity::Text(s) => s,
            RawQuantity::Int(i) => i.to_string(),
            RawQuantity::Float(f) => f.to_string(),
        }
    }
}

fn quantity_with<'de, D: serde::Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<u64, quantity::QuantityError>,
) -> Result<u64, D::Error> {
    let raw = RawQuantity::deserialize(d)?.text();
    parse(&raw).map_err(serde::de::Error::custom)
}

fn cpu<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    quantity_with(d, quantity::cpu_millis)
}
fn memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    quantity_with(d, quantity::memory_bytes)
}
fn devices<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    quantity_with(d, quantity::whole_units)
}

/// Parses the mesh file at `path` whose content is `bytes`. Relative OpenAPI paths are
/// resolved against the file's directory.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<MeshState, MeshFileError> {
    let shown = path.display().to_string();
    let doc: FileDoc = serde_yaml_ng::from_slice(bytes).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        // The location is already in front; drop serde's copy of it at the end.
        let text = e.to_string();
        let message = match text.rfind(" at line ") {
            Some(i) if text[i..].contains(" column ") => text[..i].to_string(),
            _ => text,
        };
        MeshFileError::Syntax { path: shown.clone(), line, column, message }
    })?;
    let text = String::from_utf8_lossy(bytes);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut mesh = MeshState::default();
    if let Some(p) = doc.policy {
        mesh.policy = mesh_policy::mesh_policy(p).map_err(|message| MeshFileError::Invalid {
            path: shown.clone(),
            line: line_of_top_level(&text, "policy"),
            what: "policy".into(),
            message,
        })?;
    }
    let mut claimed: BTreeMap<(IpAddr, u16), String> = BTreeMap::new();
    let mut hostnames: BTreeMap<String, String> = BTreeMap::new();
    for (i, svc) in doc.services.into_iter().enumerate() {
        let what = format!("services[{i}] ({}/{})", svc.namespace, svc.name);
        // The line is looked up only for an error: finding it scans the file.
        let invalid = |message: String| MeshFileError::Invalid {
            path: shown.clone(),
            line: line_of_service(&text, i),
            what: what.clone(),
            message,
        };
        let service = check_service(svc, base).map_err(invalid)?;
        let key = service.key();
        for vip in &service.virtual_ips {
            for p in &service.ports {
                if let Some(other) = claimed.insert((*vip, p.port), key.clone()) {
                    return Err(invalid(format!(
                        "virtual IP {vip} port {} is already used by {other}; give each service its own virtual IP",
                        p.port
                    )));
                }
            }
        }
        for h in &service.hostnames {
            if let Some(other) = hostnames.insert(h.clone(), key.clone())
                && other != key
            {
                return Err(invalid(format!(
                    "hostname {h} is already used by {other}; each hostname names one service"
                )));
            }
        }
        if mesh.services.insert(key.clone(), service).is_some() {
            return Err(invalid(format!("{key} is defined twice; merge the two entries")));
        }
    }
    Ok(mesh)
}

fn check_service(svc: FileService, base: &Path) -> Result<ServiceModel, String> {
    check_dns_label("name", &svc.name)?;
    check_dns_label("namespace", &svc.namespace)?;
    if svc.ports.is_empty() {
        return Err("has no ports; add at least one under `ports:`".into());
    }
    let mut ports = Vec::with_capacity(svc.ports.len());
    let mut seen = BTreeSet::new();
    for p in &svc.ports {
        if p.port == 0 || p.target_port == Some(0) {
            return Err("port 0 is not a valid port; use 1-65535".into());
        }
        if !seen.insert(p.port) {
            return Err(format!("port {} is listed twice", p.port));
        }
        ports.push(PortModel {
            port: p.port,
            target_port: p.target_port.unwrap_or(p.port),
            protocol: match p.protocol {
                FileProtocol::Auto => Protocol::Unspecified,
                FileProtocol::Http => Protocol::Http1,
                FileProtocol::Http2 => Protocol::Http2,
                FileProtocol::Grpc => Protocol::Grpc,
                FileProtocol::Tcp => Protocol::Tcp,
            },
        });
    }
    let mut virtual_ips = svc.virtual_ips;
    virtual_ips.extend(svc.virtual_ip);
    virtual_ips.sort();
    virtual_ips.dedup();
    let hostnames = match svc.hostnames {
        Some(h) => h.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
        None => model::default_hostnames(&svc.namespace, &svc.name),
    };
    let mut endpoints = Vec::with_capacity(svc.endpoints.len());
    let mut seen = BTreeSet::new();
    for (j, ep) in svc.endpoints.into_iter().enumerate() {
        let port = ep.port.unwrap_or(0);
        if !seen.insert((ep.address, port)) {
            return Err(format!("endpoints[{j}]: {}:{port} is listed twice", ep.address));
        }
        let c = &ep.capacity;
        if c.cpu == 0 && c.memory == 0 && c.gpu == 0 {
            return Err(format!("endpoints[{j}] ({}): capacity is all zero; give at least cpu and memory", ep.address));
        }
        let service_account =
            mesh_policy::service_account(&svc.namespace, svc.service_account.as_deref(), ep.service_account)
                .map_err(|e| format!("endpoints[{j}] ({}): {e}", ep.address))?;
        endpoints.push(EndpointModel {
            address: ep.address,
            port,
            zone: ep.zone,
            labels: ep.labels,
            ready: ep.ready,
            capacity: Capacity { cpu_millis: c.cpu, memory_bytes: c.memory, gpu: c.gpu },
            pod: ep.name,
            service_account,
        });
    }
    if let Some(sa) = svc.service_account.as_deref().filter(|s| !s.is_empty()) {
        mesh_policy::service_account(&svc.namespace, Some(sa), None)?;
    }
    let policy = mesh_policy::service_policy(svc.policy)?;
    Ok(ServiceModel {
        name: svc.name,
        namespace: svc.namespace,
        ports,
        virtual_ips,
        hostnames,
        openapi: svc.openapi.map(|p| if p.is_absolute() { p } else { base.join(p) }).map(|p| p.display().to_string()),
        endpoints,
        policy,
    })
}

/// Kubernetes names: lower-case alphanumerics and '-', at most 63 characters.
fn check_dns_label(field: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok { Ok(()) } else { Err(format!("{field} {v:?} is not a DNS label (a-z, 0-9 and '-', at most 63 characters)")) }
}

/// 1-based line of the top-level `key:`, or 0.
fn line_of_top_level(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(':')))
        .map_or(0, |i| i + 1)
}

/// 1-based line of the `i`th item of the top-level `services:` list, for messages about
/// a whole service. Best effort: 0 when it cannot be found.
fn line_of_service(text: &str, i: usize) -> usize {
    let mut in_services = false;
    let mut item_indent: Option<usize> = None;
    let mut n = 0;
    for (no, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with("services:") && indent == 0 {
            in_services = true;
            continue;
        }
        if !in_services || trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if indent == 0 && !trimmed.starts_with('-') {
            break;
        }
        if trimmed.starts_with("- ") || trimmed == "-" {
            let first = *item_indent.get_or_insert(indent);
            if indent == first {
                if n == i {
                    return no + 1;
                }
                n += 1;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: orders
    namespace: shop
    virtualIP: 10.96.0.10
    ports:
      - port: 80
        targetPort: 8080
        protocol: http
    openapi: specs/orders.yaml
    endpoints:
      - address: 127.0.0.1
        port: 8081
        zone: a
        labels: {version: v1}
        capacity: {cpu: "4", memory: "8Gi", gpu: 1}
      - address: 127.0.0.2
        capacity: {cpu: 500m, memory: 512Mi}
        ready: false
  - name: users
    ports: [{port: 9000}]
"#;

    fn parse_str(s: &str) -> Result<MeshState, MeshFileError> {
        parse(Path::new("/etc/neutrino/mesh.yaml"), s.as_bytes())
    }

    #[test]
    fn parses_the_documented_format() {
        let mesh = parse_str(GOOD).expect("valid");
        let orders = &mesh.services["shop/orders"];
        assert_eq!(orders.ports[0].target_port, 8080);
        assert_eq!(orders.ports[0].protocol, Protocol::Http1);
        assert_eq!(orders.virtual_ips, vec!["10.96.0.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(orders.openapi.as_deref(), Some("/etc/neutrino/specs/orders.yaml"));
        assert_eq!(orders.endpoints[0].capacity, Capacity { cpu_millis: 4000, memory_bytes: 8 << 30, gpu: 1 });
        assert!(!orders.endpoints[1].ready);
        let users = &mesh.services["default/users"];
        assert_eq!(users.ports[0].target_port, 9000);
        assert_eq!(users.hostnames, ["users.default", "users.default.svc", "users.default.svc.cluster.local"]);
    }

    #[test]
    fn syntax_and_type_errors_give_file_line_and_reason() {
        let bad = GOOD.replace("cpu: \"4\"", "cpu: \"4x\"");
        let e = parse_str(&bad).expect_err("bad quantity").to_string();
        assert!(e.starts_with("/etc/neutrino/mesh.yaml:16:"), "{e}");
        assert!(e.contains("invalid quantity \"4x\""), "{e}");

        let bad = GOOD.replace("address: 127.0.0.2", "address: not-an-ip");
        let e = parse_str(&bad).expect_err("bad ip").to_string();
        assert!(e.starts_with("/etc/neutrino/mesh.yaml:17:"), "{e}");

        let bad = GOOD.replace("zone: a", "zoen: a");
        let e = parse_str(&bad).expect_err("unknown field").to_string();
        assert!(e.contains("unknown field `zoen`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_service_and_its_line() {
        let bad = GOOD.replace("port: 9000", "port: 0");
        let e = parse_str(&bad).expect_err("port 0").to_string();
        assert!(e.starts_with("/etc/neutrino/mesh.yaml:20: services[1] (default/users)"), "{e}");

        let bad = format!("{GOOD}  - name: orders\n    namespace: shop\n    ports: [{{port: 1}}]\n");
        let e = parse_str(&bad).expect_err("dup").to_string();
        assert!(e.contains("shop/orders is defined twice"), "{e}");

        let bad = GOOD.replace("name: users", "name: Users_1");
        assert!(parse_str(&bad).expect_err("label").to_string().contains("not a DNS label"));

        let bad = GOOD.replace("{cpu: 500m, memory: 512Mi}", "{cpu: 0, memory: 0}");
        assert!(parse_str(&bad).expect_err("zero").to_string().contains("capacity is all zero"));
    }

    #[test]
    fn shared_virtual_ip_port_is_refused() {
        let bad = GOOD.replace("    ports: [{port: 9000}]", "    virtualIP: 10.96.0.10\n    ports: [{port: 80}]");
        let e = parse_str(&bad).expect_err("vip clash").to_string();
        assert!(e.contains("already used by shop/orders"), "{e}");
    }

    #[test]
    fn the_same_name_in_two_namespaces_is_fine_but_a_shared_hostname_is_not() {
        let two = format!("{GOOD}  - name: users\n    namespace: shop\n    ports: [{{port: 9000}}]\n");
        parse_str(&two).expect("users in default and in shop");
        let clash = format!("{two}  - name: other\n    hostnames: [users.shop]\n    ports: [{{port: 1}}]\n");
        let e = parse_str(&clash).expect_err("hostname clash").to_string();
        assert!(e.contains("hostname users.shop is already used by shop/users"), "{e}");
    }

    #[test]
    fn empty_file_is_an_empty_mesh() {
        assert_eq!(parse_str("services: []\n").expect("ok"), MeshState::default());
    }

    const POLICY: &str = r#"policy:
  default: deny
  tls: permissive
  namespaces:
    payments: {tls: strict}
services:
  - name: ledger
    namespace: payments
    serviceAccount: ledger
    ports: [{port: 80}]
    policy:
      tls: permissive
      allow:
        - from: [spiffe://cluster.local/ns/shop/sa/orders]
          operations: [postEntry]
          methods: [post]
          paths: [/entries, /entries/*]
        - from: ["*"]
    endpoints:
      - address: 10.1.0.7
        capacity: {cpu: "2", memory: 4Gi}
      - address: 10.1.0.8
        serviceAccount: ""
        capacity: {cpu: "2", memory: 4Gi}
      - address: 10.1.0.9
        serviceAccount: ledger-canary
        capacity: {cpu: "2", memory: 4Gi}
  - name: web
    ports: [{port: 80}]
    endpoints:
      - address: 10.1.0.10
        capacity: {cpu: "2", memory: 4Gi}
"#;

    #[test]
    fn identities_and_policies_are_read() {
        use neutrino_proto::{PolicyAction, TlsMode};
        let mesh = parse_str(POLICY).expect("valid");
        assert_eq!(mesh.policy.default_action, PolicyAction::Deny);
        assert_eq!(mesh.policy.tls, TlsMode::Permissive);
        assert_eq!(mesh.policy.namespaces["payments"], TlsMode::Strict);
        let ledger = &mesh.services["payments/ledger"];
        let sas: Vec<Option<&str>> = ledger.endpoints.iter().map(|e| e.service_account.as_deref()).collect();
        assert_eq!(sas, [Some("ledger"), None, Some("ledger-canary")]);
        assert_eq!(ledger.policy.tls, Some(TlsMode::Permissive));
        assert_eq!(ledger.policy.allow.len(), 2);
        assert_eq!(ledger.policy.allow[0].methods, ["POST"]);
        assert_eq!(ledger.policy.allow[1].from, ["*"]);
        let web = &mesh.services["default/web"];
        assert_eq!(web.endpoints[0].service_account, None, "no serviceAccount: not meshed");
        assert_eq!(web.policy, Default::default());
        assert_eq!(parse_str(GOOD).expect("valid").policy, Default::default(), "no policy: allow, permissive");
    }

    #[test]
    fn policy_errors_name_the_service_the_rule_and_the_line() {
        let e = |text: &str| parse_str(text).expect_err(text).to_string();
        let bad = POLICY.replace("from: [\"*\"]", "from: [orders]");
        let msg = e(&bad);
        assert!(msg.starts_with("/etc/neutrino/mesh.yaml:7: services[0] (payments/ledger): policy.allow[1].from: \"orders\" is not a SPIFFE id"), "{msg}");
        let msg = e(&POLICY.replace("methods: [post]", "methods: [\"po st\"]"));
        assert!(msg.contains("(payments/ledger): policy.allow[0].methods: \"PO ST\" is not an HTTP method"), "{msg}");
        let msg = e(&POLICY.replace("/entries/*]", "entries/*]"));
        assert!(msg.contains("policy.allow[0].paths: \"entries/*\" must start with '/'"), "{msg}");
        let msg = e(&POLICY.replace("serviceAccount: ledger-canary", "serviceAccount: Ledger"));
        assert!(msg.contains("(payments/ledger): endpoints[2] (10.1.0.9): serviceAccount: service account \"Ledger\" is not a DNS subdomain name"), "{msg}");
        let msg = e(&POLICY.replace("    serviceAccount: ledger\n", "    serviceAccount: Ledger\n"));
        assert!(
            msg.contains("(payments/ledger): endpoints[0] (10.1.0.7): serviceAccount: service account \"Ledger\""),
            "{msg}"
        );
        let no_eps = "services:\n- name: a\n  serviceAccount: A_1\n  ports: [{port: 1}]\n";
        assert!(
            e(no_eps).contains("services[0] (default/a): serviceAccount: service account \"A_1\""),
            "{}",
            e(no_eps)
        );
        let msg = e(&POLICY.replace("    payments: {tls: strict}", "    Payments: {tls: strict}"));
        assert!(
            msg.starts_with("/etc/neutrino/mesh.yaml:1: policy: namespaces: \"Payments\" is not a namespace name"),
            "{msg}"
        );
        let msg = e(&POLICY.replace("default: deny", "default: block"));
        assert!(
            msg.starts_with(
                "/etc/neutrino/mesh.yaml:2:12: policy.default: unknown variant `block`, expected `allow` or `deny`"
            ),
            "{msg}"
        );
        let msg = e(&POLICY.replace("      tls: permissive", "      tls: mtls"));
        assert!(
            msg.contains("services[0].policy.tls: unknown variant `mtls`, expected `permissive` or `strict`"),
            "{msg}"
        );
        let msg = e(&POLICY.replace("- from: [\"*\"]", "- form: [\"*\"]"));
        assert!(
            msg.contains("unknown field `form`, expected one of `from`, `operations`, `methods`, `paths`"),
            "{msg}"
        );
        let msg = e(&format!("{GOOD}version: 2\n"));
        assert!(msg.contains("unknown field `version`, expected `services` or `policy`"), "{msg}");
    }
}
