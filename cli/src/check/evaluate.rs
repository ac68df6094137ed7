//! `neutrino check`, the pure half: what was fetched from the cluster ([`Facts`]) in, one
//! [`CheckResult`] per check out, each with a hint saying what to do. It must not do IO
//! nor read the clock (the time is a fact too); `check.rs` fetches.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value as Json;

use crate::install::{CONTROL_PLANE, INJECTOR_SERVICE, NAMESPACE, WEBHOOK_CONFIG};

/// Warn when the webhook's CA ends sooner than this.
pub const CA_WARN_DAYS: i64 = 30;
/// Native sidecars (the injector's default mode) need Kubernetes 1.29.
const NATIVE_SIDECAR_MINOR: u32 = 29;

/// Something fetched, or why it could not be.
pub type Fetched<T> = Result<T, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub hint: Option<String>,
}

fn result(name: &'static str, status: Status, detail: impl Into<String>, hint: Option<String>) -> CheckResult {
    CheckResult { name, status, detail: detail.into(), hint }
}

/// One permission: a verb on a resource (group "" is core), cluster-wide or in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    pub namespace: Option<&'static str>,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { String::new() } else { format!(".{}", self.group) };
        let sub = self.subresource.map(|s| format!("/{s}")).unwrap_or_default();
        let ns = self.namespace.map(|n| format!(" in {n}")).unwrap_or_default();
        write!(f, "{} {}{group}{sub}{ns}", self.verb, self.resource)
    }
}

const fn access(verb: &'static str, group: &'static str, resource: &'static str, ns: bool) -> Access {
    Access { verb, group, resource, subresource: None, namespace: if ns { Some("neutrino-system") } else { None } }
}

/// What `neutrino install | kubectl apply -f -` and this check need of the caller.
pub const OWN_ACCESS: [Access; 11] = [
    access("create", "", "namespaces", false),
    access("create", "rbac.authorization.k8s.io", "clusterroles", false),
    access("create", "rbac.authorization.k8s.io", "clusterrolebindings", false),
    access("create", "admissionregistration.k8s.io", "mutatingwebhookconfigurations", false),
    access("create", "apps", "deployments", true),
    access("create", "", "services", true),
    access("create", "", "secrets", true),
    access("create", "policy", "poddisruptionbudgets", true),
    access("list", "", "pods", false),
    Access { verb: "get", group: "", resource: "pods", subresource: Some("proxy"), namespace: Some("neutrino-system") },
    Access {
        verb: "get",
        group: "",
        resource: "services",
        subresource: Some("proxy"),
        namespace: Some("neutrino-system"),
    },
];

/// What the control plane's ServiceAccount needs for discovery and the mesh CA's
/// TokenReviews (deploy/base/rbac.yaml).
pub const CONTROL_PLANE_ACCESS: [Access; 11] = [
    access("list", "", "services", false),
    access("watch", "", "services", false),
    access("list", "", "pods", false),
    access("watch", "", "pods", false),
    access("list", "", "namespaces", false),
    access("watch", "", "namespaces", false),
    access("list", "", "configmaps", false),
    access("watch", "", "configmaps", false),
    access("list", "discovery.k8s.io", "endpointslices", false),
    access("watch", "discovery.k8s.io", "endpointslices", false),
    access("create", "authentication.k8s.io", "tokenreviews", false),
];

/// The API server's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub git_version: String,
    pub minor: u32,
}

