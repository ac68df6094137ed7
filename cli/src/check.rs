//! `neutrino check` (issue 6, item 5): preflight and health of the mesh in a cluster.
//!
//! The IO half: [`gather`] asks the API server (kube-rs, KUBECONFIG or the pod's
//! service account; every request bounded by the timeout) for what the checks need and
//! fills [`Facts`]; [`evaluate::evaluate`] (pure) turns them into results; [`report`]
//! prints them. Fetched:
//!
//! - the API server's version;
//! - SelfSubjectAccessReviews of what installing and checking needs, and
//!   SubjectAccessReviews of what the control plane's ServiceAccount needs;
//! - the MutatingWebhookConfiguration `neutrino-sidecar-injector` (its caBundle is
//!   parsed for the CA's expiry), the injector Service's EndpointSlices, and the
//!   injector's `/ready` through the API server's service proxy (the path the API server
//!   takes to call the webhook);
//! - the control-plane pods, and each ready one's `/config_dump` through the pod proxy
//!   (`pods/NAME:15014/proxy/config_dump`): proxies are spread over the replicas, so one
//!   Service-proxy call would see only one replica's share; and its `/metrics` (the
//!   mesh CA's issuer and anchor expiry);
//! - the pods of namespaces labelled `neutrino.io/inject=enabled` and of the connected
//!   proxies' namespaces, for the proxies' versions (the proxy image's tag).
//!
//! This module must not change the cluster: it reads, and creates only access reviews,
//! which the API server answers without storing anything.

pub mod evaluate;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::Value as Json;

pub use evaluate::{Access, CheckResult, Facts, Fetched, Status};

use crate::install::{CONTROL_PLANE, INJECTOR_SERVICE, NAMESPACE, WEBHOOK_CONFIG};

/// The control plane's admin port, where `/config_dump` is served.
const CONTROL_PLANE_ADMIN_PORT: u16 = 15014;

/// Runs `f` with the timeout; either error becomes its message.
async fn bounded<T, E: std::fmt::Display>(timeout: Duration, f: impl Future<Output = Result<T, E>>) -> Fetched<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
    }
}

fn attributes(a: &Access) -> ResourceAttributes {
    ResourceAttributes {
        verb: Some(a.verb.to_string()),
        group: Some(a.group.to_string()),
        resource: Some(a.resource.to_string()),
        subresource: a.subresource.map(str::to_string),
        namespace: a.namespace.map(str::to_string),
        ..ResourceAttributes::default()
    }
}

async fn own_access(client: &Client, t: Duration) -> Vec<(Access, Fetched<bool>)> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut out = Vec::new();
    for a in evaluate::OWN_ACCESS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec { resource_attributes: Some(attributes(&a)), ..Default::default() },
            ..Default::default()
        };
        let answer = bounded(t, api.create(&PostParams::default(), &review)).await;
        out.push((a, answer.map(|r| r.status.is_some_and(|s| s.allowed))));
    }
    out
}

async fn control_plane_access(client: &Client, t: Duration) -> Vec<(Access, Fetched<bool>)> {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut out = Vec::new();
    for a in evaluate::CONTROL_PLANE_ACCESS {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{NAMESPACE}:{CONTROL_PLANE}")),
                groups: Some(vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{NAMESPACE}")]),
                resource_attributes: Some(attributes(&a)),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = bounded(t, api.create(&PostParams::default(), &review)).await;
        out.push((a, answer.map(|r| r.status.is_some_and(|s| s.allowed))));
    }
    out
}

/// A GET through the API server (service and pod proxies), as text.
async fn get_text(client: &Client, t: Duration, path: String) -> Fetched<String> {
    let request = http::Request::get(path).body(Vec::new()).map_err(|e| e.to_string())?;
    bounded(t, client.request_text(request)).await
}

async fn list<K>(api: Api<K>, t: Duration, labels: &str) -> Fetched<Vec<K>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    bounded(t, api.list(&ListParams::default().labels(labels))).await.map(|l| l.items)
}

