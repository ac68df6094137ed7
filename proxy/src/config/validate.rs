//! Validate: decides whether an update may replace the proxy's config. Pure: given the
//! resources of one response and the config it would produce, it returns every problem
//! found, each naming the resource and what is wrong. It must not publish anything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use neutrino_proto::spiffe::{self, SpiffeId};
use neutrino_proto::{self as pb, Resource, resource::Body};
use thiserror::Error;

use super::ResourceMap;

/// One reason an update was rejected. The NACK carries these, one line each.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{resource}: {problem}")]
pub struct Problem {
    pub resource: String,
    pub problem: String,
}

fn problem(resource: &str, problem: impl Into<String>) -> Problem {
    Problem { resource: resource.to_string(), problem: problem.into() }
}

/// Checks the resources of one response for `type_url`, and the whole config
/// (`services` after the update) for conflicts between services.
pub fn check(type_url: &str, upserts: &[Resource], services_after: &ResourceMap) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for r in upserts {
        let label = format!("{} {}", pb::type_url::short(type_url), r.name);
        if !seen.insert(r.name.as_str()) {
            out.push(problem(&label, "appears twice in one response"));
        }
        if r.version.is_empty() {
            out.push(problem(&label, "has no version"));
        }
        match &r.body {
            None => out.push(problem(&label, "has no body")),
            Some(body) if body.type_url() != type_url => out.push(problem(
                &label,
                format!("body is a {} but the response is for {type_url}", pb::type_url::short(body.type_url())),
            )),
            Some(Body::Service(s)) => service(&label, &r.name, s, &mut out),
            Some(Body::Endpoints(e)) => endpoints(&label, &r.name, e, &mut out),
            Some(Body::Capacity(c)) => capacity(&label, &r.name, c, &mut out),
            Some(Body::TrustBundle(t)) => trust_bundle(&label, &r.name, t, &mut out),
            Some(Body::Policy(p)) => policy(&label, &r.name, p, &mut out),
        }
    }
    if type_url == pb::type_url::SERVICE {
        conflicts(services_after, &mut out);
    }
    out
}

fn service(label: &str, name: &str, s: &pb::Service, out: &mut Vec<Problem>) {
    if s.name.is_empty() || s.namespace.is_empty() {
        out.push(problem(label, "name and namespace must be set"));
    } else if name != format!("{}/{}", s.namespace, s.name) {
        out.push(problem(label, format!("resource name must be \"{}/{}\"", s.namespace, s.name)));
    }
    if s.ports.is_empty() {
        out.push(problem(label, "has no ports"));
    }
    let mut ports = BTreeSet::new();
    for p in &s.ports {
        if p.port == 0 || p.port > 65535 || p.target_port > 65535 {
            out.push(problem(label, format!("port {} -> {} is out of range 1-65535", p.port, p.target_port)));
        }
        if !ports.insert(p.port) {
            out.push(problem(label, format!("port {} is listed twice", p.port)));
        }
        if pb::Protocol::try_from(p.protocol).is_err() {
            out.push(problem(label, format!("port {} has unknown protocol {}", p.port, p.protocol)));
        }
    }
    for vip in &s.virtual_ips {
        if vip.parse::<IpAddr>().is_err() {
            out.push(problem(label, format!("virtual IP {vip:?} is not an IP address")));
        }
    }
    for r in &s.routes {
        if !r.path_template.starts_with('/') {
            out.push(problem(label, format!("route {:?} must start with '/'", r.path_template)));
        }
        if r.path_template.matches('{').count() != r.path_template.matches('}').count() {
            out.push(problem(label, format!("route {:?} has unbalanced braces", r.path_template)));
        }
        if !r.method.is_empty() && !r.method.bytes().all(|b| b.is_ascii_uppercase()) {
            out.push(problem(label, format!("route {:?} has method {:?}; use upper case", r.path_template, r.method)));
        }
    }
}

