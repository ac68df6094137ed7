//! Step 5, uninject: the exact reverse of [`crate::patch::inject`], read from the
//! `neutrino.io/status` annotation the patch wrote: the containers, volumes and
//! annotations it names are removed, then the maps and lists it created, if now empty.
//!
//! A skipped pod loses its `neutrino.io/inject-skipped` annotation, and the annotations
//! map (and then `metadata`) if that leaves it empty: the skip patch records nothing else,
//! so a pod that had an empty `annotations: {}` before comes back without it (the same
//! pod to Kubernetes).
//!
//! This module must not touch anything the status does not name (except that skip
//! annotation); it works on a pod value in place, for `neutrino uninject`.

use serde_json::Value;
use thiserror::Error;

use crate::patch::Status;
use crate::{ANNOTATION_SKIPPED, ANNOTATION_STATUS};

/// What uninject did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uninjected {
    /// The injection described by this status was removed.
    Removed(Status),
    /// Only the skip annotation was removed.
    SkipAnnotationRemoved,
    /// The pod was never injected or skipped: unchanged.
    NotInjected,
}

#[derive(Debug, Error)]
pub enum UninjectError {
    #[error(
        "uninjecting: the {ANNOTATION_STATUS} annotation is not the injector's status ({0}); remove the neutrino \
         containers, volume and annotations by hand"
    )]
    BadStatus(String),
}

fn remove_named(list: &mut Value, names: &[String]) {
    if let Some(items) = list.as_array_mut() {
        items.retain(|c| !c.get("name").and_then(Value::as_str).is_some_and(|n| names.iter().any(|x| x == n)));
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Removes the member a JSON pointer names if it is an empty map or list.
fn remove_if_empty(doc: &mut Value, pointer: &str) {
    let Some((parent, key)) = pointer.rsplit_once('/') else { return };
    let key = key.replace("~1", "/").replace("~0", "~");
    let parent = if parent.is_empty() { Some(&mut *doc) } else { doc.pointer_mut(parent) };
    if let Some(Value::Object(map)) = parent
        && map.get(&key).is_some_and(is_empty)
    {
        map.remove(&key);
    }
}

fn annotations_mut(pod: &mut Value) -> Option<&mut serde_json::Map<String, Value>> {
    pod.get_mut("metadata")?.get_mut("annotations")?.as_object_mut()
}

/// Reverses an injection (or a skip annotation) on one pod or pod template, in place.
pub fn uninject(pod: &mut Value) -> Result<Uninjected, UninjectError> {
    let annotations = &pod["metadata"]["annotations"];
    let Some(status) = annotations.get(ANNOTATION_STATUS) else {
        if annotations.get(ANNOTATION_SKIPPED).is_none() {
            return Ok(Uninjected::NotInjected);
        }
        if let Some(map) = annotations_mut(pod) {
            map.remove(ANNOTATION_SKIPPED);
        }
        remove_if_empty(pod, "/metadata/annotations");
        remove_if_empty(pod, "/metadata");
        return Ok(Uninjected::SkipAnnotationRemoved);
    };
    let text = status.as_str().ok_or_else(|| UninjectError::BadStatus("not a string".into()))?;
    let status: Status = serde_json::from_str(text).map_err(|e| UninjectError::BadStatus(e.to_string()))?;
    if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
        for (key, names) in [
            ("initContainers", &status.init_containers),
            ("containers", &status.containers),
            ("volumes", &status.volumes),
        ] {
            if let Some(list) = spec.get_mut(key) {
                remove_named(list, names);
            }
        }
    }
    if let Some(map) = annotations_mut(pod) {
        for key in &status.annotations {
            map.remove(key);
        }
    }
    let mut created = status.created.clone();
    created.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for pointer in &created {
        remove_if_empty(pod, pointer);
    }
    Ok(Uninjected::Removed(status))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{InjectConfig, SidecarMode};
    use crate::patch::{apply, inject};

    fn round_trip(pod: Value, cfg: &InjectConfig) {
        let mut out = pod.clone();
        let outcome = inject(&pod, None, cfg).expect("inject");
        apply(&mut out, outcome.patch()).expect("apply");
        assert_ne!(out, pod, "nothing injected");
        uninject(&mut out).expect("uninject");
        assert_eq!(out, pod);
    }

    #[test]
    fn uninject_reverses_inject_exactly() {
        let legacy = InjectConfig { sidecar_mode: SidecarMode::Legacy, ..InjectConfig::default() };
        let traced = InjectConfig { otlp_endpoint: Some("http://jaeger:4317".into()), ..InjectConfig::default() };
        for cfg in [InjectConfig::default(), legacy, traced] {
            round_trip(json!({"spec": {"containers": [{"name": "a"}]}}), &cfg);
            round_trip(
                json!({
                    "metadata": {"name": "p", "annotations": {}, "labels": {"x": "y"}},
                    "spec": {
                        "initContainers": [{"name": "i"}],
                        "containers": [{"name": "a"}, {"name": "b"}],
                        "volumes": [{"name": "v", "emptyDir": {}}],
                    },
                }),
                &cfg,
            );
            round_trip(json!({"metadata": {}, "spec": {"containers": [{"name": "a"}], "initContainers": []}}), &cfg);
            round_trip(
                json!({
                    "metadata": {"annotations": {"config.neutrino.io/otlp-endpoint": "https://otel:4317"}},
                    "spec": {"containers": [{"name": "a"}]},
                }),
                &cfg,
            );
        }
    }

    #[test]
    fn a_skipped_pod_loses_only_the_skip_annotation() {
        let pod = json!({"spec": {"hostNetwork": true, "containers": [{"name": "a"}]}});
        round_trip(pod, &InjectConfig::default());
        let mut kept = json!({"metadata": {"annotations": {"k": "v", ANNOTATION_SKIPPED: "host-network"}}});
        assert_eq!(uninject(&mut kept).expect("uninject"), Uninjected::SkipAnnotationRemoved);
        assert_eq!(kept, json!({"metadata": {"annotations": {"k": "v"}}}));
    }

    #[test]
    fn untouched_pods_stay_untouched_and_bad_status_is_an_error() {
        let mut pod = json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(uninject(&mut pod).expect("uninject"), Uninjected::NotInjected);
        assert_eq!(pod, json!({"spec": {"containers": [{"name": "a"}]}}));
        let mut bad = json!({"metadata": {"annotations": {ANNOTATION_STATUS: "{"}}, "spec": {}});
        assert!(uninject(&mut bad).expect_err("bad status").to_string().contains("by hand"));
    }
}
