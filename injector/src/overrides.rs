//! Step 2, overrides: a pod's `config.neutrino.io/*` annotations, checked into [`Overrides`].
//!
//! Every value is checked here, before anything is built, and a bad one is an
//! [`AnnotationError`] naming the annotation, the value and what is accepted: the webhook
//! then denies the pod (as Istio does for its annotations) rather than start it with a
//! proxy configured differently from what was asked. An unknown key under the prefix is
//! an error too, so a typo (`skip-inbound-port`) is not silently ignored.
//!
//! This module must not build containers or patches; it only reads annotations. The
//! value checkers ([`ports`], [`cidrs`], [`quantity`], [`log_level`]) are shared with the
//! flags in [`crate::config`].

use std::net::IpAddr;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::CONFIG_PREFIX;

/// Inbound ports never redirected to the proxy (`--inbound-exclude-ports`).
pub const SKIP_INBOUND_PORTS: &str = "config.neutrino.io/skip-inbound-ports";
/// Outbound ports never redirected to the proxy (`--outbound-exclude-ports`).
pub const SKIP_OUTBOUND_PORTS: &str = "config.neutrino.io/skip-outbound-ports";
/// Only these inbound ports are redirected: `*` (all), a list, or empty for none (`--inbound-include-ports`).
pub const INCLUDE_INBOUND_PORTS: &str = "config.neutrino.io/include-inbound-ports";
/// Only these outbound CIDRs are redirected: `*` (all), a list, or empty for none (`--outbound-include-cidrs`).
pub const INCLUDE_OUTBOUND_CIDRS: &str = "config.neutrino.io/include-outbound-cidrs";
/// Outbound CIDRs never redirected, e.g. `169.254.169.254/32` (`--outbound-exclude-cidrs`).
pub const SKIP_OUTBOUND_CIDRS: &str = "config.neutrino.io/skip-outbound-cidrs";
pub const PROXY_CPU_REQUEST: &str = "config.neutrino.io/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "config.neutrino.io/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "config.neutrino.io/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "config.neutrino.io/proxy-memory-limit";
/// The proxy's log filter (`NEUTRINO_LOG`): `info`, `debug`, `neutrino_proxy=debug,info`, ...
pub const LOG_LEVEL: &str = "config.neutrino.io/log-level";
/// Where this pod's proxy exports traces (`OTEL_EXPORTER_OTLP_ENDPOINT`): an http(s) URL,
/// or empty for no traces even when the injector's `--otlp-endpoint` is set.
pub const OTLP_ENDPOINT: &str = "config.neutrino.io/otlp-endpoint";

/// Every annotation under [`CONFIG_PREFIX`] the injector knows.
pub const KNOWN: [&str; 11] = [
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    INCLUDE_INBOUND_PORTS,
    INCLUDE_OUTBOUND_CIDRS,
    SKIP_OUTBOUND_CIDRS,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    LOG_LEVEL,
    OTLP_ENDPOINT,
];

/// A bad `config.neutrino.io/*` annotation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("checking annotation {annotation}: {value:?} {reason}; fix the value or remove the annotation")]
pub struct AnnotationError {
    pub annotation: String,
    pub value: String,
    pub reason: String,
}

/// All, or only the listed items (`*` and a missing annotation mean all, `""` none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    All,
    Only(Vec<String>),
}

/// What a pod's annotations change, checked and normalized (lists sorted, deduplicated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overrides {
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    pub include_inbound_ports: Select,
    pub include_outbound_cidrs: Select,
    pub skip_outbound_cidrs: Vec<String>,
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub log_level: Option<String>,
    /// `None`: the config's endpoint; `Some("")`: no traces; else this endpoint.
    pub otlp_endpoint: Option<String>,
}

impl Default for Overrides {
    fn default() -> Self {
        Overrides {
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            include_inbound_ports: Select::All,
            include_outbound_cidrs: Select::All,
            skip_outbound_cidrs: Vec::new(),
            cpu_request: None,
            cpu_limit: None,
            memory_request: None,
            memory_limit: None,
            log_level: None,
            otlp_endpoint: None,
        }
    }
}

