//! Step 7, the review: an AdmissionReview (`admission.k8s.io/v1`) request body in, the
//! AdmissionReview response out. A pure function: [`review`].
//!
//! Only Pod CREATE is mutated; any other resource, subresource or operation is allowed
//! with no patch. The response echoes the request's `uid` and carries the patch
//! base64-encoded with `patchType: JSONPatch`. A skipped pod is allowed with a patch
//! recording the reason (`neutrino.io/inject-skipped`) and a `warnings` entry saying
//! why (what an API client sees: kubectl prints it), and the answer carries the
//! [`Event`] to record (`NeutrinoInjectionSkipped`); a denied pod's answer carries a
//! `NeutrinoInjectionDenied` one. Recording it is the server's job, never waited for
//! here. A dry run (`request.dryRun: true`) gets the same response but no Event: the
//! webhook declares `sideEffects: NoneOnDryRun`.
//!
//! Failures: a body that is not an AdmissionReview v1 with a request and a uid is a
//! [`ReviewError`] (the server answers HTTP 400 with its message), since there is no uid
//! to answer to. Once the uid is known, a bad pod or a bad `config.neutrino.io/*`
//! annotation is answered `allowed: false` with a status message naming the problem: the
//! pod is denied, as Istio denies bad injection annotations, so a typo never starts a pod
//! with a proxy configured other than as asked.
//!
//! This module must do no IO and never panic on any input.

use base64::Engine;
use serde_json::{Value, json};
use thiserror::Error;

use crate::config::InjectConfig;
use crate::event::Event;
use crate::patch::{self, Outcome};

pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Why a body could not be answered with an AdmissionReview.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReviewError {
    #[error("reading the AdmissionReview: the body is not JSON: {0}")]
    NotJson(String),
    #[error("reading the AdmissionReview: the body is {0}, not a JSON object")]
    NotAnObject(&'static str),
    #[error(
        "reading the AdmissionReview: apiVersion is {0:?}, expected \"admission.k8s.io/v1\"; list v1 in the \
         webhook's admissionReviewVersions"
    )]
    ApiVersion(String),
    #[error("reading the AdmissionReview: kind is {0:?}, expected \"AdmissionReview\"")]
    Kind(String),
    #[error("reading the AdmissionReview: it has no request (a webhook is sent requests, never responses)")]
    NoRequest,
    #[error("reading the AdmissionReview: request.uid is missing or not a non-empty string")]
    NoUid,
}

/// What was decided, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not a Pod CREATE: allowed, no patch.
    Ignored,
    Injected,
    Skipped(String),
    AlreadyInjected,
    Denied(String),
}

/// The answer: the AdmissionReview to send back with HTTP 200, the decision, and the
/// Event to record about it, if any (never a reason to delay the answer).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub uid: String,
    pub decision: Decision,
    pub body: Value,
    pub event: Option<Event>,
}

fn respond(uid: &str, response: Value) -> Value {
    let mut response = response;
    response["uid"] = json!(uid);
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response})
}

fn deny(uid: &str, message: String) -> Answer {
    let body = respond(
        uid,
        json!({
            "allowed": false,
            "status": {"status": "Failure", "message": message, "reason": "BadRequest", "code": 400},
        }),
    );
    Answer { uid: uid.to_string(), decision: Decision::Denied(message), body, event: None }
}

/// Is this request about a Pod itself (not a subresource such as `pods/exec`)?
fn is_pod(request: &Value) -> bool {
    let kind = &request["kind"];
    let by_kind = kind["kind"] == "Pod" && kind["group"].as_str().unwrap_or_default().is_empty();
    let by_resource = request["resource"]["resource"] == "pods"
        && request["resource"]["group"].as_str().unwrap_or_default().is_empty();
    let sub = request["subResource"].as_str().unwrap_or_default();
    (if kind.is_object() { by_kind } else { by_resource }) && sub.is_empty()
}

