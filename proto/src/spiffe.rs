//! SPIFFE ids as the mesh spells them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The one format the CA signs, discovery advertises per endpoint, proxies verify and
//! policies name. Parsing is strict, so that two spellings of one identity cannot both
//! pass. It must not know about certificates.

use std::fmt;
use std::str::FromStr;

/// A workload identity: a service account in a namespace, in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a mesh SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// DNS label or subdomain rules as Kubernetes applies them to namespaces, service
/// accounts and (lower-case) trust domains: `a-z`, `0-9`, `-`, and `.` where allowed.
fn valid_name(s: &str, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        && (dots || !s.contains('.'))
}

impl SpiffeId {
    /// The id of `service_account` in `namespace`; errors name the part that is invalid.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, ParseError> {
        if !valid_name(trust_domain, true) {
            return Err(ParseError(format!(
                "trust domain {trust_domain:?} is not a lower-case DNS name (e.g. cluster.local)"
            )));
        }
        if !valid_name(namespace, false) {
            return Err(ParseError(format!("namespace {namespace:?} is not a DNS label")));
        }
        if !valid_name(service_account, true) {
            return Err(ParseError(format!("service account {service_account:?} is not a DNS subdomain name")));
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<SpiffeId, ParseError> {
        let bad = |why: &str| {
            ParseError(format!(
                "{s:?} is not a SPIFFE id of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>: {why}"
            ))
        };
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| bad("it must start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("no path after the trust domain"))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa).map_err(|e| bad(&e.0)),
            _ => Err(bad("the path must be /ns/<namespace>/sa/<service-account>")),
        }
    }
}

/// True when `pattern` (a policy's identity entry) admits `id`: `*` admits any id,
/// `<prefix>/*` any id under the prefix, anything else only itself.
pub fn matches(pattern: &str, id: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('/') => id.starts_with(prefix),
        _ => pattern == id,
    }
}

/// Checks a policy's identity entry: `*`, a full SPIFFE id, or a prefix ending at a
/// segment: `spiffe://<td>/*` (the trust domain), `spiffe://<td>/ns/<namespace>/*` (a
/// namespace; `.../sa/*` is the same). Errors say which form was expected.
pub fn check_pattern(pattern: &str) -> Result<(), ParseError> {
    if pattern == "*" {
        return Ok(());
    }
    let bad = |why: String| {
        ParseError(format!(
            "{pattern:?} is not an identity pattern (\"*\", spiffe://<trust-domain>/*, spiffe://<trust-domain>/ns/<namespace>/*, or a full SPIFFE id): {why}"
        ))
    };
    let Some(prefix) = pattern.strip_suffix("/*") else {
        if pattern.contains('*') {
            return Err(bad("a '*' may only be the whole pattern or follow the last '/'".into()));
        }
        return pattern.parse::<SpiffeId>().map(|_| ());
    };
    if prefix.contains('*') {
        return Err(bad("only one '*', at the end".into()));
    }
    let rest = prefix.strip_prefix("spiffe://").ok_or_else(|| bad("it must start with spiffe://".into()))?;
    let mut parts = rest.split('/');
    let td = parts.next().unwrap_or("");
    if !valid_name(td, true) {
        return Err(bad(format!("trust domain {td:?} is not a lower-case DNS name")));
    }
    match parts.collect::<Vec<_>>().as_slice() {
        [] => Ok(()),
        ["ns", ns] | ["ns", ns, "sa"] if valid_name(ns, false) => Ok(()),
        ["ns", ns] | ["ns", ns, "sa"] => Err(bad(format!("namespace {ns:?} is not a DNS label"))),
        _ => Err(bad("a '*' may only follow the trust domain or /ns/<namespace>".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_its_parts() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/orders.v2".parse().expect("valid");
        assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), ("cluster.local", "shop", "orders.v2"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/orders.v2");
        assert_eq!(SpiffeId::new("cluster.local", "shop", "orders.v2").expect("valid"), id);
    }

    #[test]
    fn other_spellings_are_refused() {
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/shop/sa/orders/x",
            "spiffe://Cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/ns/sh.op/sa/orders",
            "spiffe://cluster.local//ns/shop/sa/orders",
            "https://cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/sa/orders/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/-orders",
        ] {
            let e = bad.parse::<SpiffeId>().expect_err(bad);
            assert!(e.to_string().contains("spiffe://<trust-domain>/ns/"), "{e}");
        }
    }

    #[test]
    fn patterns_match_ids_and_prefixes_only_at_segment_ends() {
        let id = "spiffe://td/ns/shop/sa/orders";
        assert!(matches("*", id));
        assert!(matches(id, id));
        assert!(matches("spiffe://td/ns/shop/*", id));
        assert!(!matches("spiffe://td/ns/sho*", id), "a prefix must end at a segment");
        assert!(!matches("spiffe://td/ns/shop/sa/order", id));
        assert!(!matches("spiffe://td/ns/other/*", id));
    }

    #[test]
    fn patterns_are_checked() {
        for good in [
            "*",
            "spiffe://td/*",
            "spiffe://cluster.local/ns/shop/*",
            "spiffe://cluster.local/ns/shop/sa/*",
            "spiffe://cluster.local/ns/shop/sa/orders",
        ] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "**",
            "spiffe://cluster.local/ns/sh*",
            "spiffe://cluster.local/ns/*",
            "spiffe://Cluster/*",
            "spiffe://cluster.local/ns/Shop/*",
            "https://cluster.local/*",
            "spiffe://cluster.local/ns/shop/sa/orders/*",
            "spiffe://cluster.local/ns/shop/sa/or*",
            "/*",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }
}
