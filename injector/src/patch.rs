//! Step 4, the patch: a pure function from a pod (or a pod template: anything with
//! `metadata` and `spec.containers`) to the decision and the JSON Patch (RFC 6902) that
//! adds the proxy.
//!
//! Decisions, in order: a pod already injected (a `neutrino.io/status` or
//! `neutrino.io/injected` annotation, or a container named `neutrino-proxy`) gets an empty
//! patch; a host-network pod, a pod labelled `neutrino.io/inject: disabled` and a pod in
//! the mesh's own namespace are skipped, and the patch only records why in
//! `neutrino.io/inject-skipped` (empty when it already says so); anything else is injected.
//!
//! Ordering of `initContainers` (native mode): `neutrino-init`, then `neutrino-proxy`,
//! then the pod's own. The iptables rules are in place from the moment `neutrino-init`
//! exits, so every later container's traffic goes through the proxy: the proxy must be up
//! (its startup probe passed) before any app init container runs, or those that use the
//! network would fail. Legacy mode has no sidecar among init containers, so `neutrino-init`
//! goes last: app init containers run before interception, with the network as without
//! the mesh, and the proxy (first in `containers`, its `postStart` hook waiting for
//! `/ready`) starts before the app containers.
//!
//! Every `add` whose parent may be missing (`metadata`, `metadata.annotations`,
//! `spec.initContainers`, `spec.volumes`) adds the whole parent instead, as RFC 6902 fails
//! on a missing parent; what was created is recorded in the status annotation so
//! [`crate::uninject`] can remove it again. Keys are escaped (`/` as `~1`, `~` as `~0`).
//!
//! This module must do no IO and must not mutate the pod: it returns a patch.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::config::{InjectConfig, SidecarMode};
use crate::overrides::{self, AnnotationError};
use crate::{
    ANNOTATION_DEFAULT_CONTAINER, ANNOTATION_INJECTED, ANNOTATION_SKIPPED, ANNOTATION_STATUS, INIT_CONTAINER,
    LABEL_INJECT, PROXY_CONTAINER, TOKEN_VOLUME, VERSION, containers,
};

/// One JSON Patch operation; only the two the injector and uninject need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Add { path: String, value: Value },
    Remove { path: String },
}

/// What an injection added, stored as JSON in the `neutrino.io/status` annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: String,
    pub sidecar_mode: String,
    /// Names added to `spec.initContainers`.
    pub init_containers: Vec<String>,
    /// Names added to `spec.containers`.
    pub containers: Vec<String>,
    /// Names added to `spec.volumes`.
    pub volumes: Vec<String>,
    /// Annotation keys added (this one included).
    pub annotations: Vec<String>,
    /// JSON pointers of the maps and lists the patch created because they were missing.
    pub created: Vec<String>,
}

/// Why a pod is not injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `spec.hostNetwork: true`: the init container's rules would capture the node's traffic.
    HostNetwork,
    /// The pod's `neutrino.io/inject` label says so.
    Disabled { value: String },
    /// The pod is in the mesh's own namespace.
    SystemNamespace { namespace: String },
}

impl SkipReason {
    /// The short form written into `neutrino.io/inject-skipped`.
    pub fn code(&self) -> &'static str {
        match self {
            SkipReason::HostNetwork => "host-network",
            SkipReason::Disabled { .. } => "disabled-by-label",
            SkipReason::SystemNamespace { .. } => "system-namespace",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::HostNetwork => {
                f.write_str("the pod uses hostNetwork: its nat rules would capture the whole node's traffic")
            }
            SkipReason::Disabled { value } => write!(f, "the pod is labelled {LABEL_INJECT}={value}"),
            SkipReason::SystemNamespace { namespace } => {
                write!(f, "the pod is in the mesh's own namespace {namespace}")
            }
        }
    }
}

/// The decision and its patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected {
        patch: Vec<Op>,
        status: Status,
    },
    /// The patch records the reason in `neutrino.io/inject-skipped` (empty if it already does).
    Skipped {
        reason: SkipReason,
        patch: Vec<Op>,
    },
    /// Nothing to do: the pod carries the proxy or the injector's annotations.
    AlreadyInjected,
}