/// Everything `check.rs` fetched. A later fact is `Err` when it was not fetched because
/// the API itself is unreachable; the API's own error then is the only result.
#[derive(Debug, Clone)]
pub struct Facts {
    pub now_unix: i64,
    pub version: Fetched<Version>,
    /// SelfSubjectAccessReviews of [`OWN_ACCESS`].
    pub own_access: Vec<(Access, Fetched<bool>)>,
    /// SubjectAccessReviews of [`CONTROL_PLANE_ACCESS`] for the control plane's ServiceAccount.
    pub control_plane_access: Vec<(Access, Fetched<bool>)>,
    /// `None`: not found.
    pub webhook: Fetched<Option<MutatingWebhookConfiguration>>,
    pub injector_slices: Fetched<Vec<EndpointSlice>>,
    /// The injector's `/ready` through the API server's service proxy (as the API server
    /// reaches the webhook).
    pub injector_ready: Fetched<String>,
    pub control_plane_pods: Fetched<Vec<Pod>>,
    /// `/config_dump` of each ready control-plane pod, by pod name.
    pub dumps: Vec<(String, Fetched<Json>)>,
    /// `/metrics` (Prometheus text) of each ready control-plane pod, by pod name: the
    /// mesh CA's expiry.
    pub metrics: Vec<(String, Fetched<String>)>,
    /// Pods in namespaces labelled `neutrino.io/inject=enabled` and in the namespaces of
    /// connected proxies.
    pub meshed_pods: Fetched<Vec<Pod>>,
}

impl Facts {
    /// Nothing fetched: the API is unreachable for `why` (the other facts are empty).
    pub fn unreachable(now_unix: i64, why: String) -> Facts {
        fn none<T>() -> Fetched<T> {
            Err("not fetched".to_string())
        }
        Facts {
            now_unix,
            version: Err(why),
            own_access: Vec::new(),
            control_plane_access: Vec::new(),
            webhook: none(),
            injector_slices: none(),
            injector_ready: none(),
            control_plane_pods: none(),
            dumps: Vec::new(),
            metrics: Vec::new(),
            meshed_pods: none(),
        }
    }
}

/// All checks, in the order they are printed.
pub fn evaluate(f: &Facts) -> Vec<CheckResult> {
    let version = match &f.version {
        Ok(v) => v,
        Err(e) => {
            let hint = "check KUBECONFIG and the current context (kubectl cluster-info)".to_string();
            return vec![result("Kubernetes API", Status::Fail, format!("unreachable: {e}"), Some(hint))];
        }
    };
    let installed = matches!(f.webhook, Ok(Some(_)));
    let mut out = vec![api(version)];
    out.push(own_access(&f.own_access, installed));
    if installed {
        out.push(control_plane_access(&f.control_plane_access));
    }
    out.push(webhook(&f.webhook));
    if let Ok(Some(w)) = &f.webhook {
        out.push(ca(w, f.now_unix));
    }
    out.push(injector(&f.injector_slices, &f.injector_ready));
    out.push(control_plane(&f.control_plane_pods));
    if !f.metrics.is_empty() {
        out.push(mesh_ca(&f.metrics, f.now_unix));
    }
    let (connected, proxies) = proxies(&f.dumps);
    out.push(connected);
    out.push(versions(&proxies, &f.meshed_pods));
    out
}

fn api(v: &Version) -> CheckResult {
    if v.minor < NATIVE_SIDECAR_MINOR {
        let hint = "install the injector with --sidecar-mode legacy (native sidecars need 1.29+)".to_string();
        return result("Kubernetes API", Status::Warn, format!("reachable, {}", v.git_version), Some(hint));
    }
    result("Kubernetes API", Status::Pass, format!("reachable, {}", v.git_version), None)
}

fn denied(list: &[(Access, Fetched<bool>)]) -> (Vec<String>, Vec<String>) {
    let no = list.iter().filter(|(_, r)| *r == Ok(false)).map(|(a, _)| a.to_string()).collect();
    let unknown = list.iter().filter_map(|(a, r)| r.as_ref().err().map(|e| format!("{a} ({e})"))).collect();
    (no, unknown)
}

