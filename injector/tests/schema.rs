//! Every patched pod validates against the Kubernetes v1.35 `io.k8s.api.core.v1.Pod`
//! schema (`../shared/testdata/openapi/kubernetes-v1.35-api__v1_openapi.json`), made
//! strict the way `kubectl-validate` is: unknown fields are errors (`additionalProperties:
//! false` on every object schema that lists its properties). Nulls are dropped first, as
//! the API server treats them as unset (`creationTimestamp: null` in admission bodies).
//! Beyond the schema, the checks the API server makes that a schema cannot express and an
//! injector could break: unique container and volume names, mounts of existing volumes,
//! port names of at most 15 characters, `restartPolicy` only on init containers.

mod common;

use std::collections::HashSet;
use std::sync::OnceLock;

use base64::Engine;
use neutrino_injector::config::{InjectConfig, SidecarMode};
use neutrino_injector::{manifest, review};
use serde_json::{Value, json};

use common::{pods, read, shared, shared_files};

fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), json!(false));
            }
            map.values_mut().for_each(strict);
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

fn validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let path = shared("openapi/kubernetes-v1.35-api__v1_openapi.json");
        let doc: Value = serde_json::from_str(&read(&path)).expect("openapi json");
        let mut components = doc["components"].clone();
        strict(&mut components);
        let schema = json!({"$ref": "#/components/schemas/io.k8s.api.core.v1.Pod", "components": components});
        jsonschema::draft4::options().build(&schema).expect("Pod schema compiles")
    })
}

fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Schema errors and API-server checks for one pod; empty when valid.
fn problems(pod: &Value) -> Vec<String> {
    problems_with(pod, &[])
}

/// Like [`problems`], where `claims` are volumes a StatefulSet's volumeClaimTemplates add.
fn problems_with(pod: &Value, claims: &[&str]) -> Vec<String> {
    let mut pod = pod.clone();
    drop_nulls(&mut pod);
    let mut out: Vec<String> =
        validator().iter_errors(&pod).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    let spec = &pod["spec"];
    let all = || ["initContainers", "containers"].into_iter().flat_map(|k| spec[k].as_array().into_iter().flatten());
    let mut seen = HashSet::new();
    for c in all() {
        let name = c["name"].as_str().unwrap_or_default();
        if !seen.insert(name) {
            out.push(format!("duplicate container name {name}"));
        }
    }
    let mut volumes: HashSet<&str> = common::names(&spec["volumes"]).into_iter().collect();
    if volumes.len() != spec["volumes"].as_array().map_or(0, Vec::len) {
        out.push("duplicate volume name".into());
    }
    volumes.extend(claims);
    for c in all() {
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or_default();
            if !volumes.contains(name) {
                out.push(format!("container {} mounts missing volume {name}", c["name"]));
            }
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if p["name"].as_str().is_some_and(|n| n.len() > 15) {
                out.push(format!("port name {} longer than 15", p["name"]));
            }
        }
    }
    for c in spec["containers"].as_array().into_iter().flatten() {
        if c.get("restartPolicy").is_some() {
            out.push(format!("container {} has restartPolicy (only init containers may)", c["name"]));
        }
    }
    out
}

/// A template as the Pod it becomes.
fn as_pod(template: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": template["metadata"], "spec": template["spec"]})
}

#[test]
fn every_patched_manifest_pod_validates() {
    let legacy = InjectConfig { sidecar_mode: SidecarMode::Legacy, ..InjectConfig::default() };
    let mut checked = 0;
    let mtls_legacy = InjectConfig { sidecar_mode: SidecarMode::Legacy, ..common::mtls() };
    for cfg in [InjectConfig::default(), legacy, common::mtls(), mtls_legacy] {
        for path in shared_files("k8s") {
            let (out, _) = manifest::inject_stream(&read(&path), &cfg).expect("injects");
            for (_, doc) in manifest::read_documents(&out).expect("parses") {
                let claims: Vec<&str> = doc["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["metadata"]["name"].as_str())
                    .collect();
                for template in pods(&doc) {
                    let p = problems_with(&as_pod(template), &claims);
                    assert!(p.is_empty(), "{} ({:?}): {p:#?}", path.display(), cfg.sidecar_mode);
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 88, "22 pod templates, two modes, with and without trust anchors");
}

#[test]
fn every_patched_admission_pod_validates() {
    let mut checked = 0;
    for path in shared_files("admission") {
        let answer = review::review(read(&path).as_bytes(), &InjectConfig::default()).expect("a review");
        let Some(b64) = answer.body["response"]["patch"].as_str() else { continue };
        let patch = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON patch");
        let request: Value = serde_json::from_str(&read(&path)).expect("json");
        let mut pod = request["request"]["object"].clone();
        assert!(problems(&pod).is_empty(), "{}: the original is valid: {:#?}", path.display(), problems(&pod));
        json_patch::patch(&mut pod, &patch).expect("the patch applies");
        let p = problems(&pod);
        assert!(p.is_empty(), "{}: {p:#?}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 3, "the three Pod CREATE reviews");
}

#[test]
fn the_validation_catches_what_it_should() {
    let good = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                      "spec": {"containers": [{"name": "a", "image": "i"}]}});
    assert!(problems(&good).is_empty(), "{:?}", problems(&good));
    let mut unknown = good.clone();
    unknown["spec"]["containers"][0]["imagePolicy"] = json!("x");
    assert!(!problems(&unknown).is_empty(), "unknown field passed");
    let mut wrong_type = good.clone();
    wrong_type["spec"]["containers"][0]["ports"] = json!([{"containerPort": "80"}]);
    assert!(!problems(&wrong_type).is_empty(), "string port passed");
    let mut no_name = good.clone();
    no_name["spec"]["containers"][0] = json!({"image": "i"});
    assert!(!problems(&no_name).is_empty(), "nameless container passed");
    let mut dup = good.clone();
    dup["spec"]["initContainers"] = json!([{"name": "a", "image": "i"}]);
    assert!(!problems(&dup).is_empty(), "duplicate name passed");
}