/// Reads the overrides from a pod's `metadata.annotations` (absent: none).
pub fn parse(annotations: Option<&Map<String, Value>>) -> Result<Overrides, AnnotationError> {
    let mut out = Overrides::default();
    let Some(annotations) = annotations else { return Ok(out) };
    for (key, value) in annotations {
        if !key.starts_with(CONFIG_PREFIX) {
            continue;
        }
        let err =
            |value: &str, reason: String| AnnotationError { annotation: key.clone(), value: value.to_string(), reason };
        let Some(text) = value.as_str() else {
            return Err(err(
                &value.to_string(),
                "is not a string (annotation values are strings: quote it in YAML)".into(),
            ));
        };
        let text = text.trim();
        match key.as_str() {
            SKIP_INBOUND_PORTS => out.skip_inbound_ports = ports(text).map_err(|r| err(text, r))?,
            SKIP_OUTBOUND_PORTS => out.skip_outbound_ports = ports(text).map_err(|r| err(text, r))?,
            INCLUDE_INBOUND_PORTS => {
                out.include_inbound_ports = select(text, |s| ports(s).map(|p| p.iter().map(u16::to_string).collect()))
                    .map_err(|r| err(text, r))?;
            }
            INCLUDE_OUTBOUND_CIDRS => out.include_outbound_cidrs = select(text, cidrs).map_err(|r| err(text, r))?,
            SKIP_OUTBOUND_CIDRS => out.skip_outbound_cidrs = cidrs(text).map_err(|r| err(text, r))?,
            PROXY_CPU_REQUEST => out.cpu_request = Some(quantity_string(text).map_err(|r| err(text, r))?),
            PROXY_CPU_LIMIT => out.cpu_limit = Some(quantity_string(text).map_err(|r| err(text, r))?),
            PROXY_MEMORY_REQUEST => out.memory_request = Some(quantity_string(text).map_err(|r| err(text, r))?),
            PROXY_MEMORY_LIMIT => out.memory_limit = Some(quantity_string(text).map_err(|r| err(text, r))?),
            LOG_LEVEL => out.log_level = Some(log_level(text).map_err(|r| err(text, r))?),
            OTLP_ENDPOINT => out.otlp_endpoint = Some(otlp_endpoint(text).map_err(|r| err(text, r))?),
            _ => {
                let known = KNOWN.iter().map(|k| k.trim_start_matches(CONFIG_PREFIX)).collect::<Vec<_>>();
                return Err(err(
                    text,
                    format!("is under an unknown annotation; known ones are {CONFIG_PREFIX}{{{}}}", known.join(",")),
                ));
            }
        }
    }
    Ok(out)
}

fn quantity_string(s: &str) -> Result<String, String> {
    quantity(s).map(|_| s.to_string())
}

fn select(s: &str, parse: impl Fn(&str) -> Result<Vec<String>, String>) -> Result<Select, String> {
    if s.split(',').any(|item| item.trim() == "*") {
        return Ok(Select::All);
    }
    parse(s).map(Select::Only)
}

/// A comma-separated list of ports (1-65535), sorted and deduplicated; empty items ignored.
pub fn ports(s: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p > 0 => out.push(p),
            _ => {
                return Err(format!("has {item:?}, which is not a port (1-65535); write a list such as \"8080,9090\""));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A comma-separated list of IP networks (`10.0.0.0/8`, `fd00::/8`, or a bare address),
/// returned as written, sorted and deduplicated.
pub fn cidrs(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (addr, prefix) = item.split_once('/').map_or((item, None), |(a, p)| (a, Some(p)));
        let bad = || format!("has {item:?}, which is not an IP address or CIDR (e.g. 10.0.0.0/8, fd00::/8)");
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if let Some(p) = prefix {
            match p.parse::<u8>() {
                Ok(p) if p <= max => {}
                _ => return Err(format!("has {item:?}, whose prefix length is out of range (0-{max})")),
            }
        }
        out.push(item.to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Parses a Kubernetes resource quantity (`10m`, `1`, `0.5`, `128Mi`, `1e3`, `2G`) to its
/// value, for comparing a request with a limit. Negative quantities are refused.
pub fn quantity(s: &str) -> Result<f64, String> {
    let bad =
        |why: &str| format!("is not a resource quantity ({why}); write e.g. 100m or 1 for CPU, 64Mi or 1Gi for memory");
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    if s.starts_with('-') {
        return Err("is negative; a request or limit must be zero or more".into());
    }
    if number.is_empty() || number == "." || number.matches('.').count() > 1 || number.contains('+') {
        return Err(bad("no number"));
    }
    let value: f64 = number.parse().map_err(|_| bad("no number"))?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e = &exp[1..];
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("bad exponent"));
            }
            let e: i32 = e.parse().map_err(|_| bad("bad exponent"))?;
            10f64.powi(e)
        }
        other => return Err(bad(&format!("unknown suffix {other:?}; use m, k, M, G, Ki, Mi, Gi, ..."))),
    };
    Ok(value * scale)
}