fn own_access(list: &[(Access, Fetched<bool>)], installed: bool) -> CheckResult {
    let name = "Permissions (you)";
    let (no, unknown) = denied(list);
    if !no.is_empty() {
        // Before an install, missing rights make it fail: a preflight failure.
        let status = if installed { Status::Warn } else { Status::Fail };
        let hint = "ask for cluster-admin (or these rights) to install or upgrade the mesh".to_string();
        return result(name, status, format!("not allowed: {}", no.join(", ")), Some(hint));
    }
    if !unknown.is_empty() {
        return result(name, Status::Warn, format!("could not ask: {}", unknown.join(", ")), None);
    }
    result(name, Status::Pass, format!("may install and inspect the mesh ({} rights checked)", list.len()), None)
}

fn control_plane_access(list: &[(Access, Fetched<bool>)]) -> CheckResult {
    let name = "Permissions (control plane)";
    let (no, unknown) = denied(list);
    if !no.is_empty() {
        let hint = format!(
            "the ClusterRole/ClusterRoleBinding {CONTROL_PLANE} are missing or changed: apply `neutrino install` again"
        );
        return result(
            name,
            Status::Fail,
            format!("{NAMESPACE}/{CONTROL_PLANE} may not {}", no.join(", ")),
            Some(hint),
        );
    }
    if !unknown.is_empty() {
        let hint = "checking another account's rights needs create on subjectaccessreviews".to_string();
        return result(name, Status::Warn, format!("could not ask: {}", unknown.join(", ")), Some(hint));
    }
    result(name, Status::Pass, "discovery may list and watch what it needs", None)
}

fn webhook(w: &Fetched<Option<MutatingWebhookConfiguration>>) -> CheckResult {
    let name = "Injector webhook";
    let install = Some("install the mesh: neutrino install | kubectl apply -f -".to_string());
    let w = match w {
        Err(e) => return result(name, Status::Fail, format!("could not read {WEBHOOK_CONFIG}: {e}"), None),
        Ok(None) => return result(name, Status::Fail, format!("{WEBHOOK_CONFIG} is not registered"), install),
        Ok(Some(w)) => w,
    };
    let hooks = w.webhooks.as_deref().unwrap_or_default();
    let Some(hook) = hooks.first() else {
        return result(name, Status::Fail, format!("{WEBHOOK_CONFIG} has no webhooks"), install);
    };
    let target = hook.client_config.service.as_ref().map(|s| format!("{}/{}", s.namespace, s.name));
    let expected = format!("{NAMESPACE}/{INJECTOR_SERVICE}");
    if target.as_deref() != Some(expected.as_str()) {
        let detail = format!("{WEBHOOK_CONFIG} calls {}, not the Service {expected}", target.unwrap_or("a URL".into()));
        return result(name, Status::Warn, detail, None);
    }
    let policy = hook.failure_policy.as_deref().unwrap_or("Fail");
    result(name, Status::Pass, format!("{WEBHOOK_CONFIG} registered (failurePolicy {policy}) -> {expected}"), None)
}

/// The earliest end of validity among the caBundle's certificates (Unix seconds).
pub fn ca_not_after(pem: &[u8]) -> Result<i64, String> {
    let mut earliest = None;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("caBundle is not PEM: {e}"))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block.parse_x509().map_err(|e| format!("caBundle certificate: {e}"))?;
        let end = cert.validity().not_after.timestamp();
        earliest = Some(earliest.map_or(end, |e: i64| e.min(end)));
    }
    earliest.ok_or_else(|| "caBundle holds no certificate".to_string())
}

