//! Unit tests of `evaluate`: facts as the API server would return them (real object
//! JSON), one change at a time from a healthy mesh.

use serde_json::json;

use super::*;
use crate::install::{TLS_VALIDITY_DAYS, generate_tls};

const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;

fn obj<T: serde::de::DeserializeOwned>(v: Json) -> T {
    serde_json::from_value(v).expect("valid object JSON")
}

fn pod(ns: &str, name: &str, ready: bool, proxy_image: Option<&str>) -> Pod {
    let mut containers = vec![json!({"name": "app", "image": "app:1"})];
    let mut init = vec![];
    let mut annotations = json!({});
    if let Some(image) = proxy_image {
        annotations["neutrino.io/injected"] = json!("0.1.0");
        init.push(json!({"name": "neutrino-proxy", "image": image, "restartPolicy": "Always"}));
        containers.push(json!({"name": "sidecar", "image": "other:2"}));
    }
    obj(json!({
        "metadata": {"namespace": ns, "name": name, "annotations": annotations},
        "spec": {"initContainers": init, "containers": containers},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    }))
}

/// A caBundle whose certificate ends `days_left` days after NOW.
fn ca_bundle(days_left: i64) -> String {
    use base64::Engine as _;
    let tls = generate_tls(NOW + days_left * DAY - TLS_VALIDITY_DAYS * DAY).expect("tls");
    base64::engine::general_purpose::STANDARD.encode(tls.ca_pem)
}

fn webhook(ca: Option<String>) -> MutatingWebhookConfiguration {
    let mut client =
        json!({"service": {"namespace": "neutrino-system", "name": "neutrino-injector", "path": "/mutate"}});
    if let Some(ca) = ca {
        client["caBundle"] = json!(ca);
    }
    obj(json!({
        "metadata": {"name": "neutrino-sidecar-injector"},
        "webhooks": [{
            "name": "sidecar-injector.neutrino.io", "clientConfig": client, "failurePolicy": "Fail",
            "sideEffects": "None", "admissionReviewVersions": ["v1"],
        }],
    }))
}

fn slice(ready: &[bool]) -> EndpointSlice {
    let endpoints: Vec<Json> =
        ready.iter().map(|r| json!({"addresses": ["10.0.0.1"], "conditions": {"ready": r}})).collect();
    obj(json!({"metadata": {"name": "neutrino-injector-abc"}, "addressType": "IPv4", "endpoints": endpoints}))
}

/// A `/config_dump` with these proxies: (namespace, pod, acked == sent, NACK).
fn dump(proxies: &[(&str, &str, bool, Option<&str>)]) -> Json {
    let proxies: Vec<Json> = proxies
        .iter()
        .map(|(ns, pod, synced, nack)| {
            json!({
                "node_id": format!("{pod}.{ns}"), "namespace": ns, "pod": pod,
                "types": {
                    "Service": {"last_sent_generation": 4, "acked_generation": if *synced { 4 } else { 3 }, "last_nack": nack},
                    "Endpoints": {"last_sent_generation": 4, "acked_generation": 4, "last_nack": null},
                },
            })
        })
        .collect();
    json!({"generation": 4, "proxies": proxies})
}

/// A control plane's `/metrics` whose issuer ends `issuer_days` and anchor `anchor_days` after NOW
/// (as the control plane prints them, with the other metrics around).
fn ca_metrics(issuer_days: i64, anchor_days: i64) -> String {
    format!(
        "# HELP neutrino_cp_connected_proxies Proxies\n# TYPE neutrino_cp_connected_proxies gauge\n\
         neutrino_cp_connected_proxies 2\n\
         # TYPE neutrino_cp_issuer_expiry_timestamp_seconds gauge\n\
         neutrino_cp_issuer_expiry_timestamp_seconds {}\n\
         neutrino_cp_anchor_expiry_timestamp_seconds {}\n# EOF\n",
        NOW + issuer_days * DAY,
        NOW + anchor_days * DAY
    )
}

fn healthy() -> Facts {
    Facts {
        now_unix: NOW,
        version: Ok(Version { git_version: "v1.32.2".into(), minor: 32 }),
        own_access: OWN_ACCESS.iter().map(|a| (a.clone(), Ok(true))).collect(),
        control_plane_access: CONTROL_PLANE_ACCESS.iter().map(|a| (a.clone(), Ok(true))).collect(),
        webhook: Ok(Some(webhook(Some(ca_bundle(3000))))),
        injector_slices: Ok(vec![slice(&[true, true])]),
        injector_ready: Ok("ready\n".into()),
        control_plane_pods: Ok(vec![
            pod("neutrino-system", "cp-a", true, None),
            pod("neutrino-system", "cp-b", true, None),
        ]),
        dumps: vec![
            ("cp-a".into(), Ok(dump(&[("shop", "web-1", true, None)]))),
            ("cp-b".into(), Ok(dump(&[("shop", "web-2", true, None)]))),
        ],
        metrics: vec![("cp-a".into(), Ok(ca_metrics(365, 3650))), ("cp-b".into(), Ok(ca_metrics(365, 3650)))],
        meshed_pods: Ok(vec![
            pod("shop", "web-1", true, Some("neutrino/neutrino-proxy:0.1.0")),
            pod("shop", "web-2", true, Some("neutrino/neutrino-proxy:0.1.0")),
            pod("shop", "not-meshed", true, None),
        ]),
    }
}

