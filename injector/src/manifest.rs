//! Step 6, manifests: the patch of [`crate::patch`] over the pod templates of workload
//! manifests in multi-document YAML, and [`crate::uninject`] back, for `neutrino inject`
//! and `neutrino uninject`.
//!
//! Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers and
//! Jobs (`spec.template`), CronJobs (`spec.jobTemplate.spec.template`) and `*List` kinds
//! (each of `items`) are handled; every other kind passes through unchanged. Output keeps
//! each document's key order (keys the patch adds come after, sorted); comments and empty
//! documents are dropped, as any YAML round trip does.
//!
//! This module must not read or write files (the CLI does) nor talk to a cluster.

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use thiserror::Error;

use crate::config::InjectConfig;
use crate::patch::{self, Outcome, PatchError, SkipReason};
use crate::uninject::{self, UninjectError, Uninjected};

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("reading YAML document {doc}: {source}; fix the YAML (multi-document streams are separated by ---)")]
    Yaml { doc: usize, source: serde_yaml_ng::Error },
    #[error("document {doc} ({object}): {source}")]
    Inject { doc: usize, object: String, source: PatchError },
    #[error("document {doc} ({object}): {source}")]
    Uninject { doc: usize, object: String, source: UninjectError },
    #[error("writing YAML document {doc}: {source}")]
    Write { doc: usize, source: serde_yaml_ng::Error },
}

/// What happened to one pod template, for the CLI to report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    Injected { object: String },
    Skipped { object: String, reason: SkipReason },
    AlreadyInjected { object: String },
    Uninjected { object: String },
}

/// The documents of a YAML stream, each with its original (ordered) form; empty
/// documents are dropped.
pub fn read_documents(text: &str) -> Result<Vec<(Yaml, Json)>, ManifestError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let yaml = Yaml::deserialize(de).map_err(|source| ManifestError::Yaml { doc, source })?;
        if yaml.is_null() {
            continue;
        }
        let json =
            serde_yaml_ng::from_value::<Json>(yaml.clone()).map_err(|source| ManifestError::Yaml { doc, source })?;
        out.push((yaml, json));
    }
    Ok(out)
}

/// Writes documents as one YAML stream, each in the key order of its original.
pub fn write_documents(docs: &[(Yaml, Json)]) -> Result<String, ManifestError> {
    let mut out = String::new();
    for (i, (original, doc)) in docs.iter().enumerate() {
        let text = serde_yaml_ng::to_string(&ordered(doc, Some(original)))
            .map_err(|source| ManifestError::Write { doc: i + 1, source })?;
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&quote_yaml11_words(&text));
    }
    Ok(out)
}

/// Words YAML 1.1 (and so Kubernetes' YAML parser) reads as booleans, which YAML 1.2
/// emitters such as serde_yaml_ng leave unquoted as plain strings. (`true` and `false`
/// strings the emitter quotes itself.)
const YAML11_WORDS: [&str; 16] =
    ["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"];

