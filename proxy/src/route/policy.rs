//! Policy: a service's authorization rules, compiled once per `Policy` version, and the
//! decision for one caller and (for HTTP) one request.
//!
//! Part of the data path's compiled view ([`super::Mesh`]): built off the request path
//! when a snapshot is published; [`Authorizer::authorize`] only compares precompiled
//! values and never allocates. It decides; it must not do IO, count, log or answer the
//! caller (the listeners turn a denial into a 403 or a reset). Anything it cannot read
//! fails closed: an unknown TLS mode is strict, an unknown default action is deny, and
//! a rule entry that does not compile matches nothing.

use std::sync::Arc;

use http::Method;
use neutrino_proto as pb;

pub use pb::TlsMode;

/// What the policy says about one connection or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `reason` is a short, fixed sentence for the 403 body, the log line and (being
    /// one of a few) a metric label.
    Deny {
        reason: &'static str,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Strict mode and a caller that is not authenticated by mesh mTLS.
pub const DENY_PLAINTEXT: &str =
    "the service accepts only mesh mTLS (strict mode) and the caller has no verified identity";
/// No allow rules, default action deny.
pub const DENY_DEFAULT: &str = "denied by default: no allow rule admits any caller";
/// Rules exist; none names the caller.
pub const DENY_IDENTITY: &str = "no allow rule admits the caller's identity";
/// Rules exist; none names the unauthenticated caller (every matching one needs an id).
pub const DENY_UNAUTHENTICATED: &str = "no allow rule admits an unauthenticated caller";
/// Rules admit the caller, but only for operations, methods or paths, which a TCP
/// connection has none of.
pub const DENY_TCP: &str =
    "the allow rules for this caller name operations, methods or paths; a TCP connection has none";
/// Rules admit the caller, but not for this operation, method or path.
pub const DENY_REQUEST: &str = "no allow rule admits this operation, method or path for the caller";

/// One entry of a rule's `identities`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IdPattern {
    /// "*": any authenticated caller.
    Any,
    /// "<prefix>/*": the prefix keeps its trailing '/'.
    Prefix(Box<str>),
    Exact(Box<str>),
}

impl IdPattern {
    fn compile(s: &str) -> IdPattern {
        if s == "*" {
            return IdPattern::Any;
        }
        match s.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') => IdPattern::Prefix(prefix.into()),
            // Anything else is compared literally, as `spiffe::matches` does.
            _ => IdPattern::Exact(s.into()),
        }
    }

    fn admits(&self, id: &str) -> bool {
        match self {
            IdPattern::Any => true,
            IdPattern::Prefix(p) => id.starts_with(&**p),
            IdPattern::Exact(e) => **e == *id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathPattern {
    Exact(Box<str>),
    /// From a path ending in "*", without the '*'.
    Prefix(Box<str>),
}

impl PathPattern {
    fn admits(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(e) => **e == *path,
            PathPattern::Prefix(p) => path.starts_with(&**p),
        }
    }
}

/// One compiled allow rule. `None`: the field was empty and admits anything.
/// `Some(list)`: one entry must match (an empty list, left after dropping entries that
/// do not compile, matches nothing).
#[derive(Debug, Clone, Default)]
struct Rule {
    identities: Option<Box<[IdPattern]>>,
    operations: Option<Box<[Box<str>]>>,
    methods: Option<Box<[Method]>>,
    paths: Option<Box<[PathPattern]>>,
}

/// An upper-case HTTP method token: `A-Z` and `-` (e.g. `GET`, `VERSION-CONTROL`).
pub fn valid_method(m: &str) -> bool {
    !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') && Method::from_bytes(m.as_bytes()).is_ok()
}

/// A request path: starts with '/', exact, or a prefix when it ends in '*' (the only
/// '*' allowed).
pub fn valid_path(p: &str) -> bool {
    p.starts_with('/') && !p.trim_end_matches('*').contains('*') && p.matches('*').count() <= 1
}

fn list<T>(items: &[String], f: impl Fn(&str) -> Option<T>) -> Option<Box<[T]>> {
    if items.is_empty() { None } else { Some(items.iter().filter_map(|s| f(s)).collect()) }
}

impl Rule {
    fn compile(r: &pb::AllowRule) -> Rule {
        Rule {
            identities: list(&r.identities, |s| Some(IdPattern::compile(s))),
            operations: list(&r.operations, |s| Some(s.into())),
            methods: list(&r.methods, |s| valid_method(s).then(|| Method::from_bytes(s.as_bytes()).ok()).flatten()),
            paths: list(&r.paths, |s| {
                if !valid_path(s) {
                    return None;
                }
                Some(match s.strip_suffix('*') {
                    Some(prefix) => PathPattern::Prefix(prefix.into()),
                    None => PathPattern::Exact(s.into()),
                })
            }),
        }
    }

    fn admits_caller(&self, peer: Option<&str>) -> bool {
        match (&self.identities, peer) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ids), Some(id)) => ids.iter().any(|p| p.admits(id)),
        }
    }

    fn narrows(&self) -> bool {
        self.operations.is_some() || self.methods.is_some() || self.paths.is_some()
    }

    fn admits_request(&self, method: &Method, path: &str, operation: Option<&str>) -> bool {
        let op_ok = match (&self.operations, operation) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ops), Some(op)) => ops.iter().any(|o| **o == *op),
        };
        op_ok
            && self.methods.as_ref().is_none_or(|ms| ms.contains(method))
            && self.paths.as_ref().is_none_or(|ps| ps.iter().any(|p| p.admits(path)))
    }
}

