//! Identities and authorization policy from Kubernetes objects (`watch::kube_translate`
//! with `watch::kube_policy`), on real object JSON: pods as the injector's golden files
//! show them injected (native sidecar and legacy container), an uninjected pod, and
//! `AuthorizationPolicy` objects as the API server returns them.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use neutrino_control_plane::model::AllowRuleModel;
use neutrino_control_plane::watch::kube_policy::AuthorizationPolicy;
use neutrino_control_plane::watch::kube_translate::{Objects, Problem, Translation, translate};
use neutrino_proto::TlsMode;
use serde_json::{Value, json};

const NS: &str = "shop";

/// An injector golden file's pod, placed in `NS` under `name`, running as `sa`.
fn injected(golden: &str, name: &str, sa: Option<&str>) -> Pod {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../injector/tests/golden").join(golden);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: Value = serde_yaml_ng::from_str(&text).unwrap();
    v["metadata"]["name"] = json!(name);
    v["metadata"]["namespace"] = json!(NS);
    v["metadata"]["uid"] = json!(format!("uid-{name}"));
    if let Some(sa) = sa {
        v["spec"]["serviceAccountName"] = json!(sa);
    }
    serde_json::from_value(v).unwrap()
}

fn plain_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx:1.27",
                 "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}}]},
        "status": {"phase": "Running", "podIP": "10.244.0.9"}
    }))
    .unwrap()
}

fn service(name: &str, ip: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "resourceVersion": "5"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .unwrap()
}

fn slice(service: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-a", "zone": "zone-a",
                   "targetRef": {"kind": "Pod", "namespace": NS, "name": pod, "uid": format!("uid-{pod}")}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-x7k2p"), "namespace": NS, "resourceVersion": "9",
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .unwrap()
}

fn namespace(labels: Value) -> Namespace {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NS, "labels": labels}, "spec": {"finalizers": ["kubernetes"]}}))
    .unwrap()
}

/// An AuthorizationPolicy as the API server returns it (metadata filled in).
fn policy(name: &str, spec: Value) -> AuthorizationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "policy.neutrino.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "resourceVersion": "42",
                     "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": spec
    }))
    .unwrap()
}

fn run(ns_labels: Value, policies: Vec<AuthorizationPolicy>) -> Translation {
    let services = [service("api", "10.96.0.20"), service("web", "10.96.0.21")].map(Arc::new);
    let slices = [
        slice("api", &[("10.244.0.5", "api-native"), ("10.244.0.6", "api-legacy"), ("10.244.0.7", "api-default-sa")]),
        slice("web", &[("10.244.0.9", "web-0")]),
    ]
    .map(Arc::new);
    let pods = [
        injected("javaweb-pod-with-init-container.injected.yaml", "api-native", Some("api")),
        injected("javaweb-pod-with-init-container.legacy.yaml", "api-legacy", Some("api")),
        injected("javaweb-pod-with-init-container.injected.yaml", "api-default-sa", None),
        plain_pod("web-0"),
    ]
    .map(Arc::new);
    let namespaces = [Arc::new(namespace(ns_labels))];
    let policies: Vec<Arc<AuthorizationPolicy>> = policies.into_iter().map(Arc::new).collect();
    translate(Objects {
        services: &services,
        slices: &slices,
        pods: &pods,
        namespaces: &namespaces,
        policies: &policies,
        ..Default::default()
    })
}

#[test]
fn injected_pods_are_meshed_as_their_service_account() {
    let t = run(json!({}), vec![]);
    assert_eq!(t.problems, vec![]);
    let api = &t.mesh.services["shop/api"];
    let sas: Vec<(String, Option<&str>)> =
        api.endpoints.iter().map(|e| (e.pod.clone(), e.service_account.as_deref())).collect();
    assert_eq!(
        sas,
        [
            ("api-native".to_string(), Some("api")),
            ("api-legacy".to_string(), Some("api")),
            ("api-default-sa".to_string(), Some("default")),
        ],
        "native sidecar, legacy container, and the default service account"
    );
    assert_eq!(t.mesh.services["shop/web"].endpoints[0].service_account, None, "no proxy: not meshed");
    assert_eq!(t.mesh.policy, Default::default(), "Kubernetes: allow and permissive by default");
}

#[test]
fn authorization_policies_become_the_services_rules() {
    let t = run(
        json!({"neutrino.io/tls": "strict"}),
        vec![policy(
            "api-callers",
            json!({"service": "api", "allow": [
                {"from": ["spiffe://cluster.local/ns/shop/sa/web"], "operations": ["listOrders"], "methods": ["get"]},
                {"from": ["spiffe://cluster.local/ns/ops/*"], "paths": ["/admin/*"]}
            ]}),
        )],
    );
    assert_eq!(t.problems, vec![]);
    assert_eq!(t.mesh.policy.namespaces[NS], TlsMode::Strict);
    let api = &t.mesh.services["shop/api"].policy;
    assert_eq!(api.tls, None, "the namespace's applies");
    assert_eq!(
        api.allow,
        [
            AllowRuleModel {
                from: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
                operations: vec!["listOrders".into()],
                methods: vec!["GET".into()],
                paths: vec![],
            },
            AllowRuleModel {
                from: vec!["spiffe://cluster.local/ns/ops/*".into()],
                paths: vec!["/admin/*".into()],
                ..Default::default()
            },
        ]
    );
    assert_eq!(t.mesh.services["shop/web"].policy, Default::default());
}

#[test]
fn unreadable_policies_close_their_service_and_are_reported() {
    let t = run(
        json!({"neutrino.io/tls": "yes"}),
        vec![
            policy("bad-method", json!({"service": "api", "tls": "strict", "allow": [{"methods": ["GE T"]}]})),
            policy("no-such", json!({"service": "orders"})),
        ],
    );
    let text: Vec<String> = t.problems.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 3, "{text:#?}");
    assert!(matches!(&t.problems[0], Problem::TlsLabel { value, .. } if value == "yes"), "{text:#?}");
    assert!(text[1].contains("shop/bad-method: spec.allow[0].methods: \"GE T\""), "{text:#?}");
    assert!(text[1].ends_with("service shop/api denies every caller until it is fixed"), "{text:#?}");
    assert!(text[2].contains("shop/no-such names service shop/orders, which is not in the mesh"), "{text:#?}");
    assert!(t.mesh.services["shop/api"].policy.broken.is_some());
    assert_eq!(t.mesh.policy.namespaces[NS], TlsMode::Strict, "an unknown label value is strict");
}