/// Checks an OTLP/gRPC collector endpoint as the proxy's `OTEL_EXPORTER_OTLP_ENDPOINT`
/// takes it: `http://` or `https://`, a host, an optional port, nothing else odd. Empty is
/// returned as is (it means no traces, where that is allowed).
pub fn otlp_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(String::new());
    }
    let hint = "write an http(s) URL such as http://jaeger.neutrino-system.svc:4317";
    let uri: http::Uri = s.parse().map_err(|e| format!("is not a URL ({e}); {hint}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(format!("has the scheme {other:?}; the proxy exports OTLP over gRPC: {hint}")),
        None => return Err(format!("has no scheme; {hint}")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("has no host; {hint}"));
    }
    // A port the URI parser could not read as a number 1-65535 (`:99999`, `:0`).
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let has_port = authority.rsplit(']').next().is_some_and(|tail| tail.contains(':'));
    if has_port && uri.port_u16().is_none_or(|p| p == 0) {
        return Err(format!("has a port that is not 1-65535; {hint}"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) || uri.query().is_some() {
        return Err(format!("has credentials or a query, which the exporter does not take; {hint}"));
    }
    Ok(s.to_string())
}

/// Checks a log filter as the proxy's `--log` takes it: comma-separated directives, each
/// a level or `target=level` (levels: trace, debug, info, warn, error, off).
pub fn log_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let bad = |d: &str| {
        format!("has {d:?}, which is not a level ({}) or target=level such as neutrino_proxy=debug", LEVELS.join(", "))
    };
    if s.is_empty() {
        return Err(bad(s));
    }
    for directive in s.split(',').map(str::trim) {
        let (target, level) = directive.split_once('=').map_or((None, directive), |(t, l)| (Some(t), l));
        let level_ok = LEVELS.contains(&level.to_ascii_lowercase().as_str());
        let target_ok = target.is_none_or(|t| {
            !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
        });
        if !(level_ok && target_ok) {
            return Err(bad(directive));
        }
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse_json(v: Value) -> Result<Overrides, AnnotationError> {
        parse(v.as_object())
    }

    #[test]
    fn no_annotations_no_overrides() {
        assert_eq!(parse(None), Ok(Overrides::default()));
        assert_eq!(parse_json(json!({"other.io/x": "y"})), Ok(Overrides::default()));
    }

    #[test]
    fn every_override_is_read_and_normalized() {
        let o = parse_json(json!({
            SKIP_INBOUND_PORTS: "9090, 22,22",
            SKIP_OUTBOUND_PORTS: "5432",
            INCLUDE_INBOUND_PORTS: "8080",
            INCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8,fd00::/8",
            SKIP_OUTBOUND_CIDRS: "169.254.169.254",
            PROXY_CPU_REQUEST: "50m",
            PROXY_CPU_LIMIT: "2",
            PROXY_MEMORY_REQUEST: "64Mi",
            PROXY_MEMORY_LIMIT: "1Gi",
            LOG_LEVEL: "neutrino_proxy=debug,info",
            OTLP_ENDPOINT: "https://otel.example:4317",
        }))
        .expect("valid");
        assert_eq!(o.skip_inbound_ports, [22, 9090]);
        assert_eq!(o.skip_outbound_ports, [5432]);
        assert_eq!(o.include_inbound_ports, Select::Only(vec!["8080".into()]));
        assert_eq!(o.include_outbound_cidrs, Select::Only(vec!["10.0.0.0/8".into(), "fd00::/8".into()]));
        assert_eq!(o.skip_outbound_cidrs, ["169.254.169.254"]);
        assert_eq!(o.memory_limit.as_deref(), Some("1Gi"));
        assert_eq!(o.log_level.as_deref(), Some("neutrino_proxy=debug,info"));
        assert_eq!(o.otlp_endpoint.as_deref(), Some("https://otel.example:4317"));
        assert_eq!(parse_json(json!({OTLP_ENDPOINT: " "})).expect("off").otlp_endpoint.as_deref(), Some(""));
        let o = parse_json(json!({INCLUDE_INBOUND_PORTS: "*", INCLUDE_OUTBOUND_CIDRS: ""})).expect("valid");
        assert_eq!(o.include_inbound_ports, Select::All);
        assert_eq!(o.include_outbound_cidrs, Select::Only(vec![]));
    }

    #[test]
    fn bad_values_name_the_annotation_and_value() {
        let e = parse_json(json!({SKIP_INBOUND_PORTS: "80,http"})).expect_err("bad port");
        assert_eq!(e.annotation, SKIP_INBOUND_PORTS);
        assert_eq!(
            e.to_string(),
            "checking annotation config.neutrino.io/skip-inbound-ports: \"80,http\" has \"http\", which is not a port \
             (1-65535); write a list such as \"8080,9090\"; fix the value or remove the annotation"
        );
        let e = parse_json(json!({SKIP_OUTBOUND_PORTS: "70000"})).expect_err("out of range");
        assert!(e.to_string().contains("not a port"), "{e}");
        let e = parse_json(json!({SKIP_OUTBOUND_CIDRS: "10.0.0.0/33"})).expect_err("prefix");
        assert!(e.to_string().contains("prefix length is out of range (0-32)"), "{e}");
        let e = parse_json(json!({PROXY_MEMORY_LIMIT: "lots"})).expect_err("quantity");
        assert!(
            e.to_string().starts_with("checking annotation config.neutrino.io/proxy-memory-limit: \"lots\""),
            "{e}"
        );
        let e = parse_json(json!({PROXY_CPU_REQUEST: "-1"})).expect_err("negative");
        assert!(e.to_string().contains("negative"), "{e}");
        let e = parse_json(json!({LOG_LEVEL: "verbose=yes"})).expect_err("log");
        assert!(e.to_string().contains("config.neutrino.io/log-level"), "{e}");
        let e = parse_json(json!({SKIP_INBOUND_PORTS: 8080})).expect_err("number");
        assert!(e.to_string().contains("quote it in YAML"), "{e}");
    }

    #[test]
    fn unknown_keys_under_the_prefix_are_refused_with_the_known_ones() {
        let e = parse_json(json!({"config.neutrino.io/skip-inbound-port": "80"})).expect_err("typo");
        assert_eq!(e.annotation, "config.neutrino.io/skip-inbound-port");
        assert!(e.to_string().contains("skip-inbound-ports"), "{e}");
    }

    #[test]
    fn quantities_follow_the_kubernetes_grammar() {
        let q = |s: &str| quantity(s).expect(s);
        assert!((q("10m") - 0.01).abs() < 1e-12);
        assert_eq!(q("1"), 1.0);
        assert_eq!(q("0.5"), 0.5);
        assert_eq!(q(".5"), 0.5);
        assert_eq!(q("128Mi"), 128.0 * 1024.0 * 1024.0);
        assert_eq!(q("2G"), 2e9);
        assert_eq!(q("1e3"), 1000.0);
        assert_eq!(q("1E-3"), 0.001);
        assert_eq!(q("+5k"), 5000.0);
        for bad in ["", "Mi", "1.2.3", "1mi", "1e", "1ex", "1 Mi", "--1", "."] {
            assert!(quantity(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn otlp_endpoints_are_http_urls() {
        for ok in ["http://jaeger.neutrino-system.svc:4317", "https://otel.example", "http://[fd00::1]:4317", ""] {
            assert!(otlp_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in ["jaeger:4317", "grpc://jaeger:4317", "http://", "http://a b:4317", "http://h:99999", "http://h:0"] {
            assert!(otlp_endpoint(bad).is_err(), "{bad}");
        }
        let e = parse_json(json!({OTLP_ENDPOINT: "jaeger:4317"})).expect_err("no scheme");
        assert!(
            e.to_string().starts_with("checking annotation config.neutrino.io/otlp-endpoint: \"jaeger:4317\""),
            "{e}"
        );
    }

    #[test]
    fn log_levels() {
        for ok in ["info", "DEBUG", "neutrino_proxy=debug,info", "h2::proto=warn"] {
            assert!(log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "loud", "neutrino_proxy", "a b", "x=", "=info", "info;rm"] {
            assert!(log_level(bad).is_err(), "{bad}");
        }
    }
}