/// Answers one AdmissionReview request body.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Answer, ReviewError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| ReviewError::NotJson(e.to_string()))?;
    if !doc.is_object() {
        return Err(ReviewError::NotAnObject(patch::json_type(&doc)));
    }
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    if api_version != API_VERSION {
        return Err(ReviewError::ApiVersion(api_version.to_string()));
    }
    let kind = doc["kind"].as_str().unwrap_or_default();
    if kind != "AdmissionReview" {
        return Err(ReviewError::Kind(kind.to_string()));
    }
    let request = match doc.get("request") {
        Some(r @ Value::Object(_)) => r,
        _ => return Err(ReviewError::NoRequest),
    };
    let uid = match request["uid"].as_str() {
        Some(u) if !u.is_empty() => u,
        _ => return Err(ReviewError::NoUid),
    };

    let allow = |decision: Decision| Answer {
        uid: uid.to_string(),
        decision,
        body: respond(uid, json!({"allowed": true})),
        event: None,
    };
    if !is_pod(request) || request["operation"] != "CREATE" {
        return Ok(allow(Decision::Ignored));
    }
    let pod = match request.get("object") {
        Some(p @ Value::Object(_)) => p,
        Some(other) => {
            return Ok(deny(uid, format!("request.object is {}, expected the Pod", patch::json_type(other))));
        }
        None => return Ok(deny(uid, "request.object is missing: a Pod CREATE carries the Pod".into())),
    };
    let namespace = request["namespace"].as_str().filter(|n| !n.is_empty());
    // Where an Event goes: the pod's namespace; none for a dry run (no side effects).
    let event_namespace = if request["dryRun"] == json!(true) {
        None
    } else {
        namespace.or_else(|| pod["metadata"]["namespace"].as_str().filter(|n| !n.is_empty()))
    };
    let outcome = match patch::inject(pod, namespace, cfg) {
        Ok(o) => o,
        Err(e) => {
            let mut answer = deny(uid, format!("neutrino sidecar injection: {e}"));
            if let (Some(ns), Decision::Denied(why)) = (event_namespace, &answer.decision) {
                answer.event = Some(Event::denied(pod, ns, why));
            }
            return Ok(answer);
        }
    };
    let (decision, warnings, event) = match &outcome {
        Outcome::Injected { .. } => (Decision::Injected, Vec::new(), None),
        Outcome::AlreadyInjected => (Decision::AlreadyInjected, Vec::new(), None),
        Outcome::Skipped { reason, .. } => (
            Decision::Skipped(reason.code().to_string()),
            vec![format!("neutrino: sidecar not injected: {reason}")],
            event_namespace.map(|ns| Event::skipped(pod, ns, reason)),
        ),
    };
    let mut response = json!({"allowed": true});
    let ops = outcome.patch();
    if !ops.is_empty() {
        let patch = match serde_json::to_vec(ops) {
            Ok(p) => p,
            Err(e) => return Ok(deny(uid, format!("neutrino sidecar injection: encoding the patch: {e}"))),
        };
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    Ok(Answer { uid: uid.to_string(), decision, body: respond(uid, response), event })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: Value) -> Vec<u8> {
        let mut r = json!({
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "object": {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}},
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            r[k] = v.clone();
        }
        serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": r})).expect("json")
    }

    fn decoded_patch(answer: &Answer) -> Value {
        let b64 = answer.body["response"]["patch"].as_str().expect("patch");
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
        serde_json::from_slice(&bytes).expect("patch json")
    }

    #[test]
    fn a_pod_create_gets_a_patch_and_the_uid_back() {
        let a = review(&request(json!({})), &InjectConfig::default()).expect("answer");
        assert_eq!(a.decision, Decision::Injected);
        assert_eq!(a.body["response"]["uid"], "u-1");
        assert_eq!(a.body["response"]["allowed"], true);
        assert_eq!(a.body["response"]["patchType"], "JSONPatch");
        assert_eq!(a.body["kind"], "AdmissionReview");
        assert!(decoded_patch(&a).as_array().is_some_and(|ops| !ops.is_empty()));
    }

    #[test]
    fn other_operations_and_resources_are_allowed_untouched() {
        let cfg = InjectConfig::default();
        for extra in [
            json!({"operation": "UPDATE"}),
            json!({"subResource": "status"}),
            json!({"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}}),
        ] {
            let a = review(&request(extra.clone()), &cfg).expect("answer");
            assert_eq!(a.decision, Decision::Ignored, "{extra}");
            assert_eq!(a.body["response"], json!({"uid": "u-1", "allowed": true}));
        }
    }

    #[test]
    fn skips_warn_and_bad_pods_are_denied_with_the_reason() {
        let cfg = InjectConfig::default();
        let host = json!({"object": {"spec": {"hostNetwork": true, "containers": [{"name": "a"}]}}});
        let a = review(&request(host), &cfg).expect("answer");
        assert_eq!(a.decision, Decision::Skipped("host-network".into()));
        assert!(a.body["response"]["warnings"][0].as_str().is_some_and(|w| w.contains("hostNetwork")));
        let bad = json!({"object": {"metadata": {"annotations": {"config.neutrino.io/proxy-cpu-limit": "x"}},
                                    "spec": {"containers": [{"name": "a"}]}}});
        let a = review(&request(bad), &cfg).expect("answer");
        assert_eq!(a.body["response"]["allowed"], false);
        let message = a.body["response"]["status"]["message"].as_str().expect("message");
        assert!(message.contains("config.neutrino.io/proxy-cpu-limit"), "{message}");
        let a = review(&request(json!({"object": null})), &cfg).expect("answer");
        assert_eq!(a.body["response"]["allowed"], false);
    }

    #[test]
    fn skips_and_denials_carry_their_event_and_dry_runs_none() {
        use crate::event::{EventType, REASON_DENIED, REASON_SKIPPED};
        let cfg = InjectConfig::default();
        let host = json!({"object": {"metadata": {"name": "h"}, "spec": {"hostNetwork": true, "containers": [{"name": "a"}]}}});
        let e = review(&request(host.clone()), &cfg).expect("answer").event.expect("an event");
        assert_eq!((e.reason, e.type_, e.namespace.as_str()), (REASON_SKIPPED, EventType::Normal, "default"));
        assert_eq!((e.regarding.kind.as_str(), e.regarding.name.as_deref()), ("Pod", Some("h")));
        assert!(e.note.contains("pod h (host-network)"), "{}", e.note);

        let mut dry = host.clone();
        dry["dryRun"] = json!(true);
        let a = review(&request(dry), &cfg).expect("answer");
        assert_eq!((a.decision, a.event), (Decision::Skipped("host-network".into()), None));

        let bad = json!({"object": {"metadata": {"name": "b", "annotations": {"config.neutrino.io/log-level": "loud"}},
                                    "spec": {"containers": [{"name": "a"}]}}});
        let a = review(&request(bad), &cfg).expect("answer");
        let e = a.event.expect("an event");
        assert_eq!((e.reason, e.type_), (REASON_DENIED, EventType::Warning));
        let Decision::Denied(why) = a.decision else { panic!("not denied") };
        assert_eq!(e.note, format!("pod b denied: {why}"));
        assert!(e.note.contains("config.neutrino.io/log-level"), "{}", e.note);

        let mut no_ns = host;
        no_ns["namespace"] = json!("");
        assert_eq!(review(&request(no_ns), &cfg).expect("answer").event, None, "nowhere to record it");
        for quiet in [json!({}), json!({"operation": "UPDATE"}), json!({"object": null})] {
            assert_eq!(review(&request(quiet.clone()), &cfg).expect("answer").event, None, "{quiet}");
        }
    }

    #[test]
    fn bodies_that_are_not_reviews_are_errors() {
        let cfg = InjectConfig::default();
        let e = |b: &[u8]| review(b, &cfg).expect_err("error");
        assert!(matches!(e(b"{\"apiVersion\":"), ReviewError::NotJson(_)));
        assert_eq!(e(b"[]"), ReviewError::NotAnObject("a list"));
        assert!(matches!(
            e(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#),
            ReviewError::ApiVersion(_)
        ));
        assert!(matches!(e(br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#), ReviewError::Kind(_)));
        assert_eq!(e(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#), ReviewError::NoRequest);
        let no_uid = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":""}}"#;
        assert_eq!(e(no_uid), ReviewError::NoUid);
    }
}