impl Outcome {
    pub fn patch(&self) -> &[Op] {
        match self {
            Outcome::Injected { patch, .. } | Outcome::Skipped { patch, .. } => patch,
            Outcome::AlreadyInjected => &[],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatchError {
    #[error("injecting: {what}; a pod (or pod template) needs metadata and a non-empty spec.containers")]
    NotAPod { what: String },
    #[error("injecting: {field} is {found}, expected {expected}; fix the manifest")]
    BadField { field: &'static str, expected: &'static str, found: &'static str },
    #[error("injecting: the pod already has {kind} named {name:?}, a name the injector adds; rename yours")]
    NameTaken { kind: &'static str, name: &'static str },
    #[error("injecting: {0}")]
    Annotation(#[from] AnnotationError),
    #[error("applying the patch: {0} (the patch was made for another document?)")]
    Apply(String),
}

/// Escapes a key for use in a JSON pointer (RFC 6901): `~` as `~0`, `/` as `~1`.
pub fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Applies the operations to a document with the `json-patch` crate (all or nothing).
pub fn apply(doc: &mut Value, ops: &[Op]) -> Result<(), PatchError> {
    let value = serde_json::to_value(ops).map_err(|e| PatchError::Apply(e.to_string()))?;
    let patch: json_patch::Patch = serde_json::from_value(value).map_err(|e| PatchError::Apply(e.to_string()))?;
    json_patch::patch(doc, &patch).map_err(|e| PatchError::Apply(e.to_string()))
}

/// What kind of JSON value this is, for error messages ("a list", "a map", ...).
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// A field that must be a map when present (`null` counts as absent).
fn optional_map<'a>(
    parent: &'a Value,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a Map<String, Value>>, PatchError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(PatchError::BadField { field, expected: "a map", found: json_type(other) }),
    }
}

/// A field that must be a list when present (`null` counts as absent).
fn optional_list<'a>(parent: &'a Value, key: &str, field: &'static str) -> Result<Option<&'a Vec<Value>>, PatchError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(other) => Err(PatchError::BadField { field, expected: "a list", found: json_type(other) }),
    }
}

fn has_named(list: Option<&Vec<Value>>, name: &str) -> bool {
    list.is_some_and(|l| l.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(name)))
}

/// Adds annotations, creating `metadata` or `metadata.annotations` when missing.
fn annotation_ops(pod: &Value, entries: &[(&str, String)], ops: &mut Vec<Op>) -> Result<(), PatchError> {
    let map = || Value::Object(entries.iter().map(|(k, v)| (k.to_string(), json!(v))).collect());
    if optional_map(pod, "metadata", "metadata")?.is_none() {
        ops.push(Op::Add { path: "/metadata".into(), value: json!({"annotations": map()}) });
        return Ok(());
    }
    if optional_map(&pod["metadata"], "annotations", "metadata.annotations")?.is_none() {
        ops.push(Op::Add { path: "/metadata/annotations".into(), value: map() });
        return Ok(());
    }
    for (k, v) in entries {
        ops.push(Op::Add { path: format!("/metadata/annotations/{}", escape(k)), value: json!(v) });
    }
    Ok(())
}

/// Why this pod is not to be injected, if it is not.
fn skip_reason(pod: &Value, namespace: Option<&str>, cfg: &InjectConfig) -> Option<SkipReason> {
    if pod["spec"]["hostNetwork"] == json!(true) {
        return Some(SkipReason::HostNetwork);
    }
    if let Some(value) = pod["metadata"]["labels"][LABEL_INJECT].as_str()
        && matches!(value, "disabled" | "false")
    {
        return Some(SkipReason::Disabled { value: value.to_string() });
    }
    match namespace {
        Some(ns) if ns == cfg.system_namespace => Some(SkipReason::SystemNamespace { namespace: ns.to_string() }),
        _ => None,
    }
}