fn by_name<'a>(results: &'a [CheckResult], name: &str) -> &'a CheckResult {
    results.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name} in {results:#?}"))
}

fn status(f: &Facts, name: &str) -> (Status, String) {
    let results = evaluate(f);
    let r = by_name(&results, name);
    (r.status, r.detail.clone())
}

#[test]
fn a_healthy_mesh_passes_every_check() {
    let results = evaluate(&healthy());
    assert!(results.iter().all(|r| r.status == Status::Pass), "{results:#?}");
    assert_eq!(results.len(), 10);
    assert_eq!(
        by_name(&results, "Mesh CA").detail,
        format!(
            "issuer valid for 365 more days (until {}) on 2 replica(s)",
            x509_parser::time::ASN1Time::from_timestamp(NOW + 365 * DAY).expect("time")
        )
    );
    assert_eq!(by_name(&results, "Proxies connected").detail, "2 connected (1 on cp-a, 1 on cp-b), all in sync");
    assert_eq!(by_name(&results, "Proxy versions").detail, "2 at 0.1.0");
    assert!(by_name(&results, "Webhook CA").detail.starts_with("valid for 3000 more days"));
    let text = crate::check::report(&results);
    assert!(text.starts_with("✔ Kubernetes API: reachable, v1.32.2\n"), "{text}");
    assert!(text.ends_with("all checks passed\n"), "{text}");
}

#[test]
fn an_unreachable_api_is_the_only_result() {
    let results = evaluate(&Facts::unreachable(NOW, "connection refused".into()));
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, Status::Fail);
    assert!(results[0].hint.as_deref().unwrap_or_default().contains("KUBECONFIG"));
}

#[test]
fn before_install_the_webhook_is_missing_and_missing_rights_fail_the_preflight() {
    let mut f = healthy();
    f.webhook = Ok(None);
    f.own_access[1].1 = Ok(false);
    let results = evaluate(&f);
    let w = by_name(&results, "Injector webhook");
    assert_eq!(w.status, Status::Fail);
    assert!(w.hint.as_deref().unwrap_or_default().contains("neutrino install"));
    assert!(results.iter().all(|r| r.name != "Webhook CA" && r.name != "Permissions (control plane)"));
    let own = by_name(&results, "Permissions (you)");
    assert_eq!(
        (own.status, own.detail.as_str()),
        (Status::Fail, "not allowed: create clusterroles.rbac.authorization.k8s.io")
    );
    // Installed already: the same gap is only a warning.
    let mut f = healthy();
    f.own_access[9].1 = Ok(false);
    assert_eq!(
        status(&f, "Permissions (you)"),
        (Status::Warn, "not allowed: get pods/proxy in neutrino-system".into())
    );
}

#[test]
fn the_ca_warns_under_30_days_and_fails_when_expired_or_missing() {
    let mut f = healthy();
    f.webhook = Ok(Some(webhook(Some(ca_bundle(10)))));
    let (s, detail) = status(&f, "Webhook CA");
    assert_eq!(s, Status::Warn);
    assert!(detail.starts_with("expires in 10 days"), "{detail}");
    f.webhook = Ok(Some(webhook(Some(ca_bundle(-1)))));
    assert!(matches!(status(&f, "Webhook CA"), (Status::Fail, d) if d.starts_with("expired on")));
    f.webhook = Ok(Some(webhook(None)));
    assert_eq!(status(&f, "Webhook CA"), (Status::Fail, "caBundle is empty".into()));
    f.webhook = Ok(Some(webhook(Some("bm90IHBlbQ==".into()))));
    assert_eq!(status(&f, "Webhook CA"), (Status::Fail, "caBundle holds no certificate".into()));
}

#[test]
fn the_injector_needs_ready_endpoints_the_api_server_can_reach() {
    let mut f = healthy();
    f.injector_slices = Ok(vec![slice(&[false])]);
    let (s, detail) = status(&f, "Injector reachable");
    assert_eq!(
        (s, detail.as_str()),
        (Status::Fail, "the Service neutrino-system/neutrino-injector has no ready endpoints")
    );
    let mut f = healthy();
    f.injector_ready = Err("503 Service Unavailable".into());
    assert!(matches!(status(&f, "Injector reachable"), (Status::Fail, d) if d.contains("cannot reach /ready")));
    let mut f = healthy();
    f.webhook = Ok(Some(obj(json!({"metadata": {"name": "x"}, "webhooks": [{
        "name": "a.b.c", "clientConfig": {"url": "https://elsewhere"}, "sideEffects": "None", "admissionReviewVersions": ["v1"],
    }]}))));
    assert_eq!(status(&f, "Injector webhook").0, Status::Warn);
}

