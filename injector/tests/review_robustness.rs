//! `review` never panics: every truncation of the shared AdmissionReview bodies, and
//! their pods with each field of `metadata` and `spec` (and each container's fields)
//! replaced by every JSON type, are answered (a 400-style error, a denial or a patch
//! that applies).

mod common;

use base64::Engine;
use neutrino_injector::config::{InjectConfig, SidecarMode};
use neutrino_injector::review;
use serde_json::{Value, json};

use common::{read, shared_files};

fn wrong_types() -> [Value; 6] {
    [json!(null), json!(7), json!("x"), json!(true), json!([1, {"name": 2}]), json!({"a": {}})]
}

/// Reviews a body; when a patch comes back, it must apply to the review's pod.
fn answered(body: &[u8], cfg: &InjectConfig) {
    let Ok(answer) = review::review(body, cfg) else { return };
    let response = &answer.body["response"];
    assert!(response["uid"].is_string());
    let Some(b64) = response["patch"].as_str() else { return };
    let patch = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("patch json");
    let request: Value = serde_json::from_slice(body).expect("it parsed once");
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| panic!("{e}: {patch:?} on {pod}"));
}

#[test]
fn truncated_bodies_never_panic() {
    let cfg = InjectConfig::default();
    for path in shared_files("admission") {
        let body = read(&path).into_bytes();
        for end in (0..body.len()).step_by(7) {
            if body[..end].trim_ascii_end() == body.trim_ascii_end() {
                continue; // only trailing whitespace cut
            }
            assert!(review::review(&body[..end], &cfg).is_err(), "{} cut at {end} was accepted", path.display());
        }
    }
}

#[test]
fn every_field_of_every_wrong_type_is_answered() {
    let legacy = InjectConfig { sidecar_mode: SidecarMode::Legacy, ..InjectConfig::default() };
    let mut cases = 0;
    for cfg in [InjectConfig::default(), legacy] {
        for path in shared_files("admission") {
            let original: Value = serde_json::from_str(&read(&path)).expect("json");
            let object = &original["request"]["object"];
            let mut pointers: Vec<String> = vec!["/request/object".into(), "/request/uid".into()];
            for part in ["metadata", "spec"] {
                for key in object[part].as_object().into_iter().flatten().map(|(k, _)| k) {
                    pointers.push(format!("/request/object/{part}/{key}"));
                }
            }
            for key in object["spec"]["containers"][0].as_object().into_iter().flatten().map(|(k, _)| k) {
                pointers.push(format!("/request/object/spec/containers/0/{key}"));
            }
            for pointer in pointers {
                for wrong in wrong_types() {
                    let mut doc = original.clone();
                    if let Some(slot) = doc.pointer_mut(&pointer) {
                        *slot = wrong;
                    }
                    answered(&serde_json::to_vec(&doc).expect("json"), &cfg);
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 500, "{cases}");
}
