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
        endpoints.push(EndpointModel {
            address: ep.address,
            port,
            zone: ep.zone,
            labels: ep.labels,
            ready: ep.ready,
            capacity: Capacity { cpu_millis: c.cpu, memory_bytes: c.memory, gpu: c.gpu },
            pod: ep.name,
        });
    }
    Ok(ServiceModel {
        name: svc.name,
        namespace: svc.namespace,
        ports,
        virtual_ips,
        hostnames,
        openapi: svc.openapi.map(|p| if p.is_absolute() { p } else { base.join(p) }).map(|p| p.display().to_string()),
        endpoints,
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
}
