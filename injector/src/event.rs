//! Step 7b, events: the Kubernetes Event a review asks to record, as data. A pod that is
//! skipped (host network, disabled by label, the mesh's own namespace) gets a `Normal`
//! `NeutrinoInjectionSkipped`; a pod the injector denies (a bad `config.neutrino.io/*`
//! annotation, a name it would add already taken, a malformed pod) a `Warning`
//! `NeutrinoInjectionDenied`. [`crate::review::review`] returns it in its answer; the
//! server's recorder (`recorder`, feature `server`) sends it off the admission path.
//!
//! The object the Event is about. At CREATE the API server has not yet given the pod a
//! uid, and pods made by controllers have only a `generateName` (the name comes after
//! admission). `kubectl describe` finds events by name and uid, so:
//!
//! - `regarding` is the pod's controlling owner from `metadata.ownerReferences` (the one
//!   with `controller: true`, else the first) when it has one: its uid is known, so
//!   `kubectl describe replicaset/daemonset/statefulset/job ...` shows the event;
//!   `related` is then the pod, when it has a name;
//! - otherwise `regarding` is the pod itself (kind Pod, its namespace and name, no uid),
//!   listed by `kubectl get events` and `kubectl events --for pod/NAME`.
//!
//! The note always names the pod (its name, or its `generateName` followed by `*`).
//! The Event is `events.k8s.io/v1` (the API `kubectl events` reads; core/v1 shows the same
//! objects), one per decision: no series aggregation, so the RBAC is `create` only.
//!
//! This module must do no IO: the clock reading and the reporting instance are arguments.

use serde_json::{Map, Value, json};

use crate::patch::SkipReason;

/// `reason` of the Event for a skipped pod (type Normal).
pub const REASON_SKIPPED: &str = "NeutrinoInjectionSkipped";
/// `reason` of the Event for a denied pod (type Warning).
pub const REASON_DENIED: &str = "NeutrinoInjectionDenied";
/// `reportingController` of every Event the injector records.
pub const REPORTING_CONTROLLER: &str = "neutrino.io/injector";
/// `action`: what was attempted on the object.
pub const ACTION: &str = "InjectSidecar";
/// The API server's limit on `note` (bytes).
pub const NOTE_LIMIT: usize = 1024;
/// The API server's limit on `reportingInstance` (characters).
pub const INSTANCE_LIMIT: usize = 128;

/// `type` of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An object reference (core/v1 ObjectReference): what is known at admission time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: Option<String>,
    pub uid: Option<String>,
}

impl ObjectRef {
    fn to_json(&self) -> Value {
        let mut r = json!({"apiVersion": self.api_version, "kind": self.kind, "namespace": self.namespace});
        if let Some(name) = &self.name {
            r["name"] = json!(name);
        }
        if let Some(uid) = &self.uid {
            r["uid"] = json!(uid);
        }
        r
    }
}

/// One Event to record, in the namespace of the pod it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub namespace: String,
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
    pub regarding: ObjectRef,
    pub related: Option<ObjectRef>,
}

fn text<'a>(map: Option<&'a Map<String, Value>>, key: &str) -> Option<&'a str> {
    map.and_then(|m| m.get(key)).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// How the note names the pod: `pod NAME`, `pod PREFIX*` (generateName only), or `a pod`.
pub fn pod_label(pod: &Value) -> String {
    let metadata = pod.get("metadata").and_then(Value::as_object);
    match (text(metadata, "name"), text(metadata, "generateName")) {
        (Some(name), _) => format!("pod {name}"),
        (None, Some(prefix)) => format!("pod {prefix}*"),
        (None, None) => "a pod".to_string(),
    }
}

