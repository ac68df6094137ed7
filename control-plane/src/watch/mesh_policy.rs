//! The mesh file's authorization parts (format: docs/mesh-file.md, "Identity and
//! policy"): the top-level `policy:` block, a service's `policy:` and the
//! `serviceAccount` keys, read into the model. Part of the watch step's parse, as pure
//! as `mesh_file`: it checks what it reads and returns messages for `mesh_file` to wrap
//! with the file, line and service. It must not read files or translate.

use std::collections::BTreeMap;

use neutrino_proto::spiffe::SpiffeId;
use neutrino_proto::{PolicyAction, TlsMode};
use serde::Deserialize;

use crate::model::{self, AllowRuleModel, MeshPolicy, ServicePolicy};

/// `policy:` at the top of the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMeshPolicy {
    #[serde(default)]
    default: FileAction,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    namespaces: BTreeMap<String, FileNamespacePolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNamespacePolicy {
    tls: FileTls,
}

/// A service's `policy:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileServicePolicy {
    #[serde(default)]
    tls: Option<FileTls>,
    #[serde(default)]
    allow: Vec<FileRule>,
}

/// One allow rule, as the mesh file and the `AuthorizationPolicy` CRD both spell it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRule {
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    operations: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum FileAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum FileTls {
    #[default]
    Permissive,
    Strict,
}

impl From<FileTls> for TlsMode {
    fn from(t: FileTls) -> TlsMode {
        match t {
            FileTls::Permissive => TlsMode::Permissive,
            FileTls::Strict => TlsMode::Strict,
        }
    }
}

/// The top-level block; errors name the key under `policy`.
pub(super) fn mesh_policy(p: FileMeshPolicy) -> Result<MeshPolicy, String> {
    let mut namespaces = BTreeMap::new();
    for (ns, n) in p.namespaces {
        if SpiffeId::new("cluster.local", &ns, "sa").is_err() {
            return Err(format!(
                "namespaces: {ns:?} is not a namespace name (a DNS label: a-z, 0-9 and '-', at most 63 characters)"
            ));
        }
        namespaces.insert(ns, n.tls.into());
    }
    Ok(MeshPolicy {
        default_action: match p.default {
            FileAction::Allow => PolicyAction::Allow,
            FileAction::Deny => PolicyAction::Deny,
        },
        tls: p.tls.into(),
        namespaces,
    })
}

/// A service's block; errors start with `policy.allow[<i>]`.
pub(super) fn service_policy(p: Option<FileServicePolicy>) -> Result<ServicePolicy, String> {
    let Some(p) = p else { return Ok(ServicePolicy::default()) };
    let allow = read_rules(p.allow, "policy.allow")?;
    Ok(ServicePolicy { tls: p.tls.map(Into::into), allow, broken: None })
}

/// Checked rules, methods upper-cased; errors start with `<at>[<i>]`.
pub(super) fn read_rules(rules: Vec<FileRule>, at: &str) -> Result<Vec<AllowRuleModel>, String> {
    let mut allow = Vec::with_capacity(rules.len());
    for (i, r) in rules.into_iter().enumerate() {
        let mut rule = AllowRuleModel { from: r.from, operations: r.operations, methods: r.methods, paths: r.paths };
        model::upper_methods(&mut rule);
        model::check_rule(&rule).map_err(|e| format!("{at}[{i}].{e}"))?;
        allow.push(rule);
    }
    Ok(allow)
}