/// Everything the checks need; stops after the version when the API is unreachable.
pub async fn gather(client: &Client, t: Duration, now_unix: i64) -> Facts {
    let version = bounded(t, client.apiserver_version()).await.map(|v| evaluate::Version {
        minor: v.minor.trim_end_matches('+').parse().unwrap_or(0),
        git_version: v.git_version,
    });
    let version = match version {
        Ok(v) => v,
        Err(e) => return Facts::unreachable(now_unix, e),
    };
    let mut facts = Facts::unreachable(now_unix, String::new());
    facts.version = Ok(version);
    facts.own_access = own_access(client, t).await;
    facts.webhook = bounded(t, Api::<MutatingWebhookConfiguration>::all(client.clone()).get_opt(WEBHOOK_CONFIG)).await;
    if matches!(facts.webhook, Ok(Some(_))) {
        facts.control_plane_access = control_plane_access(client, t).await;
    }
    let service_name = format!("kubernetes.io/service-name={INJECTOR_SERVICE}");
    facts.injector_slices = list(Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE), t, &service_name).await;
    let ready = format!("/api/v1/namespaces/{NAMESPACE}/services/https:{INJECTOR_SERVICE}:443/proxy/ready");
    facts.injector_ready = get_text(client, t, ready).await;
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    facts.control_plane_pods = list(pods, t, &format!("app.kubernetes.io/name={CONTROL_PLANE}")).await;
    let ready_pods: Vec<String> = match &facts.control_plane_pods {
        Ok(pods) => pods.iter().filter(|p| is_ready(p)).filter_map(|p| p.metadata.name.clone()).collect(),
        Err(_) => Vec::new(),
    };
    for pod in ready_pods {
        let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{CONTROL_PLANE_ADMIN_PORT}/proxy/config_dump");
        let dump = get_text(client, t, path).await;
        let dump = dump.and_then(|text| serde_json::from_str::<Json>(&text).map_err(|e| format!("not JSON: {e}")));
        let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{CONTROL_PLANE_ADMIN_PORT}/proxy/metrics");
        facts.metrics.push((pod.clone(), get_text(client, t, path).await));
        facts.dumps.push((pod, dump));
    }
    facts.meshed_pods = meshed_pods(client, t, &facts.dumps).await;
    facts
}

fn is_ready(p: &Pod) -> bool {
    let conditions = p.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Pods of the enabled namespaces and of the connected proxies' namespaces.
async fn meshed_pods(client: &Client, t: Duration, dumps: &[(String, Fetched<Json>)]) -> Fetched<Vec<Pod>> {
    let enabled = list(Api::<Namespace>::all(client.clone()), t, "neutrino.io/inject=enabled").await?;
    let mut namespaces: BTreeSet<String> = enabled.into_iter().filter_map(|n| n.metadata.name).collect();
    for (_, dump) in dumps.iter().filter_map(|(r, d)| d.as_ref().ok().map(|d| (r, d))) {
        let proxies = dump["proxies"].as_array().into_iter().flatten();
        namespaces.extend(proxies.filter_map(|p| p["namespace"].as_str().map(str::to_string)));
    }
    let mut out = Vec::new();
    for ns in namespaces {
        out.extend(bounded(t, Api::<Pod>::namespaced(client.clone(), &ns).list(&ListParams::default())).await?.items);
    }
    Ok(out)
}

/// Connects (KUBECONFIG, else in-cluster), gathers, evaluates.
pub async fn run(timeout: Duration) -> Vec<CheckResult> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64);
    let now = now.unwrap_or(0);
    match bounded(timeout, Client::try_default()).await {
        Ok(client) => evaluate::evaluate(&gather(&client, timeout, now).await),
        Err(e) => evaluate::evaluate(&Facts::unreachable(now, format!("no client configuration: {e}"))),
    }
}

/// One line per check (`✔`, `⚠` or `✘`, name, detail), its hint indented below; a summary.
pub fn report(results: &[CheckResult]) -> String {
    let mut out = String::new();
    for r in results {
        let mark = match r.status {
            Status::Pass => "✔",
            Status::Warn => "⚠",
            Status::Fail => "✘",
        };
        out.push_str(&format!("{mark} {}: {}\n", r.name, r.detail));
        if let Some(hint) = &r.hint {
            out.push_str(&format!("    hint: {hint}\n"));
        }
    }
    let count = |s: Status| results.iter().filter(|r| r.status == s).count();
    let (fail, warn) = (count(Status::Fail), count(Status::Warn));
    out.push_str(&match (fail, warn) {
        (0, 0) => "all checks passed\n".to_string(),
        (0, w) => format!("all checks passed, {w} warning(s)\n"),
        (f, w) => format!("{f} check(s) failed, {w} warning(s)\n"),
    });
    out
}