/// Decides and builds the patch for one pod. `namespace` is where the pod will live when
/// known (the AdmissionRequest's, or the manifest's); the pod's own `metadata.namespace`
/// is used when it is `None`.
pub fn inject(pod: &Value, namespace: Option<&str>, cfg: &InjectConfig) -> Result<Outcome, PatchError> {
    if !pod.is_object() {
        return Err(PatchError::NotAPod { what: format!("the object is {}", json_type(pod)) });
    }
    let metadata = optional_map(pod, "metadata", "metadata")?;
    let annotations = optional_map(&pod["metadata"], "annotations", "metadata.annotations")?;
    let spec = match pod.get("spec") {
        Some(s @ Value::Object(_)) => s,
        _ => return Err(PatchError::NotAPod { what: "spec is missing".into() }),
    };
    let app_containers = match optional_list(spec, "containers", "spec.containers")? {
        Some(c) if !c.is_empty() => c,
        _ => return Err(PatchError::NotAPod { what: "spec.containers is missing or empty".into() }),
    };
    let init_containers = optional_list(spec, "initContainers", "spec.initContainers")?;
    let volumes = optional_list(spec, "volumes", "spec.volumes")?;

    let annotated = |k: &str| annotations.is_some_and(|a| a.contains_key(k));
    if annotated(ANNOTATION_STATUS)
        || annotated(ANNOTATION_INJECTED)
        || has_named(Some(app_containers), PROXY_CONTAINER)
        || has_named(init_containers, PROXY_CONTAINER)
    {
        return Ok(Outcome::AlreadyInjected);
    }

    let own_namespace = metadata.and_then(|m| m.get("namespace")).and_then(Value::as_str);
    if let Some(reason) = skip_reason(pod, namespace.or(own_namespace), cfg) {
        let mut patch = Vec::new();
        if annotations.and_then(|a| a.get(ANNOTATION_SKIPPED)).and_then(Value::as_str) != Some(reason.code()) {
            annotation_ops(pod, &[(ANNOTATION_SKIPPED, reason.code().to_string())], &mut patch)?;
        }
        return Ok(Outcome::Skipped { reason, patch });
    }

    let o = overrides::parse(annotations)?;
    if has_named(init_containers, INIT_CONTAINER) || has_named(Some(app_containers), INIT_CONTAINER) {
        return Err(PatchError::NameTaken { kind: "a container", name: INIT_CONTAINER });
    }
    if has_named(volumes, TOKEN_VOLUME) {
        return Err(PatchError::NameTaken { kind: "a volume", name: TOKEN_VOLUME });
    }
    let init = containers::init_container(cfg, &o);
    let proxy = containers::proxy_container(cfg, &o)?;

    let mut created = Vec::new();
    if metadata.is_none() {
        created.push("/metadata".to_string());
    }
    if annotations.is_none() {
        created.push("/metadata/annotations".to_string());
    }
    if init_containers.is_none() {
        created.push("/spec/initContainers".to_string());
    }
    if volumes.is_none() {
        created.push("/spec/volumes".to_string());
    }

    let mut patch = Vec::new();
    let mut status = Status {
        version: VERSION.to_string(),
        sidecar_mode: cfg.sidecar_mode.as_str().to_string(),
        init_containers: vec![INIT_CONTAINER.to_string()],
        containers: Vec::new(),
        volumes: vec![TOKEN_VOLUME.to_string()],
        annotations: vec![ANNOTATION_INJECTED.to_string(), ANNOTATION_STATUS.to_string()],
        created,
    };
    let mut extra_annotations = Vec::new();
    match cfg.sidecar_mode {
        SidecarMode::Native => {
            status.init_containers.push(PROXY_CONTAINER.to_string());
            if init_containers.is_none() {
                patch.push(Op::Add { path: "/spec/initContainers".into(), value: json!([init, proxy]) });
            } else {
                patch.push(Op::Add { path: "/spec/initContainers/0".into(), value: init });
                patch.push(Op::Add { path: "/spec/initContainers/1".into(), value: proxy });
            }
        }
        SidecarMode::Legacy => {
            status.containers.push(PROXY_CONTAINER.to_string());
            if init_containers.is_none() {
                patch.push(Op::Add { path: "/spec/initContainers".into(), value: json!([init]) });
            } else {
                patch.push(Op::Add { path: "/spec/initContainers/-".into(), value: init });
            }
            patch.push(Op::Add { path: "/spec/containers/0".into(), value: proxy });
            // The proxy is now first: keep `kubectl logs` and `exec` on the app.
            let first_app = app_containers[0].get("name").and_then(Value::as_str);
            if let (Some(app), false) = (first_app, annotated(ANNOTATION_DEFAULT_CONTAINER)) {
                status.annotations.push(ANNOTATION_DEFAULT_CONTAINER.to_string());
                extra_annotations.push((ANNOTATION_DEFAULT_CONTAINER, app.to_string()));
            }
        }
    }
    if volumes.is_none() {
        patch.push(Op::Add { path: "/spec/volumes".into(), value: json!([containers::token_volume(cfg)]) });
    } else {
        patch.push(Op::Add { path: "/spec/volumes/-".into(), value: containers::token_volume(cfg) });
    }
    let status_json = serde_json::to_string(&status).map_err(|e| PatchError::Apply(e.to_string()))?;
    let mut entries = vec![(ANNOTATION_INJECTED, VERSION.to_string()), (ANNOTATION_STATUS, status_json)];
    entries.extend(extra_annotations);
    annotation_ops(pod, &entries, &mut patch)?;
    Ok(Outcome::Injected { patch, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})
    }

    fn injected(pod: &Value, cfg: &InjectConfig) -> Value {
        let outcome = inject(pod, Some("default"), cfg).expect("inject");
        let mut out = pod.clone();
        apply(&mut out, outcome.patch()).expect("patch applies");
        out
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect()
    }

    #[test]
    fn a_bare_pod_gets_every_missing_parent_created() {
        let p = json!({"spec": {"containers": [{"name": "app", "image": "a"}]}});
        let out = injected(&p, &InjectConfig::default());
        assert_eq!(names(&out["spec"]["initContainers"]), [INIT_CONTAINER, PROXY_CONTAINER]);
        assert_eq!(names(&out["spec"]["volumes"]), [TOKEN_VOLUME]);
        assert_eq!(out["metadata"]["annotations"][ANNOTATION_INJECTED], VERSION);
        let status: Status =
            serde_json::from_str(out["metadata"]["annotations"][ANNOTATION_STATUS].as_str().expect("status"))
                .expect("status json");
        assert_eq!(status.created, ["/metadata", "/metadata/annotations", "/spec/initContainers", "/spec/volumes"]);
    }

    #[test]
    fn native_mode_puts_init_then_proxy_before_the_pods_init_containers() {
        let p = pod(json!({
            "initContainers": [{"name": "migrate", "image": "m"}],
            "containers": [{"name": "app", "image": "a"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }));
        let out = injected(&p, &InjectConfig::default());
        assert_eq!(names(&out["spec"]["initContainers"]), [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
        assert_eq!(names(&out["spec"]["containers"]), ["app"]);
        assert_eq!(names(&out["spec"]["volumes"]), ["data", TOKEN_VOLUME]);
    }

    #[test]
    fn legacy_mode_puts_the_proxy_first_and_init_last() {
        let cfg = InjectConfig { sidecar_mode: SidecarMode::Legacy, ..InjectConfig::default() };
        let p = pod(json!({
            "initContainers": [{"name": "migrate", "image": "m"}],
            "containers": [{"name": "app", "image": "a"}, {"name": "b", "image": "b"}],
        }));
        let out = injected(&p, &cfg);
        assert_eq!(names(&out["spec"]["initContainers"]), ["migrate", INIT_CONTAINER]);
        assert_eq!(names(&out["spec"]["containers"]), [PROXY_CONTAINER, "app", "b"]);
        assert_eq!(out["metadata"]["annotations"][ANNOTATION_DEFAULT_CONTAINER], "app");
    }

    #[test]
    fn annotation_keys_are_escaped() {
        assert_eq!(escape("neutrino.io/status"), "neutrino.io~1status");
        assert_eq!(escape("a~b/c"), "a~0b~1c");
        let p = json!({"metadata": {"annotations": {"x": "y"}}, "spec": {"containers": [{"name": "app"}]}});
        let outcome = inject(&p, None, &InjectConfig::default()).expect("inject");
        let paths: Vec<String> = outcome
            .patch()
            .iter()
            .map(|op| match op {
                Op::Add { path, .. } | Op::Remove { path } => path.clone(),
            })
            .collect();
        assert!(paths.contains(&"/metadata/annotations/neutrino.io~1injected".to_string()), "{paths:?}");
    }

    #[test]
    fn injecting_twice_gives_an_empty_patch() {
        let p = pod(json!({"containers": [{"name": "app"}]}));
        let once = injected(&p, &InjectConfig::default());
        assert_eq!(inject(&once, None, &InjectConfig::default()), Ok(Outcome::AlreadyInjected));
        let by_name = pod(json!({"containers": [{"name": "app"}, {"name": PROXY_CONTAINER}]}));
        assert_eq!(inject(&by_name, None, &InjectConfig::default()), Ok(Outcome::AlreadyInjected));
    }

    #[test]
    fn skips_carry_their_reason_once() {
        let cfg = InjectConfig::default();
        let host = pod(json!({"hostNetwork": true, "containers": [{"name": "app"}]}));
        let Outcome::Skipped { reason, patch } = inject(&host, None, &cfg).expect("skip") else {
            panic!("not skipped")
        };
        assert_eq!(reason, SkipReason::HostNetwork);
        let mut out = host.clone();
        apply(&mut out, &patch).expect("apply");
        assert_eq!(out["metadata"]["annotations"][ANNOTATION_SKIPPED], "host-network");
        assert!(inject(&out, None, &cfg).expect("again").patch().is_empty());

        let mut off = pod(json!({"containers": [{"name": "app"}]}));
        off["metadata"]["labels"] = json!({LABEL_INJECT: "disabled"});
        assert!(matches!(inject(&off, None, &cfg), Ok(Outcome::Skipped { reason: SkipReason::Disabled { .. }, .. })));
        let mine = pod(json!({"containers": [{"name": "app"}]}));
        let skipped = inject(&mine, Some("neutrino-system"), &cfg).expect("skip");
        assert!(matches!(skipped, Outcome::Skipped { reason: SkipReason::SystemNamespace { .. }, .. }));
        assert!(matches!(inject(&mine, Some("default"), &cfg), Ok(Outcome::Injected { .. })));
    }

    #[test]
    fn bad_pods_and_annotations_are_errors() {
        let cfg = InjectConfig::default();
        assert!(matches!(inject(&json!([]), None, &cfg), Err(PatchError::NotAPod { .. })));
        assert!(matches!(inject(&pod(json!({"containers": []})), None, &cfg), Err(PatchError::NotAPod { .. })));
        let e = inject(&pod(json!({"containers": [{"name": "a"}], "volumes": {}})), None, &cfg).expect_err("volumes");
        assert_eq!(e.to_string(), "injecting: spec.volumes is a map, expected a list; fix the manifest");
        let taken = pod(json!({"containers": [{"name": "a"}], "volumes": [{"name": TOKEN_VOLUME}]}));
        assert!(matches!(inject(&taken, None, &cfg), Err(PatchError::NameTaken { .. })));
        let mut bad = pod(json!({"containers": [{"name": "a"}]}));
        bad["metadata"]["annotations"] = json!({overrides::SKIP_INBOUND_PORTS: "http"});
        let e = inject(&bad, None, &cfg).expect_err("annotation");
        assert!(e.to_string().contains("config.neutrino.io/skip-inbound-ports"), "{e}");
    }
}