fn ca(w: &MutatingWebhookConfiguration, now: i64) -> CheckResult {
    let name = "Webhook CA";
    let renew = "renew it: neutrino install | kubectl apply -f - (or let cert-manager renew it)".to_string();
    let bundle = w.webhooks.as_deref().unwrap_or_default().first().and_then(|h| h.client_config.ca_bundle.as_ref());
    let Some(bundle) = bundle.filter(|b| !b.0.is_empty()) else {
        let hint = "the API server cannot verify the injector: apply `neutrino install` again, or check that \
                    cert-manager's cainjector is running (--cert-manager)"
            .to_string();
        return result(name, Status::Fail, "caBundle is empty", Some(hint));
    };
    let end = match ca_not_after(&bundle.0) {
        Ok(end) => end,
        Err(e) => return result(name, Status::Fail, e, Some(renew)),
    };
    let days = (end - now).div_euclid(86_400);
    let when = x509_parser::time::ASN1Time::from_timestamp(end).map(|t| t.to_string()).unwrap_or_default();
    if end <= now {
        return result(name, Status::Fail, format!("expired on {when}"), Some(renew));
    }
    if days < CA_WARN_DAYS {
        return result(name, Status::Warn, format!("expires in {days} days ({when})"), Some(renew));
    }
    result(name, Status::Pass, format!("valid for {days} more days (until {when})"), None)
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The mesh CA's issuer and anchors, from each control-plane replica's `/metrics`
/// (`neutrino_cp_issuer_expiry_timestamp_seconds`, `..._anchor_expiry_...`; 0 without a CA).
fn mesh_ca(metrics: &[(String, Fetched<String>)], now: i64) -> CheckResult {
    let name = "Mesh CA";
    let read: Vec<(&str, i64, i64)> = metrics
        .iter()
        .filter_map(|(pod, m)| {
            let text = m.as_ref().ok()?;
            let issuer = sample(text, "neutrino_cp_issuer_expiry_timestamp_seconds").unwrap_or(0.0) as i64;
            let anchor = sample(text, "neutrino_cp_anchor_expiry_timestamp_seconds").unwrap_or(0.0) as i64;
            Some((pod.as_str(), issuer, anchor))
        })
        .collect();
    if read.is_empty() {
        let errors: Vec<String> =
            metrics.iter().filter_map(|(pod, m)| m.as_ref().err().map(|e| format!("{pod}: {e}"))).collect();
        return result(name, Status::Warn, format!("could not read /metrics ({})", errors.join("; ")), None);
    }
    let without: Vec<&str> = read.iter().filter(|(_, issuer, _)| *issuer <= 0).map(|(pod, _, _)| *pod).collect();
    if !without.is_empty() {
        let hint = format!(
            "mount the Secret {NAMESPACE}/neutrino-ca and pass --trust-anchors, --issuer-cert and --issuer-key              (neutrino install does both)"
        );
        let detail = format!("no CA on {}: proxies get no certificates, so no mTLS", without.join(", "));
        return result(name, Status::Fail, detail, Some(hint));
    }
    let (issuer_pod, issuer_end, _) = read.iter().copied().min_by_key(|(_, issuer, _)| *issuer).unwrap_or_default();
    let anchor_end = read.iter().map(|(_, _, anchor)| *anchor).filter(|a| *a > 0).min().unwrap_or(i64::MAX);
    let date = |t: i64| x509_parser::time::ASN1Time::from_timestamp(t).map(|t| t.to_string()).unwrap_or_default();
    let renew_issuer = format!(
        "put a new issuer, signed by a current anchor, into the Secret {NAMESPACE}/neutrino-ca (tls.crt, tls.key):          the control plane reloads it within seconds (cert-manager renews it by itself)"
    );
    let renew_anchor = "rotate the anchor: add the new one to ca.crt, wait for every proxy, switch the issuer to                         one it signs, then remove the old anchor"
        .to_string();
    if issuer_end <= now {
        let detail = format!("the issuer expired on {} ({issuer_pod}): no certificate can be signed", date(issuer_end));
        return result(name, Status::Fail, detail, Some(renew_issuer));
    }
    if anchor_end <= now {
        return result(
            name,
            Status::Fail,
            format!("a trust anchor expired on {}", date(anchor_end)),
            Some(renew_anchor),
        );
    }
    let issuer_days = (issuer_end - now).div_euclid(86_400);
    if issuer_days < CA_WARN_DAYS {
        let detail = format!("the issuer expires in {issuer_days} days ({}, {issuer_pod})", date(issuer_end));
        return result(name, Status::Warn, detail, Some(renew_issuer));
    }
    let anchor_days = (anchor_end - now).div_euclid(86_400);
    if anchor_days < CA_WARN_DAYS {
        let detail = format!("a trust anchor expires in {anchor_days} days ({})", date(anchor_end));
        return result(name, Status::Warn, detail, Some(renew_anchor));
    }
    let detail =
        format!("issuer valid for {issuer_days} more days (until {}) on {} replica(s)", date(issuer_end), read.len());
    result(name, Status::Pass, detail, None)
}

fn injector(slices: &Fetched<Vec<EndpointSlice>>, ready: &Fetched<String>) -> CheckResult {
    let name = "Injector reachable";
    let pods = "kubectl -n neutrino-system get pods -l app.kubernetes.io/name=neutrino-injector";
    let count = match slices {
        Err(e) => return result(name, Status::Fail, format!("could not read its endpoints: {e}"), None),
        Ok(s) => s
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .count(),
    };
    if count == 0 {
        let detail = format!("the Service {NAMESPACE}/{INJECTOR_SERVICE} has no ready endpoints");
        let hint = format!("pods cannot be created in enabled namespaces (failurePolicy Fail): {pods}");
        return result(name, Status::Fail, detail, Some(hint));
    }
    if let Err(e) = ready {
        let detail = format!("{count} ready endpoints, but the API server cannot reach /ready: {e}");
        let hint = "check NetworkPolicies and firewalls between the API server and port 15017".to_string();
        return result(name, Status::Fail, detail, Some(hint));
    }
    result(name, Status::Pass, format!("{count} ready endpoints; /ready answers through the API server"), None)
}

fn pod_ready(p: &Pod) -> bool {
    let conditions = p.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

fn control_plane(pods: &Fetched<Vec<Pod>>) -> CheckResult {
    let name = "Control plane";
    let hint = Some(format!("kubectl -n {NAMESPACE} describe pods -l app.kubernetes.io/name={CONTROL_PLANE}"));
    let pods = match pods {
        Err(e) => return result(name, Status::Fail, format!("could not list its pods: {e}"), None),
        Ok(p) => p,
    };
    let ready = pods.iter().filter(|p| pod_ready(p)).count();
    let detail = format!("{ready}/{} pods ready", pods.len());
    match (ready, pods.len()) {
        (0, _) => result(name, Status::Fail, detail, hint),
        (r, n) if r < n => result(name, Status::Warn, detail, hint),
        _ => result(name, Status::Pass, detail, None),
    }
}

/// One connected proxy, from a control plane's `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub namespace: String,
    pub pod: String,
    pub replica: String,
    /// Every kind ACKed at the generation last sent.
    pub synced: bool,
    pub nack: Option<String>,
}

/// The proxies of every dump, and the check of their connection and sync state.
pub fn proxies(dumps: &[(String, Fetched<Json>)]) -> (CheckResult, Vec<Connected>) {
    let name = "Proxies connected";
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for (replica, dump) in dumps {
        let dump = match dump {
            Ok(d) => d,
            Err(e) => {
                failed.push(format!("{replica}: {e}"));
                continue;
            }
        };
        for p in dump["proxies"].as_array().into_iter().flatten() {
            let kinds = p["types"].as_object().into_iter().flatten().map(|(_, t)| t);
            let synced = kinds.clone().all(|t| t["acked_generation"] == t["last_sent_generation"]);
            let nack = kinds.filter_map(|t| t["last_nack"].as_str()).next().map(str::to_string);
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            out.push(Connected { namespace: s("namespace"), pod: s("pod"), replica: replica.clone(), synced, nack });
        }
    }
    if dumps.is_empty() || failed.len() == dumps.len() {
        let detail = match failed.is_empty() {
            true => "no ready control-plane pod to ask".to_string(),
            false => format!("could not read /config_dump: {}", failed.join("; ")),
        };
        return (result(name, Status::Fail, detail, None), out);
    }
    let per_replica: BTreeMap<&str, usize> = out.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.replica.as_str()).or_default() += 1;
        m
    });
    let spread = per_replica.iter().map(|(r, n)| format!("{n} on {r}")).collect::<Vec<_>>().join(", ");
    let mut detail = format!("{} connected", out.len());
    if !spread.is_empty() {
        detail.push_str(&format!(" ({spread})"));
    }
    let behind: Vec<String> = out.iter().filter(|c| !c.synced).map(|c| format!("{}/{}", c.namespace, c.pod)).collect();
    if let Some(c) = out.iter().find(|c| c.nack.is_some()) {
        let detail =
            format!("{detail}; {}/{} rejected config: {}", c.namespace, c.pod, c.nack.as_deref().unwrap_or(""));
        let hint = "the control plane logs each NACK with its reasons".to_string();
        return (result(name, Status::Warn, detail, Some(hint)), out);
    }
    if !failed.is_empty() {
        return (result(name, Status::Warn, format!("{detail}; not asked: {}", failed.join("; ")), None), out);
    }
    if !behind.is_empty() {
        let detail = format!("{detail}; not yet ACKed the latest config: {}", behind.join(", "));
        return (result(name, Status::Warn, detail, None), out);
    }
    (result(name, Status::Pass, format!("{detail}, all in sync"), None), out)
}