/// An endpoint's service account: its own `serviceAccount` (`""` opts it out of the
/// service's), else the service's. `None`: not meshed.
pub(super) fn service_account(
    namespace: &str,
    service_default: Option<&str>,
    own: Option<String>,
) -> Result<Option<String>, String> {
    let sa = match own {
        Some(s) if s.is_empty() => return Ok(None),
        Some(s) => s,
        None => match service_default {
            None | Some("") => return Ok(None),
            Some(s) => s.to_string(),
        },
    };
    SpiffeId::new("cluster.local", namespace, &sa).map_err(|e| format!("serviceAccount: {e}"))?;
    Ok(Some(sa))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Result<ServicePolicy, String> {
        let p: FileServicePolicy = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        service_policy(Some(p))
    }

    #[test]
    fn rules_are_read_and_methods_upper_cased() {
        let p = rule(
            "tls: strict\nallow:\n- from: [\"spiffe://cluster.local/ns/shop/sa/orders\", \"spiffe://cluster.local/ns/ops/*\"]\n  operations: [charge]\n  methods: [post, GET]\n  paths: [/pay/*, /health]\n- {}\n",
        )
        .expect("valid");
        assert_eq!(p.tls, Some(TlsMode::Strict));
        assert_eq!(p.allow.len(), 2);
        assert_eq!(p.allow[0].methods, ["POST", "GET"]);
        assert_eq!(p.allow[0].paths, ["/pay/*", "/health"]);
        assert_eq!(p.allow[1], AllowRuleModel::default());
        assert_eq!(service_policy(None).expect("none"), ServicePolicy::default());
    }

    #[test]
    fn every_rule_error_names_the_rule_and_the_key() {
        for (yaml, want) in [
            ("allow: [{from: [orders]}]", "policy.allow[0].from: \"orders\" is not a SPIFFE id"),
            (
                "allow: [{}, {from: [\"spiffe://td/ns/a*\"]}]",
                "policy.allow[1].from: \"spiffe://td/ns/a*\" is not an identity pattern",
            ),
            ("allow: [{methods: [\"GE T\"]}]", "policy.allow[0].methods: \"GE T\" is not an HTTP method"),
            ("allow: [{methods: [\"\"]}]", "policy.allow[0].methods: \"\" is not an HTTP method"),
            ("allow: [{paths: [pay]}]", "policy.allow[0].paths: \"pay\" must start with '/'"),
            ("allow: [{paths: [\"/a*/b\"]}]", "policy.allow[0].paths: \"/a*/b\" may only have one '*'"),
            ("allow: [{operations: [\" \"]}]", "policy.allow[0].operations: an operation id is empty"),
        ] {
            let e = rule(yaml).expect_err(yaml);
            assert!(e.starts_with(want), "{yaml}: {e}");
        }
        for (yaml, want) in [
            ("allow: [{form: [x]}]", "unknown field `form`, expected one of `from`, `operations`, `methods`, `paths`"),
            ("tls: mtls", "unknown variant `mtls`, expected `permissive` or `strict`"),
            ("alow: []", "unknown field `alow`, expected `tls` or `allow`"),
        ] {
            let e = rule(yaml).expect_err(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn the_mesh_block_has_defaults_and_checks_namespaces() {
        let p: FileMeshPolicy = serde_yaml_ng::from_str("{}").expect("empty");
        assert_eq!(mesh_policy(p).expect("ok"), MeshPolicy::default());
        let p: FileMeshPolicy =
            serde_yaml_ng::from_str("default: deny\ntls: strict\nnamespaces: {shop: {tls: permissive}}").expect("full");
        let m = mesh_policy(p).expect("ok");
        assert_eq!((m.default_action, m.tls), (PolicyAction::Deny, TlsMode::Strict));
        assert_eq!(m.namespaces["shop"], TlsMode::Permissive);
        let p: FileMeshPolicy = serde_yaml_ng::from_str("namespaces: {Shop: {tls: strict}}").expect("parses");
        assert!(mesh_policy(p).expect_err("bad ns").starts_with("namespaces: \"Shop\" is not a namespace name"));
        let e = serde_yaml_ng::from_str::<FileMeshPolicy>("default: block").expect_err("bad action").to_string();
        assert!(e.contains("unknown variant `block`, expected `allow` or `deny`"), "{e}");
        let e = serde_yaml_ng::from_str::<FileMeshPolicy>("namespaces: {shop: {}}").expect_err("no tls").to_string();
        assert!(e.contains("missing field `tls`"), "{e}");
    }

    #[test]
    fn service_accounts_default_from_the_service_and_can_opt_out() {
        assert_eq!(service_account("shop", None, None), Ok(None));
        assert_eq!(service_account("shop", Some("orders"), None), Ok(Some("orders".into())));
        assert_eq!(service_account("shop", Some("orders"), Some("canary".into())), Ok(Some("canary".into())));
        assert_eq!(service_account("shop", Some("orders"), Some(String::new())), Ok(None));
        let e = service_account("shop", Some("Orders"), None).expect_err("bad");
        assert!(e.starts_with("serviceAccount: service account \"Orders\" is not a DNS subdomain name"), "{e}");
    }
}