fn endpoints(label: &str, name: &str, e: &pb::Endpoints, out: &mut Vec<Problem>) {
    if e.service != name {
        out.push(problem(label, format!("names service {:?} but the resource is {name:?}", e.service)));
    }
    let mut seen = BTreeSet::new();
    for (i, ep) in e.endpoints.iter().enumerate() {
        let Ok(ip) = ep.address.parse::<IpAddr>() else {
            out.push(problem(label, format!("endpoints[{i}].address {:?} is not an IP address", ep.address)));
            continue;
        };
        if ep.port > 65535 {
            out.push(problem(label, format!("endpoints[{i}].port {} is out of range", ep.port)));
        }
        if !seen.insert((ip, ep.port)) {
            out.push(problem(label, format!("endpoints[{i}] {}:{} is listed twice", ep.address, ep.port)));
        }
        match ep.capacity {
            Some(c) if c.cpu_millis > 0 || c.memory_bytes > 0 || c.gpu > 0 => {}
            _ => out.push(problem(label, format!("endpoints[{i}] ({}) has no capacity", ep.address))),
        }
        if !ep.identity.is_empty()
            && let Err(e) = ep.identity.parse::<SpiffeId>()
        {
            out.push(problem(label, format!("endpoints[{i}] ({}) identity: {e}", ep.address)));
        }
    }
}

/// The name every mesh's one `TrustBundle` has.
pub const TRUST_BUNDLE_NAME: &str = "mesh";

fn trust_bundle(label: &str, name: &str, t: &pb::TrustBundle, out: &mut Vec<Problem>) {
    if name != TRUST_BUNDLE_NAME {
        out.push(problem(label, format!("the trust bundle must be named {TRUST_BUNDLE_NAME:?}")));
    }
    if let Err(e) = SpiffeId::new(&t.trust_domain, "ns", "sa") {
        out.push(problem(label, e.to_string()));
    }
    if t.anchors_pem.is_empty() {
        out.push(problem(label, "has no trust anchors; a proxy could verify no peer"));
    }
    for (i, pem) in t.anchors_pem.iter().enumerate() {
        if let Err(why) = anchor(pem) {
            out.push(problem(label, format!("anchors_pem[{i}]: {why}")));
        }
    }
}

/// One anchor: exactly one PEM certificate, a CA.
fn anchor(pem: &str) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
    let der = match certs.next() {
        None => return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()),
        Some(Err(e)) => return Err(format!("is not valid PEM: {e}")),
        Some(Ok(der)) => der,
    };
    if certs.next().is_some() {
        return Err("holds more than one certificate; give each anchor its own entry".into());
    }
    match x509_parser::parse_x509_certificate(&der) {
        Err(e) => Err(format!("is not an X.509 certificate: {e}")),
        Ok((rest, _)) if !rest.is_empty() => Err("has bytes after the certificate".into()),
        Ok((_, cert)) if !cert.is_ca() => Err("is not a CA certificate (basicConstraints CA:TRUE)".into()),
        Ok(_) => Ok(()),
    }
}

