//! Watch step for Kubernetes, the policy part of the pure half: `AuthorizationPolicy`
//! objects (the CRD in `deploy/base/authorization-policy-crd.yaml`) and the namespace
//! label `neutrino.io/tls` folded into the [`MeshState`] that `kube_translate` built.
//! It must not do IO, log, or keep state between calls; `kube.rs` watches the objects.
//!
//! Rules:
//!
//! - An `AuthorizationPolicy` applies to `spec.service`, a Service in its own
//!   namespace. Several policies for one Service add up: their `allow` rules are all
//!   the Service's rules, and its TLS mode is strict when any of them says strict,
//!   else permissive when any says permissive, else the namespace's.
//! - A policy naming a Service that is not in the mesh has no effect (reported).
//! - A policy that cannot be read (an unknown field, a bad identity, method or path)
//!   makes its Service deny every caller until it is fixed (reported): dropping it
//!   would open the Service to callers the policy meant to keep out.
//! - A Namespace labelled `neutrino.io/tls=strict` (or `permissive`) sets the TLS mode
//!   of its Services that do not set one. Any other value counts as strict (reported).
//! - Kubernetes has no mesh-wide settings: the default action is allow and the mesh
//!   TLS mode permissive, as in a mesh file without `policy:`.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use neutrino_proto::TlsMode;
use serde::{Deserialize, Serialize};

use super::kube_translate::Problem;
use super::mesh_policy::{FileRule, read_rules};
use crate::model::{self, AllowRuleModel, MeshState};

pub const GROUP: &str = "policy.neutrino.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "AuthorizationPolicy";
pub const PLURAL: &str = "authorizationpolicies";
/// The Namespace label that sets its Services' TLS mode.
pub const LABEL_TLS: &str = "neutrino.io/tls";

/// An `AuthorizationPolicy` as the API server returns it. `spec` stays JSON until
/// translation, so that a policy that does not parse is seen (and fails closed) instead
/// of being dropped by the watch.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