/// The pod's controlling owner (or its first owner), if it names kind and name.
fn owner(pod: &Value, namespace: &str) -> Option<ObjectRef> {
    let owners = pod.get("metadata")?.get("ownerReferences")?.as_array()?;
    let chosen = owners.iter().find(|o| o["controller"] == json!(true)).or_else(|| owners.first())?;
    let o = chosen.as_object();
    Some(ObjectRef {
        api_version: text(o, "apiVersion")?.to_string(),
        kind: text(o, "kind")?.to_string(),
        namespace: namespace.to_string(),
        name: Some(text(o, "name")?.to_string()),
        uid: text(o, "uid").map(str::to_string),
    })
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `...`.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl Event {
    fn about(pod: &Value, namespace: &str, type_: EventType, reason: &'static str, note: String) -> Event {
        let name = pod.get("metadata").and_then(Value::as_object).and_then(|m| text(Some(m), "name"));
        let the_pod = ObjectRef {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: namespace.to_string(),
            name: name.map(str::to_string),
            uid: None,
        };
        let (regarding, related) = match owner(pod, namespace) {
            Some(owner) => (owner, the_pod.name.is_some().then_some(the_pod)),
            None => (the_pod, None),
        };
        Event { namespace: namespace.to_string(), type_, reason, note: clip(&note, NOTE_LIMIT), regarding, related }
    }

    /// The Event for a pod that was admitted without the proxy.
    pub fn skipped(pod: &Value, namespace: &str, reason: &SkipReason) -> Event {
        let note = format!("neutrino: sidecar not injected into {} ({}): {reason}", pod_label(pod), reason.code());
        Event::about(pod, namespace, EventType::Normal, REASON_SKIPPED, note)
    }

    /// The Event for a pod the injector refused; `why` is the admission response's message.
    pub fn denied(pod: &Value, namespace: &str, why: &str) -> Event {
        let note = format!("{} denied: {why}", pod_label(pod));
        Event::about(pod, namespace, EventType::Warning, REASON_DENIED, note)
    }

    /// The Event's object name: the regarded object's name (or `neutrino-injector`) and a
    /// unique suffix, as client-go names them (`NAME.HEX`), kept a valid DNS subdomain.
    pub fn name(&self, suffix: &str) -> String {
        let base = self.regarding.name.as_deref().unwrap_or_default().to_ascii_lowercase();
        let base: String = base.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')).collect();
        let base = clip(&base, 200).trim_matches(['-', '.']).to_string();
        let base = if base.is_empty() { "neutrino-injector".to_string() } else { base };
        format!("{base}.{suffix}")
    }

    /// The `events.k8s.io/v1` Event object to create. `event_time` is a MicroTime
    /// (`2025-01-02T03:04:05.000006Z`), `suffix` makes the name unique (hex nanoseconds),
    /// `instance` is the injector's pod name.
    pub fn to_json(&self, instance: &str, event_time: &str, suffix: &str) -> Value {
        let instance = if instance.is_empty() { "neutrino-injector" } else { instance };
        let mut e = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": self.name(suffix),
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "neutrino-injector"},
            },
            "eventTime": event_time,
            "type": self.type_.as_str(),
            "reason": self.reason,
            "action": ACTION,
            "note": self.note,
            "regarding": self.regarding.to_json(),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": clip(instance, INSTANCE_LIMIT),
        });
        if let Some(related) = &self.related {
            e["related"] = related.to_json();
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica_set_pod() -> Value {
        json!({"metadata": {"generateName": "web-7d9f-", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "not-the-controller", "uid": "u0"},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "u-rs", "controller": true},
        ]}, "spec": {"hostNetwork": true, "containers": [{"name": "app"}]}})
    }

    #[test]
    fn an_owned_pod_is_recorded_on_its_controller_with_its_uid() {
        let e = Event::skipped(&replica_set_pod(), "shop", &SkipReason::HostNetwork);
        assert_eq!((e.type_, e.reason, e.namespace.as_str()), (EventType::Normal, REASON_SKIPPED, "shop"));
        assert_eq!(
            e.regarding,
            ObjectRef {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                namespace: "shop".into(),
                name: Some("web-7d9f".into()),
                uid: Some("u-rs".into()),
            }
        );
        assert_eq!(e.related, None, "the pod has no name yet");
        assert_eq!(
            e.note,
            "neutrino: sidecar not injected into pod web-7d9f-* (host-network): the pod uses hostNetwork: its nat \
             rules would capture the whole node's traffic"
        );
        let mut named = replica_set_pod();
        named["metadata"]["name"] = json!("web-0");
        let e = Event::skipped(&named, "shop", &SkipReason::HostNetwork);
        assert_eq!(e.related.and_then(|r| r.name).as_deref(), Some("web-0"));
    }

    #[test]
    fn a_bare_pod_is_recorded_on_itself_without_a_uid() {
        let pod = json!({"metadata": {"name": "p", "uid": "ignored"}, "spec": {}});
        let e = Event::denied(&pod, "default", "neutrino sidecar injection: injecting: checking annotation x");
        assert_eq!((e.type_, e.reason), (EventType::Warning, REASON_DENIED));
        assert_eq!(
            e.regarding.to_json(),
            json!({"apiVersion": "v1", "kind": "Pod", "namespace": "default", "name": "p"})
        );
        assert_eq!(e.note, "pod p denied: neutrino sidecar injection: injecting: checking annotation x");
        let nameless = Event::skipped(&json!({"spec": {}}), "default", &SkipReason::HostNetwork);
        assert!(nameless.note.contains("into a pod (host-network)"), "{}", nameless.note);
        assert_eq!(nameless.regarding.name, None);
        assert_eq!(nameless.name("1a"), "neutrino-injector.1a");
    }

    #[test]
    fn the_object_is_a_valid_events_k8s_io_v1_event() {
        let e = Event::skipped(&replica_set_pod(), "shop", &SkipReason::Disabled { value: "false".into() });
        let json = e.to_json("neutrino-injector-5c7f-abcde", "2025-01-02T03:04:05.000006Z", "18f2a");
        assert_eq!(
            json,
            json!({
                "apiVersion": "events.k8s.io/v1",
                "kind": "Event",
                "metadata": {
                    "name": "web-7d9f.18f2a",
                    "namespace": "shop",
                    "labels": {"app.kubernetes.io/managed-by": "neutrino-injector"},
                },
                "eventTime": "2025-01-02T03:04:05.000006Z",
                "type": "Normal",
                "reason": "NeutrinoInjectionSkipped",
                "action": "InjectSidecar",
                "note": "neutrino: sidecar not injected into pod web-7d9f-* (disabled-by-label): the pod is labelled \
                         neutrino.io/inject=false",
                "regarding": {"apiVersion": "apps/v1", "kind": "ReplicaSet", "namespace": "shop",
                              "name": "web-7d9f", "uid": "u-rs"},
                "reportingController": "neutrino.io/injector",
                "reportingInstance": "neutrino-injector-5c7f-abcde",
            })
        );
    }

    #[test]
    fn long_notes_instances_and_odd_names_are_kept_within_the_api_limits() {
        let pod = json!({"metadata": {"name": "Web_1-"}});
        let e = Event::denied(&pod, "default", &"é".repeat(2000));
        assert!(e.note.len() <= NOTE_LIMIT && e.note.ends_with("..."), "{}", e.note.len());
        assert_eq!(e.name("ff"), "web1.ff");
        let json = e.to_json(&"x".repeat(300), "t", "ff");
        assert_eq!(json["reportingInstance"].as_str().map(str::len), Some(INSTANCE_LIMIT));
        assert_eq!(e.to_json("", "t", "ff")["reportingInstance"], "neutrino-injector");
    }
}