/// A resource name of the form "<namespace>/<name>".
fn qualified(name: &str) -> bool {
    matches!(name.split_once('/'), Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/'))
}

fn policy(label: &str, name: &str, p: &pb::Policy, out: &mut Vec<Problem>) {
    if p.service != name {
        out.push(problem(label, format!("names service {:?} but the resource is {name:?}", p.service)));
    } else if !qualified(name) {
        out.push(problem(label, "must be named \"<namespace>/<service>\" like its Service"));
    }
    if pb::TlsMode::try_from(p.tls_mode).is_err() {
        out.push(problem(label, format!("unknown tls_mode {}", p.tls_mode)));
    }
    if pb::PolicyAction::try_from(p.default_action).is_err() {
        out.push(problem(label, format!("unknown default_action {}", p.default_action)));
    }
    for (i, rule) in p.allow.iter().enumerate() {
        let mut bad = |what: String| out.push(problem(label, format!("allow[{i}]: {what}")));
        for id in &rule.identities {
            if let Err(e) = spiffe::check_pattern(id) {
                bad(format!("identity {e}"));
            }
        }
        for op in &rule.operations {
            if op.is_empty() {
                bad("an operation is empty".into());
            }
        }
        for m in &rule.methods {
            if !crate::route::policy::valid_method(m) {
                bad(format!("method {m:?} is not an upper-case HTTP method (e.g. GET)"));
            }
        }
        for path in &rule.paths {
            if !crate::route::policy::valid_path(path) {
                bad(format!("path {path:?} must start with '/' and may only end in '*'"));
            }
        }
    }
}

/// Utilization above 100x capacity is a broken reporter, not load.
const MAX_PPM: u32 = 100_000_000;

fn capacity(label: &str, name: &str, c: &pb::Capacity, out: &mut Vec<Problem>) {
    if c.service != name {
        out.push(problem(label, format!("names service {:?} but the resource is {name:?}", c.service)));
    }
    for (i, l) in c.loads.iter().enumerate() {
        if l.address.parse::<IpAddr>().is_err() {
            out.push(problem(label, format!("loads[{i}].address {:?} is not an IP address", l.address)));
        }
        if l.cpu_ppm.max(l.memory_ppm).max(l.gpu_ppm) > MAX_PPM {
            out.push(problem(label, format!("loads[{i}] reports over 100x utilization")));
        }
    }
}

/// Two services may not claim the same virtual IP and port, or the same hostname: the
/// proxy could not tell which one a request is for.
fn conflicts(services: &ResourceMap, out: &mut Vec<Problem>) {
    let mut vips: BTreeMap<(String, u32), &str> = BTreeMap::new();
    let mut hosts: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, r) in services {
        let Some(Body::Service(s)) = &r.body else { continue };
        for vip in &s.virtual_ips {
            for p in &s.ports {
                if let Some(other) = vips.insert((vip.clone(), p.port), name) {
                    out.push(problem(
                        &format!("Service {name}"),
                        format!("virtual IP {vip} port {} is also claimed by {other}", p.port),
                    ));
                }
            }
        }
        for h in &s.hostnames {
            if let Some(other) = hosts.insert(h, name) {
                out.push(problem(&format!("Service {name}"), format!("hostname {h} is also claimed by {other}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neutrino_proto::type_url;
    use std::sync::Arc;

    fn svc(ns: &str, name: &str, vip: &str, port: u32) -> Resource {
        Resource::with_content_version(
            format!("{ns}/{name}"),
            Body::Service(pb::Service {
                name: name.into(),
                namespace: ns.into(),
                ports: vec![pb::ServicePort { port, target_port: port, ..Default::default() }],
                virtual_ips: vec![vip.into()],
                hostnames: vec![format!("{name}.{ns}")],
                ..Default::default()
            }),
        )
    }

    fn eps(name: &str, addrs: &[&str]) -> Resource {
        Resource::with_content_version(
            name.into(),
            Body::Endpoints(pb::Endpoints {
                service: name.into(),
                endpoints: addrs
                    .iter()
                    .map(|a| pb::Endpoint {
                        address: a.to_string(),
                        capacity: Some(pb::ResourceVector { cpu_millis: 1000, memory_bytes: 1, gpu: 0 }),
                        ..Default::default()
                    })
                    .collect(),
            }),
        )
    }

    fn map(rs: &[Resource]) -> ResourceMap {
        rs.iter().map(|r| (r.name.clone(), Arc::new(r.clone()))).collect()
    }

    #[test]
    fn valid_updates_pass() {
        let s = [svc("default", "a", "10.0.0.1", 80), svc("default", "b", "10.0.0.2", 80)];
        assert_eq!(check(type_url::SERVICE, &s, &map(&s)), vec![]);
        let e = [eps("default/a", &["10.1.0.1", "fd00::1"])];
        assert_eq!(check(type_url::ENDPOINTS, &e, &ResourceMap::new()), vec![]);
    }

    #[test]
    fn every_problem_is_reported_with_its_resource() {
        let mut bad = eps("default/a", &["10.1.0.1", "not-an-ip", "10.1.0.1"]);
        bad.name = "default/a".into();
        let problems = check(type_url::ENDPOINTS, &[bad], &ResourceMap::new());
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(text[0].starts_with("Endpoints default/a: endpoints[1].address \"not-an-ip\""), "{text:?}");
        assert!(text[1].contains("listed twice"), "{text:?}");
    }

    #[test]
    fn body_must_match_the_type_and_the_name() {
        let s = svc("default", "a", "10.0.0.1", 80);
        let p = check(type_url::ENDPOINTS, std::slice::from_ref(&s), &ResourceMap::new());
        assert!(p[0].problem.contains("body is a Service"), "{p:?}");
        let mut renamed = s.clone();
        renamed.name = "other/a".into();
        let p = check(type_url::SERVICE, &[renamed], &ResourceMap::new());
        assert!(p[0].problem.contains("resource name must be \"default/a\""), "{p:?}");
    }

    #[test]
    fn services_may_not_share_a_virtual_ip_and_port() {
        let s = [svc("default", "a", "10.0.0.1", 80), svc("default", "b", "10.0.0.1", 80)];
        let p = check(type_url::SERVICE, &s[1..], &map(&s));
        assert!(p.iter().any(|p| p.problem.contains("also claimed by default/a")), "{p:?}");
    }

    #[test]
    fn ports_and_addresses_are_range_checked() {
        let mut s = svc("default", "a", "10.0.0.300", 70000);
        if let Some(Body::Service(b)) = &mut s.body {
            b.ports.push(b.ports[0].clone());
        }
        let p = check(type_url::SERVICE, &[s], &ResourceMap::new());
        let all = format!("{p:?}");
        assert!(all.contains("out of range") && all.contains("listed twice") && all.contains("not an IP"), "{all}");
    }

    fn pol(name: &str, service: &str, rules: Vec<pb::AllowRule>) -> Resource {
        Resource::with_content_version(
            name.into(),
            Body::Policy(pb::Policy { service: service.into(), allow: rules, ..Default::default() }),
        )
    }

    fn texts(p: &[Problem]) -> String {
        p.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn policies_are_checked_rule_by_rule() {
        let good = pb::AllowRule {
            identities: vec!["*".into(), "spiffe://cluster.local/ns/shop/*".into(), "spiffe://td/ns/a/sa/b".into()],
            operations: vec!["charge".into()],
            methods: vec!["GET".into(), "VERSION-CONTROL".into()],
            paths: vec!["/a".into(), "/b/*".into()],
        };
        let ok = pol("shop/pay", "shop/pay", vec![good, pb::AllowRule::default()]);
        assert_eq!(check(type_url::POLICY, &[ok], &ResourceMap::new()), vec![]);
        let bad = pb::AllowRule {
            identities: vec!["spiffe://cluster.local/ns/sh*".into(), "orders".into()],
            operations: vec![String::new()],
            methods: vec!["get".into(), "G T".into()],
            paths: vec!["a".into(), "/a*b".into()],
        };
        let p = check(
            type_url::POLICY,
            &[pol("shop/pay", "shop/pay", vec![pb::AllowRule::default(), bad])],
            &ResourceMap::new(),
        );
        let all = texts(&p);
        assert_eq!(p.len(), 7, "{all}");
        assert!(p.iter().all(|p| p.resource == "Policy shop/pay" && p.problem.starts_with("allow[1]: ")), "{all}");
        for want in [
            "identity \"spiffe://cluster.local/ns/sh*\"",
            "identity \"orders\"",
            "operation is empty",
            "method \"get\"",
            "method \"G T\"",
            "path \"a\"",
            "path \"/a*b\"",
        ] {
            assert!(all.contains(want), "{want} in {all}");
        }
    }

    #[test]
    fn policy_names_and_enums_are_checked() {
        let p = check(type_url::POLICY, &[pol("shop/pay", "shop/other", vec![])], &ResourceMap::new());
        assert!(texts(&p).contains("names service \"shop/other\""), "{p:?}");
        let p = check(type_url::POLICY, &[pol("pay", "pay", vec![])], &ResourceMap::new());
        assert!(texts(&p).contains("<namespace>/<service>"), "{p:?}");
        let mut r = pol("shop/pay", "shop/pay", vec![]);
        if let Some(Body::Policy(b)) = &mut r.body {
            b.tls_mode = 5;
            b.default_action = 6;
        }
        let all = texts(&check(type_url::POLICY, &[r], &ResourceMap::new()));
        assert!(all.contains("unknown tls_mode 5") && all.contains("unknown default_action 6"), "{all}");
    }

    #[test]
    fn endpoint_identities_are_empty_or_spiffe_ids() {
        let mut e = eps("default/a", &["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
        if let Some(Body::Endpoints(b)) = &mut e.body {
            b.endpoints[1].identity = "spiffe://cluster.local/ns/default/sa/a".into();
            b.endpoints[2].identity = "default/a".into();
        }
        let p = check(type_url::ENDPOINTS, &[e], &ResourceMap::new());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].problem.starts_with("endpoints[2] (10.1.0.3) identity: \"default/a\" is not a SPIFFE id"),
            "{p:?}"
        );
    }

    fn ca_pem(ca: bool) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![]).expect("params");
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params.self_signed(&key).expect("cert").pem()
    }

    fn bundle(name: &str, td: &str, anchors: Vec<String>) -> Resource {
        Resource::with_content_version(
            name.into(),
            Body::TrustBundle(pb::TrustBundle { trust_domain: td.into(), anchors_pem: anchors }),
        )
    }

    #[test]
    fn trust_bundles_hold_one_ca_certificate_per_anchor() {
        let (a, b) = (ca_pem(true), ca_pem(true));
        let ok = bundle("mesh", "cluster.local", vec![a.clone(), b.clone()]);
        assert_eq!(check(type_url::TRUST_BUNDLE, &[ok], &ResourceMap::new()), vec![]);
        let garbled = a.replace("MII", "M!I");
        let truncated = a[..a.len() / 2].to_string();
        let bad = bundle(
            "mesh",
            "cluster.local",
            vec![
                format!("{a}{b}"),
                "hello".into(),
                ca_pem(false),
                garbled,
                truncated,
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ],
        );
        let p = check(type_url::TRUST_BUNDLE, &[bad], &ResourceMap::new());
        let all = texts(&p);
        assert_eq!(p.len(), 6, "{all}");
        assert!(p[0].problem.starts_with("anchors_pem[0]: holds more than one certificate"), "{all}");
        assert!(p[1].problem.starts_with("anchors_pem[1]: holds no PEM certificate"), "{all}");
        assert!(p[2].problem.starts_with("anchors_pem[2]: is not a CA certificate"), "{all}");
        assert!(p[3].problem.starts_with("anchors_pem[3]: "), "{all}");
        assert!(p[4].problem.starts_with("anchors_pem[4]: "), "{all}");
        assert!(p[5].problem.starts_with("anchors_pem[5]: is not an X.509 certificate"), "{all}");
    }

    #[test]
    fn trust_bundle_name_domain_and_anchor_count() {
        let p = check(type_url::TRUST_BUNDLE, &[bundle("other", "Cluster.local", vec![])], &ResourceMap::new());
        let all = texts(&p);
        assert_eq!(p.len(), 3, "{all}");
        assert!(
            all.contains("must be named \"mesh\"") && all.contains("trust domain") && all.contains("no trust anchors"),
            "{all}"
        );
    }
}