/// The proxy image's tag of an injected pod, or the injector version that injected it.
fn proxy_version(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    let containers = spec.init_containers.iter().flatten().chain(&spec.containers);
    let image = containers.filter(|c| c.name == neutrino_injector::PROXY_CONTAINER).find_map(|c| c.image.clone());
    let tag = image.as_deref().and_then(|i| i.rsplit_once(':')).map(|(_, t)| t.to_string());
    let annotations = p.metadata.annotations.as_ref();
    tag.or_else(|| annotations.and_then(|a| a.get(neutrino_injector::ANNOTATION_INJECTED)).cloned())
}

fn versions(connected: &[Connected], pods: &Fetched<Vec<Pod>>) -> CheckResult {
    let name = "Proxy versions";
    let pods = match pods {
        Err(e) => return result(name, Status::Warn, format!("could not list meshed pods: {e}"), None),
        Ok(p) => p,
    };
    let key = |ns: &str, pod: &str| format!("{ns}/{pod}");
    let connected_keys: BTreeSet<String> = connected.iter().map(|c| key(&c.namespace, &c.pod)).collect();
    let mut by_version: BTreeMap<String, usize> = BTreeMap::new();
    let mut disconnected = Vec::new();
    for p in pods {
        let Some(version) = proxy_version(p) else { continue };
        let ns = p.metadata.namespace.as_deref().unwrap_or_default();
        let pod = p.metadata.name.as_deref().unwrap_or_default();
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if connected_keys.contains(&key(ns, pod)) {
            *by_version.entry(version).or_default() += 1;
        } else if running {
            disconnected.push(key(ns, pod));
        }
    }
    let list = by_version.iter().map(|(v, n)| format!("{n} at {v}")).collect::<Vec<_>>().join(", ");
    let list = if list.is_empty() { "no meshed pods".to_string() } else { list };
    if !disconnected.is_empty() {
        let detail = format!("{list}; running but not connected: {}", disconnected.join(", "));
        let hint = "kubectl logs POD -n NAMESPACE -c neutrino-proxy".to_string();
        return result(name, Status::Warn, detail, Some(hint));
    }
    if by_version.len() > 1 || by_version.keys().any(|v| v != neutrino_injector::VERSION) {
        let hint =
            format!("restart older workloads to move them to {} (kubectl rollout restart)", neutrino_injector::VERSION);
        return result(name, Status::Warn, format!("{list} (this CLI is {})", neutrino_injector::VERSION), Some(hint));
    }
    result(name, Status::Pass, list, None)
}

#[cfg(test)]
#[path = "evaluate_tests.rs"]
mod tests;