impl kube::Resource for AuthorizationPolicy {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// `spec` of an `AuthorizationPolicy`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    service: String,
    #[serde(default)]
    tls: Option<Tls>,
    #[serde(default)]
    allow: Vec<FileRule>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Tls {
    Permissive,
    Strict,
}

/// Reads `spec`; errors name the field or rule.
fn read(spec: &serde_json::Value) -> Result<(String, Option<Tls>, Vec<AllowRuleModel>), String> {
    let spec = Spec::deserialize(spec).map_err(|e| format!("spec: {e}"))?;
    let rules = read_rules(spec.allow, "spec.allow")?;
    Ok((spec.service, spec.tls, rules))
}

/// Folds namespace labels and policies into `mesh` (rules in the module docs).
/// Output does not depend on input order.
pub fn apply(
    mesh: &mut MeshState,
    namespaces: &[Arc<Namespace>],
    policies: &[Arc<AuthorizationPolicy>],
    problems: &mut Vec<Problem>,
) {
    for ns in namespaces {
        let (Some(name), Some(value)) = (&ns.metadata.name, ns.metadata.labels.as_ref().and_then(|l| l.get(LABEL_TLS)))
        else {
            continue;
        };
        let mode = match value.as_str() {
            "strict" => TlsMode::Strict,
            "permissive" => TlsMode::Permissive,
            _ => {
                problems.push(Problem::TlsLabel { namespace: name.clone(), value: value.clone() });
                TlsMode::Strict
            }
        };
        mesh.policy.namespaces.insert(name.clone(), mode);
    }

    let mut sorted: Vec<&AuthorizationPolicy> = policies.iter().map(|p| &**p).collect();
    sorted.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
    // Per service, the TLS modes its policies set.
    let mut tls: std::collections::BTreeMap<String, Vec<Tls>> = Default::default();
    for p in sorted {
        let namespace = p.metadata.namespace.as_deref().unwrap_or("default");
        let policy = model::service_key(namespace, p.metadata.name.as_deref().unwrap_or(""));
        let target = p.spec.get("service").and_then(|s| s.as_str()).unwrap_or("");
        let key = model::service_key(namespace, target);
        let parsed = read(&p.spec);
        let Some(svc) = mesh.services.get_mut(&key) else {
            problems.push(match parsed {
                Err(why) => Problem::PolicyInvalid { policy, service: None, why },
                Ok(_) => Problem::PolicyNoService { policy, service: key },
            });
            continue;
        };
        match parsed {
            Ok((_, mode, rules)) => {
                svc.policy.allow.extend(rules);
                tls.entry(key).or_default().extend(mode);
            }
            Err(why) => {
                problems.push(Problem::PolicyInvalid { policy: policy.clone(), service: Some(key), why: why.clone() });
                if svc.policy.broken.is_none() {
                    svc.policy.broken = Some(format!("authorization policy {policy}: {why}"));
                }
            }
        }
    }
    for (key, modes) in tls {
        let mode = if modes.contains(&Tls::Strict) {
            Some(TlsMode::Strict)
        } else if modes.contains(&Tls::Permissive) {
            Some(TlsMode::Permissive)
        } else {
            None
        };
        if let Some(svc) = mesh.services.get_mut(&key) {
            svc.policy.tls = mode;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceModel;
    use serde_json::json;

    fn mesh(services: &[&str]) -> MeshState {
        let mut m = MeshState::default();
        for key in services {
            let (ns, name) = key.split_once('/').expect("ns/name");
            m.services.insert(
                key.to_string(),
                ServiceModel {
                    name: name.into(),
                    namespace: ns.into(),
                    ports: vec![],
                    virtual_ips: vec![],
                    hostnames: vec![],
                    openapi: None,
                    endpoints: vec![],
                    policy: Default::default(),
                },
            );
        }
        m
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Arc<AuthorizationPolicy> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "policy.neutrino.io/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "namespace": ns, "uid": "u1", "resourceVersion": "7", "generation": 1},
                "spec": spec
            }))
            .expect("object"),
        )
    }

    #[test]
    fn policies_for_one_service_add_up_and_strict_wins() {
        let mut m = mesh(&["shop/pay", "shop/cart"]);
        let mut problems = vec![];
        let ps = [
            policy(
                "shop",
                "b",
                json!({"service": "pay", "tls": "permissive", "allow": [{"from": ["*"], "methods": ["get"]}]}),
            ),
            policy(
                "shop",
                "a",
                json!({"service": "pay", "tls": "strict", "allow": [{"from": ["spiffe://cluster.local/ns/shop/sa/orders"], "operations": ["charge"], "paths": ["/pay/*"]}]}),
            ),
            policy("shop", "c", json!({"service": "cart", "tls": "permissive"})),
        ];
        apply(&mut m, &[], &ps, &mut problems);
        assert_eq!(problems, vec![]);
        let pay = &m.services["shop/pay"].policy;
        assert_eq!(pay.tls, Some(TlsMode::Strict));
        assert_eq!(pay.allow.len(), 2);
        assert_eq!(pay.allow[0].operations, ["charge"], "sorted by policy name: a first");
        assert_eq!(pay.allow[1].methods, ["GET"], "upper-cased");
        assert_eq!(m.services["shop/cart"].policy.tls, Some(TlsMode::Permissive));
        assert!(m.services["shop/cart"].policy.allow.is_empty());
    }

    #[test]
    fn a_broken_policy_closes_its_service_and_a_stray_one_is_reported() {
        let mut m = mesh(&["shop/pay"]);
        let mut problems = vec![];
        let ps = [
            policy("shop", "bad", json!({"service": "pay", "allow": [{"from": ["orders"]}]})),
            policy("shop", "typo", json!({"service": "pay", "alow": []})),
            policy("shop", "stray", json!({"service": "gone"})),
            policy("other", "cross", json!({"service": "pay"})),
        ];
        apply(&mut m, &[], &ps, &mut problems);
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 4, "{text:#?}");
        assert!(text[0].starts_with("authorization policy other/cross names service other/pay"), "{text:#?}");
        assert!(
            text[1].starts_with("authorization policy shop/bad: spec.allow[0].from: \"orders\" is not a SPIFFE id")
                && text[1].ends_with("service shop/pay denies every caller until it is fixed"),
            "{text:#?}"
        );
        assert!(text[2].contains("shop/stray names service shop/gone"), "{text:#?}");
        assert!(text[3].contains("shop/typo: spec: unknown field `alow`"), "{text:#?}");
        let broken = m.services["shop/pay"].policy.broken.as_deref().expect("broken");
        assert!(broken.starts_with("authorization policy shop/bad: "), "{broken}");
    }

    #[test]
    fn namespace_labels_set_tls_and_unknown_values_are_strict() {
        let ns = |name: &str, v: &str| {
            Arc::new(
                serde_json::from_value::<Namespace>(
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {LABEL_TLS: v}}}),
                )
                .expect("ns"),
            )
        };
        let mut m = mesh(&[]);
        let mut problems = vec![];
        apply(&mut m, &[ns("a", "strict"), ns("b", "permissive"), ns("c", "STRICT!")], &[], &mut problems);
        assert_eq!(m.policy.namespaces["a"], TlsMode::Strict);
        assert_eq!(m.policy.namespaces["b"], TlsMode::Permissive);
        assert_eq!(m.policy.namespaces["c"], TlsMode::Strict);
        assert_eq!(problems, vec![Problem::TlsLabel { namespace: "c".into(), value: "STRICT!".into() }]);
    }
}