/// A service's compiled policy.
#[derive(Debug, Clone)]
pub struct Authorizer {
    tls_mode: TlsMode,
    default_allow: bool,
    rules: Box<[Rule]>,
}

impl Default for Authorizer {
    /// What a service without a `Policy` resource gets: permissive, allow.
    fn default() -> Self {
        Authorizer { tls_mode: TlsMode::Permissive, default_allow: true, rules: Box::default() }
    }
}

impl Authorizer {
    /// Permissive, every caller allowed: a service without a `Policy` resource.
    pub fn allow_all() -> Arc<Authorizer> {
        static ALLOW: std::sync::OnceLock<Arc<Authorizer>> = std::sync::OnceLock::new();
        Arc::clone(ALLOW.get_or_init(|| Arc::new(Authorizer::default())))
    }

    pub fn compile(p: &pb::Policy) -> Authorizer {
        Authorizer {
            tls_mode: TlsMode::try_from(p.tls_mode).unwrap_or(TlsMode::Strict),
            default_allow: pb::PolicyAction::try_from(p.default_action) == Ok(pb::PolicyAction::Allow),
            rules: p.allow.iter().map(Rule::compile).collect(),
        }
    }

    /// Permissive: plaintext callers are served (and counted). Strict: only mesh mTLS.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls_mode
    }

    /// True when a caller without a verified identity may be served at all.
    pub fn admits_plaintext(&self) -> bool {
        self.tls_mode == TlsMode::Permissive
    }

    /// Decides for a caller whose verified SPIFFE id is `peer` (`None`: plaintext or
    /// not mesh TLS) and a request `(method, path, operation id)`, or `None` for a TCP
    /// connection (which no rule narrowed by operation, method or path admits). `path`
    /// is the request path; anything from a '?' on is ignored.
    pub fn authorize(&self, peer: Option<&str>, request: Option<(&Method, &str, Option<&str>)>) -> Decision {
        if peer.is_none() && self.tls_mode != TlsMode::Permissive {
            return Decision::Deny { reason: DENY_PLAINTEXT };
        }
        if self.rules.is_empty() {
            return if self.default_allow { Decision::Allow } else { Decision::Deny { reason: DENY_DEFAULT } };
        }
        let mut caller_admitted = false;
        for rule in self.rules.iter() {
            if !rule.admits_caller(peer) {
                continue;
            }
            caller_admitted = true;
            let admitted = match request {
                None => !rule.narrows(),
                Some((method, path, op)) => {
                    let path = path.split_once('?').map_or(path, |(p, _)| p);
                    rule.admits_request(method, path, op)
                }
            };
            if admitted {
                return Decision::Allow;
            }
        }
        let reason = match (caller_admitted, request, peer) {
            (true, None, _) => DENY_TCP,
            (true, Some(_), _) => DENY_REQUEST,
            (false, _, None) => DENY_UNAUTHENTICATED,
            (false, _, Some(_)) => DENY_IDENTITY,
        };
        Decision::Deny { reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const USERS: &str = "spiffe://cluster.local/ns/shop/sa/users";
    const EVIL: &str = "spiffe://cluster.local/ns/evil/sa/orders";

    fn rule(ids: &[&str], ops: &[&str], methods: &[&str], paths: &[&str]) -> pb::AllowRule {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        pb::AllowRule { identities: v(ids), operations: v(ops), methods: v(methods), paths: v(paths) }
    }

    fn policy(tls: TlsMode, default: pb::PolicyAction, allow: Vec<pb::AllowRule>) -> Authorizer {
        Authorizer::compile(&pb::Policy {
            service: "shop/payments".into(),
            tls_mode: tls as i32,
            default_action: default as i32,
            allow,
        })
    }

    fn allow(rules: Vec<pb::AllowRule>) -> Authorizer {
        policy(TlsMode::Permissive, pb::PolicyAction::Allow, rules)
    }

    fn get(path: &str) -> Option<(&'static Method, &str, Option<&'static str>)> {
        Some((&Method::GET, path, None))
    }

    fn deny(reason: &'static str) -> Decision {
        Decision::Deny { reason }
    }

    #[test]
    fn without_a_policy_everyone_is_allowed_in_permissive_mode() {
        let a = Authorizer::allow_all();
        assert_eq!(a.tls_mode(), TlsMode::Permissive);
        assert!(a.admits_plaintext());
        assert_eq!(a.authorize(None, None), Decision::Allow);
        assert_eq!(a.authorize(Some(ORDERS), get("/x")), Decision::Allow);
        assert!(Arc::ptr_eq(&a, &Authorizer::allow_all()), "one shared instance");
    }

    #[test]
    fn no_rules_means_the_default_action() {
        let d = policy(TlsMode::Permissive, pb::PolicyAction::Deny, vec![]);
        assert_eq!(d.authorize(Some(ORDERS), get("/")), deny(DENY_DEFAULT));
        assert_eq!(d.authorize(None, None), deny(DENY_DEFAULT));
        let a = policy(TlsMode::Permissive, pb::PolicyAction::Allow, vec![]);
        assert_eq!(a.authorize(None, get("/")), Decision::Allow);
        assert_eq!(a.authorize(Some(EVIL), None), Decision::Allow);
    }

    #[test]
    fn with_rules_only_a_matching_rule_allows_whatever_the_default() {
        for default in [pb::PolicyAction::Allow, pb::PolicyAction::Deny] {
            let p = policy(TlsMode::Permissive, default, vec![rule(&[ORDERS], &[], &[], &[])]);
            assert_eq!(p.authorize(Some(ORDERS), get("/pay")), Decision::Allow, "{default:?}");
            assert_eq!(p.authorize(Some(ORDERS), None), Decision::Allow, "{default:?}: TCP too");
            assert_eq!(p.authorize(Some(USERS), get("/pay")), deny(DENY_IDENTITY), "{default:?}");
            assert_eq!(p.authorize(Some(EVIL), get("/pay")), deny(DENY_IDENTITY), "same sa, other namespace");
            assert_eq!(p.authorize(None, get("/pay")), deny(DENY_UNAUTHENTICATED), "{default:?}");
        }
    }

    #[test]
    fn identities_are_compared_whole_not_as_prefixes() {
        let p = allow(vec![rule(&[ORDERS], &[], &[], &[])]);
        for near in [
            "spiffe://cluster.local/ns/shop/sa/orders2",
            "spiffe://cluster.local/ns/shop/sa/order",
            "spiffe://cluster.local/ns/shop/sa/orders/x",
            "spiffe://other.local/ns/shop/sa/orders",
            "SPIFFE://cluster.local/ns/shop/sa/orders",
            "",
        ] {
            assert_eq!(p.authorize(Some(near), get("/")), deny(DENY_IDENTITY), "{near:?}");
        }
    }

    #[test]
    fn prefix_patterns_end_at_a_segment() {
        let p = allow(vec![rule(&["spiffe://cluster.local/ns/shop/*"], &[], &[], &[])]);
        assert!(p.authorize(Some(ORDERS), get("/")).is_allowed());
        assert!(p.authorize(Some(USERS), None).is_allowed());
        assert_eq!(p.authorize(Some("spiffe://cluster.local/ns/shopping/sa/a"), get("/")), deny(DENY_IDENTITY));
        assert_eq!(p.authorize(Some(EVIL), get("/")), deny(DENY_IDENTITY));
        // Not a segment prefix: compared literally, so it admits nothing real.
        let literal = allow(vec![rule(&["spiffe://cluster.local/ns/sh*"], &[], &[], &[])]);
        assert_eq!(literal.authorize(Some(ORDERS), get("/")), deny(DENY_IDENTITY));
        // Trust-domain-wide prefix.
        let td = allow(vec![rule(&["spiffe://cluster.local/*"], &[], &[], &[])]);
        assert!(td.authorize(Some(EVIL), get("/")).is_allowed());
        assert_eq!(td.authorize(Some("spiffe://cluster.localhost/ns/a/sa/b"), get("/")), deny(DENY_IDENTITY));
    }

    #[test]
    fn star_needs_an_authenticated_caller_and_no_identities_admits_anyone() {
        let star = allow(vec![rule(&["*"], &[], &[], &[])]);
        assert!(star.authorize(Some(EVIL), get("/")).is_allowed());
        assert_eq!(star.authorize(None, get("/")), deny(DENY_UNAUTHENTICATED));
        assert_eq!(star.authorize(None, None), deny(DENY_UNAUTHENTICATED));
        let anyone = allow(vec![rule(&[], &[], &["GET"], &[])]);
        assert!(anyone.authorize(None, get("/")).is_allowed(), "permissive, no identities: plaintext allowed");
        assert_eq!(anyone.authorize(None, Some((&Method::POST, "/", None))), deny(DENY_REQUEST));
    }

    #[test]
    fn strict_mode_refuses_unauthenticated_callers_before_rules() {
        let p = policy(TlsMode::Strict, pb::PolicyAction::Allow, vec![]);
        assert!(!p.admits_plaintext());
        assert_eq!(p.authorize(None, get("/")), deny(DENY_PLAINTEXT));
        assert_eq!(p.authorize(None, None), deny(DENY_PLAINTEXT));
        assert!(p.authorize(Some(EVIL), get("/")).is_allowed(), "strict alone does not restrict identities");
        let open_rule = policy(TlsMode::Strict, pb::PolicyAction::Deny, vec![rule(&[], &[], &[], &[])]);
        assert_eq!(open_rule.authorize(None, get("/")), deny(DENY_PLAINTEXT));
        assert!(open_rule.authorize(Some(USERS), get("/")).is_allowed());
    }

    #[test]
    fn operations_methods_and_paths_narrow_and_must_all_match() {
        let p = allow(vec![rule(&[ORDERS], &["charge"], &["POST"], &["/payments/*"])]);
        let post = |path, op| Some((&Method::POST, path, op));
        assert!(p.authorize(Some(ORDERS), post("/payments/7", Some("charge"))).is_allowed());
        assert_eq!(p.authorize(Some(ORDERS), post("/payments/7", Some("refund"))), deny(DENY_REQUEST));
        assert_eq!(p.authorize(Some(ORDERS), post("/payments/7", None)), deny(DENY_REQUEST), "no operation matched");
        assert_eq!(p.authorize(Some(ORDERS), Some((&Method::GET, "/payments/7", Some("charge")))), deny(DENY_REQUEST));
        assert_eq!(p.authorize(Some(ORDERS), post("/refunds/7", Some("charge"))), deny(DENY_REQUEST));
        assert_eq!(p.authorize(Some(USERS), post("/payments/7", Some("charge"))), deny(DENY_IDENTITY));
        assert!(p.authorize(Some(ORDERS), post("/payments/7?x=1", Some("charge"))).is_allowed(), "query ignored");
    }

    #[test]
    fn exact_and_prefix_paths() {
        let p = allow(vec![rule(&[], &[], &[], &["/health", "/api/*"])]);
        assert!(p.authorize(None, get("/health")).is_allowed());
        assert_eq!(p.authorize(None, get("/healthz")), deny(DENY_REQUEST));
        assert_eq!(p.authorize(None, get("/health/x")), deny(DENY_REQUEST));
        assert!(p.authorize(None, get("/api/")).is_allowed());
        assert!(p.authorize(None, get("/api/v1/x")).is_allowed());
        assert_eq!(p.authorize(None, get("/api")), deny(DENY_REQUEST));
        assert_eq!(p.authorize(None, get("/health?probe=1")), Decision::Allow);
    }

    #[test]
    fn any_rule_may_allow() {
        let p = allow(vec![rule(&[USERS], &[], &["GET"], &[]), rule(&[ORDERS], &[], &[], &[])]);
        assert!(p.authorize(Some(USERS), get("/")).is_allowed());
        assert_eq!(p.authorize(Some(USERS), Some((&Method::DELETE, "/", None))), deny(DENY_REQUEST));
        assert!(p.authorize(Some(ORDERS), Some((&Method::DELETE, "/", None))).is_allowed());
    }

    #[test]
    fn tcp_connections_match_only_rules_that_do_not_narrow() {
        let narrow = allow(vec![rule(&[ORDERS], &["charge"], &[], &[])]);
        assert_eq!(narrow.authorize(Some(ORDERS), None), deny(DENY_TCP));
        for r in [rule(&[ORDERS], &[], &["GET"], &[]), rule(&[ORDERS], &[], &[], &["/*"])] {
            assert_eq!(allow(vec![r]).authorize(Some(ORDERS), None), deny(DENY_TCP));
        }
        let both = allow(vec![rule(&[ORDERS], &["charge"], &[], &[]), rule(&["*"], &[], &[], &[])]);
        assert!(both.authorize(Some(ORDERS), None).is_allowed());
        assert_eq!(both.authorize(None, None), deny(DENY_UNAUTHENTICATED));
    }

    #[test]
    fn what_does_not_compile_fails_closed() {
        let bad = pb::Policy {
            service: "shop/payments".into(),
            tls_mode: 7,
            default_action: 9,
            allow: vec![rule(&[], &[], &["get", "BAD METHOD"], &[]), rule(&[], &[], &[], &["no-slash"])],
        };
        let a = Authorizer::compile(&bad);
        assert_eq!(a.tls_mode(), TlsMode::Strict, "unknown mode: strict");
        assert_eq!(
            a.authorize(Some(ORDERS), get("/")),
            deny(DENY_REQUEST),
            "rules that lost every entry match nothing"
        );
        assert_eq!(
            a.authorize(Some(ORDERS), Some((&Method::from_bytes(b"get").expect("m"), "/", None))),
            deny(DENY_REQUEST)
        );
        let no_rules = Authorizer::compile(&pb::Policy { default_action: 9, ..Default::default() });
        assert_eq!(no_rules.authorize(Some(ORDERS), None), deny(DENY_DEFAULT), "unknown action: deny");
    }

    #[test]
    fn extension_methods_match_exactly() {
        let p = allow(vec![rule(&[], &[], &["PURGE"], &[])]);
        assert!(p.authorize(None, Some((&Method::from_bytes(b"PURGE").expect("m"), "/", None))).is_allowed());
        assert_eq!(p.authorize(None, get("/")), deny(DENY_REQUEST));
    }
}