/// Quotes plain scalar values that YAML 1.1 would read as booleans (`value: no` becomes
/// `value: 'no'`), so a string stays a string for kubectl. Only whole values after `: `
/// or `- ` are touched, never keys, and never lines inside block scalars (`|`, `>`).
fn quote_yaml11_words(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    // Indentation of the line that opened a block scalar, while inside one.
    let mut block: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(open) = block {
            if line.trim().is_empty() || indent > open {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            block = None;
        }
        let trimmed = line.trim_end();
        let opens_block = ["|", "|-", "|+", ">", ">-", ">+"]
            .iter()
            .any(|m| trimmed.ends_with(&format!(": {m}")) || trimmed.ends_with(&format!("- {m}")) || trimmed == *m);
        if opens_block {
            block = Some(indent);
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let split = trimmed.rfind(": ").map(|i| i + 2).or_else(|| {
            let body = trimmed.trim_start();
            body.starts_with("- ").then(|| trimmed.len() - body.len() + 2)
        });
        match split {
            Some(at) if YAML11_WORDS.contains(&&trimmed[at..]) => {
                out.push_str(&trimmed[..at]);
                out.push('\'');
                out.push_str(&trimmed[at..]);
                out.push('\'');
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Keys first in new maps, in this order; the rest sorted.
const KEY_ORDER: [&str; 6] = ["apiVersion", "kind", "name", "image", "metadata", "spec"];

/// Converts to YAML, keeping the original's key order and list items (matched by `name`).
fn ordered(v: &Json, original: Option<&Yaml>) -> Yaml {
    match v {
        Json::Object(map) => {
            let original = original.and_then(Yaml::as_mapping);
            let mut out = serde_yaml_ng::Mapping::new();
            let mut keys: Vec<&String> = Vec::new();
            if let Some(o) = original {
                keys.extend(o.keys().filter_map(Yaml::as_str).filter_map(|k| map.get_key_value(k).map(|(k, _)| k)));
            }
            let mut rest: Vec<&String> = map.keys().filter(|k| !keys.contains(k)).collect();
            rest.sort_by_key(|k| (KEY_ORDER.iter().position(|o| o == k).unwrap_or(KEY_ORDER.len()), k.as_str()));
            keys.extend(rest);
            for k in keys {
                let before = original.and_then(|o| o.get(k.as_str()));
                out.insert(Yaml::String(k.clone()), ordered(&map[k], before));
            }
            Yaml::Mapping(out)
        }
        Json::Array(items) => {
            let original = original.and_then(Yaml::as_sequence);
            let name = |v: &Yaml| v.get("name").and_then(Yaml::as_str).map(str::to_string);
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let before = match item.get("name").and_then(Json::as_str) {
                    Some(n) => original.and_then(|o| o.iter().find(|x| name(x).as_deref() == Some(n))),
                    None => original.and_then(|o| o.get(i)),
                };
                out.push(ordered(item, before));
            }
            Yaml::Sequence(out)
        }
        // Scalars: the original's own form when unchanged (keeps 0.15 as written, etc.).
        other => match original {
            Some(o) if serde_yaml_ng::from_value::<Json>(o.clone()).ok().as_ref() == Some(other) => o.clone(),
            _ => serde_yaml_ng::to_value(other).unwrap_or(Yaml::Null),
        },
    }
}

fn describe(doc: &Json) -> String {
    let kind = doc["kind"].as_str().unwrap_or("object");
    match doc["metadata"]["name"].as_str().or(doc["metadata"]["generateName"].as_str()) {
        Some(name) => format!("{kind} {name}"),
        None => kind.to_string(),
    }
}

/// A visitor of pod templates: the pod, a description of its object, its namespace.
type PodFn<'a> = dyn FnMut(&mut Json, &str, Option<&str>) -> Result<(), ManifestError> + 'a;

/// Calls `f` on each pod (template) in a document, with where it lives and its namespace.
fn each_pod(doc: &mut Json, f: &mut PodFn<'_>) -> Result<(), ManifestError> {
    let object = describe(doc);
    let namespace = doc["metadata"]["namespace"].as_str().map(str::to_string);
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let pointer = match kind.as_str() {
        "Pod" => "",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "ReplicationController" | "Job" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        k if k.ends_with("List") => {
            if let Some(items) = doc.get_mut("items").and_then(Json::as_array_mut) {
                for item in items {
                    each_pod(item, f)?;
                }
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    match doc.pointer_mut(pointer) {
        Some(pod) if pod.is_object() => f(pod, &object, namespace.as_deref()),
        _ => Ok(()),
    }
}

/// Injects every pod template of one document in place.
pub fn inject_document(doc: &mut Json, index: usize, cfg: &InjectConfig) -> Result<Vec<Note>, ManifestError> {
    let mut notes = Vec::new();
    each_pod(doc, &mut |pod, object, namespace| {
        let err = |source| ManifestError::Inject { doc: index, object: object.to_string(), source };
        let outcome = patch::inject(pod, namespace, cfg).map_err(err)?;
        patch::apply(pod, outcome.patch()).map_err(err)?;
        let object = object.to_string();
        notes.push(match outcome {
            Outcome::Injected { .. } => Note::Injected { object },
            Outcome::Skipped { reason, .. } => Note::Skipped { object, reason },
            Outcome::AlreadyInjected => Note::AlreadyInjected { object },
        });
        Ok(())
    })?;
    Ok(notes)
}

/// Reverses [`inject_document`] in place.
pub fn uninject_document(doc: &mut Json, index: usize) -> Result<Vec<Note>, ManifestError> {
    let mut notes = Vec::new();
    each_pod(doc, &mut |pod, object, _| {
        let done = uninject::uninject(pod).map_err(|source| ManifestError::Uninject {
            doc: index,
            object: object.to_string(),
            source,
        })?;
        if done != Uninjected::NotInjected {
            notes.push(Note::Uninjected { object: object.to_string() });
        }
        Ok(())
    })?;
    Ok(notes)
}

/// `neutrino inject`: the whole stream in, the injected stream and the notes out.
pub fn inject_stream(text: &str, cfg: &InjectConfig) -> Result<(String, Vec<Note>), ManifestError> {
    let mut docs = read_documents(text)?;
    let mut notes = Vec::new();
    for (i, (_, doc)) in docs.iter_mut().enumerate() {
        notes.extend(inject_document(doc, i + 1, cfg)?);
    }
    Ok((write_documents(&docs)?, notes))
}

/// `neutrino uninject`: the whole stream in, the uninjected stream and the notes out.
pub fn uninject_stream(text: &str) -> Result<(String, Vec<Note>), ManifestError> {
    let mut docs = read_documents(text)?;
    let mut notes = Vec::new();
    for (i, (_, doc)) in docs.iter_mut().enumerate() {
        notes.extend(uninject_document(doc, i + 1)?);
    }
    Ok((write_documents(&docs)?, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml11_booleans_written_as_strings_are_quoted_but_nothing_else() {
        let text = "a:\n- no\n- yes\n- 'on'\nb: y\nc: |\n  - no\n  x: off\nd: No\ne: true\nno: value\nf: nothing\n";
        let want =
            "a:\n- 'no'\n- 'yes'\n- 'on'\nb: 'y'\nc: |\n  - no\n  x: off\nd: 'No'\ne: true\nno: value\nf: nothing\n";
        assert_eq!(quote_yaml11_words(text), want);
    }

    #[test]
    fn strings_that_look_like_booleans_survive_inject_as_strings() {
        let (out, _) =
            inject_stream("a: [\"no\", \"yes\", \"on\"]\nb: \"y\"\n", &InjectConfig::default()).expect("written");
        assert!(out.contains("- 'no'") && out.contains("- 'yes'") && out.contains("b: 'y'"), "{out}");
        let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).expect("yaml");
        assert_eq!(back["a"][0].as_str(), Some("no"));
    }

    const STREAM: &str = "# comment\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\n---\n\
        apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: c\nspec:\n  schedule: '*/1 * * * *'\n  jobTemplate:\n\
        \x20   spec:\n      template:\n        spec:\n          containers:\n          - name: c\n            image: busybox\n\
        \x20           resources: {requests: {cpu: 0.15}}\n";

    #[test]
    fn templates_are_found_other_kinds_pass_through_and_order_is_kept() {
        let (out, notes) = inject_stream(STREAM, &InjectConfig::default()).expect("inject");
        assert_eq!(notes, [Note::Injected { object: "CronJob c".into() }]);
        let docs = read_documents(&out).expect("output parses");
        assert_eq!(docs.len(), 2, "{out}");
        assert_eq!(docs[0].1["kind"], "Service");
        let pod = &docs[1].1["spec"]["jobTemplate"]["spec"]["template"];
        assert_eq!(pod["spec"]["initContainers"][1]["name"], "neutrino-proxy");
        assert!(out.contains("cpu: 0.15"), "{out}");
        let kind_at = out.find("kind: CronJob").expect("kind");
        assert!(out.find("apiVersion: batch/v1").expect("apiVersion") < kind_at, "{out}");
        assert!(out.contains("- name: neutrino-init\n"), "names first in new items:\n{out}");
        let (back, notes) = uninject_stream(&out).expect("uninject");
        assert_eq!(notes, [Note::Uninjected { object: "CronJob c".into() }]);
        let original: Vec<Json> = read_documents(STREAM).expect("in").into_iter().map(|(_, j)| j).collect();
        let back: Vec<Json> = read_documents(&back).expect("back").into_iter().map(|(_, j)| j).collect();
        assert_eq!(back, original);
    }

    #[test]
    fn errors_name_the_document_and_object() {
        let bad = "kind: Pod\nmetadata:\n  name: p\n  annotations:\n    config.neutrino.io/log-level: loud\n\
                   spec:\n  containers: [{name: a}]\n";
        let e = inject_stream(bad, &InjectConfig::default()).expect_err("bad annotation");
        assert!(e.to_string().starts_with("document 1 (Pod p): injecting: checking annotation"), "{e}");
        let e = inject_stream("a: [", &InjectConfig::default()).expect_err("bad yaml");
        assert!(e.to_string().starts_with("reading YAML document 1"), "{e}");
    }
}