#[test]
fn control_plane_pods_and_rights() {
    let mut f = healthy();
    f.control_plane_pods =
        Ok(vec![pod("neutrino-system", "cp-a", true, None), pod("neutrino-system", "cp-b", false, None)]);
    assert_eq!(status(&f, "Control plane"), (Status::Warn, "1/2 pods ready".into()));
    f.control_plane_pods = Ok(vec![]);
    assert_eq!(status(&f, "Control plane"), (Status::Fail, "0/0 pods ready".into()));
    let mut f = healthy();
    f.control_plane_access[8].1 = Ok(false);
    let (s, detail) = status(&f, "Permissions (control plane)");
    assert_eq!(s, Status::Fail);
    assert!(detail.ends_with("may not list endpointslices.discovery.k8s.io"), "{detail}");
    f.control_plane_access[8].1 = Err("forbidden".into());
    assert_eq!(status(&f, "Permissions (control plane)").0, Status::Warn);
}

#[test]
fn proxies_behind_or_rejecting_config_warn_and_no_dump_fails() {
    let mut f = healthy();
    f.dumps[1].1 = Ok(dump(&[("shop", "web-2", false, None)]));
    assert!(matches!(status(&f, "Proxies connected"), (Status::Warn, d) if d.ends_with("latest config: shop/web-2")));
    f.dumps[1].1 = Ok(dump(&[("shop", "web-2", false, Some("nonce 7: bad route"))]));
    assert!(matches!(status(&f, "Proxies connected"), (Status::Warn, d) if d.contains("rejected config: nonce 7")));
    f.dumps[1].1 = Err("502".into());
    assert!(matches!(status(&f, "Proxies connected"), (Status::Warn, d) if d.contains("not asked: cp-b: 502")));
    f.dumps[0].1 = Err("502".into());
    assert_eq!(status(&f, "Proxies connected").0, Status::Fail);
    f.dumps.clear();
    assert_eq!(status(&f, "Proxies connected"), (Status::Fail, "no ready control-plane pod to ask".into()));
}

#[test]
fn versions_are_counted_and_skew_or_silence_warns() {
    let mut f = healthy();
    let Ok(pods) = &mut f.meshed_pods else { unreachable!() };
    pods[1] = pod("shop", "web-2", true, Some("reg/neutrino-proxy:0.0.9"));
    let (s, detail) = status(&f, "Proxy versions");
    assert_eq!((s, detail.as_str()), (Status::Warn, "1 at 0.0.9, 1 at 0.1.0 (this CLI is 0.1.0)"));
    let Ok(pods) = &mut f.meshed_pods else { unreachable!() };
    pods.push(pod("shop", "web-3", false, Some("neutrino/neutrino-proxy:0.1.0")));
    assert!(
        matches!(status(&f, "Proxy versions"), (Status::Warn, d) if d.ends_with("running but not connected: shop/web-3"))
    );
}

#[test]
fn the_mesh_ca_warns_30_days_before_the_issuer_or_an_anchor_ends_and_fails_when_expired_or_missing() {
    let with = |a: Fetched<String>, b: Fetched<String>| {
        let mut f = healthy();
        f.metrics = vec![("cp-a".into(), a), ("cp-b".into(), b)];
        status(&f, "Mesh CA")
    };
    let (s, d) = with(Ok(ca_metrics(29, 3650)), Ok(ca_metrics(365, 3650)));
    assert_eq!(s, Status::Warn);
    assert!(d.starts_with("the issuer expires in 29 days") && d.contains("cp-a"), "{d}");
    assert_eq!(with(Ok(ca_metrics(30, 3650)), Ok(ca_metrics(365, 3650))).0, Status::Pass);
    let (s, d) = with(Ok(ca_metrics(365, 3650)), Ok(ca_metrics(-1, 3650)));
    assert_eq!(s, Status::Fail);
    assert!(d.contains("expired") && d.contains("cp-b"), "{d}");
    let (s, d) = with(Ok(ca_metrics(365, 10)), Ok(ca_metrics(365, 3650)));
    assert!(s == Status::Warn && d.contains("trust anchor expires in 10 days"), "{d}");
    let (s, d) = with(Ok(ca_metrics(365, 0)), Ok(ca_metrics(365, 3650)));
    assert!(s == Status::Fail && d.contains("trust anchor expired"), "{d}");
    // A replica without a CA (the metric is 0, or absent in an older version).
    let (s, d) = with(Ok(ca_metrics(365, 3650)), Ok("neutrino_cp_connected_proxies 2\n".into()));
    assert!(s == Status::Fail && d.contains("no CA on cp-b"), "{d}");
    let (s, d) = with(Err("502".into()), Err("timeout".into()));
    assert!(s == Status::Warn && d.contains("cp-a: 502"), "{d}");
    assert_eq!(with(Err("502".into()), Ok(ca_metrics(365, 3650))).0, Status::Pass);
    let mut f = healthy();
    f.metrics.clear();
    assert!(evaluate(&f).iter().all(|r| r.name != "Mesh CA"), "no ready replica: the control-plane check says so");
    assert_eq!(sample("x_total 3\nx 4\n", "x"), Some(4.0));
}
