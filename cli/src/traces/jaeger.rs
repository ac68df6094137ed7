//! OTLP spans to the JSON Jaeger's UI loads (Search -> Upload JSON; the shape of its query
//! API's `/api/traces` answer): one entry per trace, its spans sorted by start, one
//! process per resource (`service.name` and pod), times in microseconds since the epoch.
//! Attributes become typed tags; the span kind, the status and the instrumentation scope
//! become the tags Jaeger's own OTLP receiver adds (`span.kind`, `otel.status_code`,
//! `error`, `otel.scope.name`); events become logs.
//!
//! A parent or link that is not among the spans received (its process was stopped before
//! it exported, say) is not written as a reference, which Jaeger would show as a broken
//! tree, but as a warning on the span. Conversion is pure; it must not drop or reorder
//! spans beyond sorting and removing exact duplicates (same trace and span id).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, status::StatusCode};
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use super::{SpanView, attr_str, hex, spans, text};

/// The whole file.
#[derive(Debug, Serialize)]
pub struct Export {
    pub data: Vec<Trace>,
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
    pub errors: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct Trace {
    #[serde(rename = "traceID")]
    pub trace_id: String,
    pub spans: Vec<JaegerSpan>,
    pub processes: BTreeMap<String, Process>,
    pub warnings: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JaegerSpan {
    #[serde(rename = "traceID")]
    pub trace_id: String,
    #[serde(rename = "spanID")]
    pub span_id: String,
    pub flags: u32,
    pub operation_name: String,
    pub references: Vec<Reference>,
    /// Microseconds since the epoch.
    pub start_time: u64,
    /// Microseconds.
    pub duration: u64,
    pub tags: Vec<Tag>,
    pub logs: Vec<Log>,
    #[serde(rename = "processID")]
    pub process_id: String,
    pub warnings: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    /// `CHILD_OF` (the parent) or `FOLLOWS_FROM` (a link).
    pub ref_type: &'static str,
    #[serde(rename = "traceID")]
    pub trace_id: String,
    #[serde(rename = "spanID")]
    pub span_id: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Tag {
    pub key: String,
    /// `string`, `bool`, `int64` or `float64`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub value: Value,
}

#[derive(Debug, Serialize)]
pub struct Log {
    pub timestamp: u64,
    pub fields: Vec<Tag>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    pub service_name: String,
    pub tags: Vec<Tag>,
}

#[derive(Debug, Error)]
pub enum FileError {
    #[error("could not create {}: {source}", .path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("could not write the traces to {}: {source}", .path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// Writes `export` to `path`, creating its directory.
pub fn write(path: &Path, export: &Export) -> Result<(), FileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| FileError::Dir { path: dir.to_path_buf(), source })?;
    }
    let json =
        serde_json::to_vec(export).map_err(|e| FileError::Write { path: path.to_path_buf(), source: e.into() })?;
    std::fs::write(path, json).map_err(|source| FileError::Write { path: path.to_path_buf(), source })
}

fn micros(nanos: u64) -> u64 {
    nanos / 1000
}

pub fn tag(key: &str, v: &AnyValue) -> Tag {
    use any_value::Value as V;
    let (kind, value) = match &v.value {
        Some(V::BoolValue(b)) => ("bool", Value::Bool(*b)),
        Some(V::IntValue(i)) => ("int64", Value::from(*i)),
        Some(V::DoubleValue(d)) if d.is_finite() => ("float64", Value::from(*d)),
        _ => ("string", Value::String(text(v))),
    };
    Tag { key: key.to_string(), kind, value }
}

fn string_tag(key: &str, value: &str) -> Tag {
    Tag { key: key.to_string(), kind: "string", value: Value::String(value.to_string()) }
}

fn tags(attrs: &[KeyValue]) -> impl Iterator<Item = Tag> + '_ {
    attrs.iter().map(|kv| match &kv.value {
        Some(v) => tag(&kv.key, v),
        None => string_tag(&kv.key, ""),
    })
}

/// Jaeger's name for a span kind (none for unspecified).
pub fn kind_name(kind: SpanKind) -> Option<&'static str> {
    match kind {
        SpanKind::Unspecified => None,
        SpanKind::Internal => Some("internal"),
        SpanKind::Server => Some("server"),
        SpanKind::Client => Some("client"),
        SpanKind::Producer => Some("producer"),
        SpanKind::Consumer => Some("consumer"),
    }
}

/// A resource's process key: its `service.name` and pod.
fn process_key(resource: &[KeyValue]) -> (String, String) {
    let service = attr_str(resource, "service.name").unwrap_or("unknown_service");
    (service.to_string(), attr_str(resource, "k8s.pod.name").unwrap_or_default().to_string())
}

/// Every span of `batches`, grouped by trace (traces in the order of their first start).
pub fn convert(batches: &[ResourceSpans]) -> Export {
    let all = spans(batches);
    let mut by_trace: BTreeMap<&[u8], Vec<SpanView<'_>>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for s in &all {
        if seen.insert((s.span.trace_id.as_slice(), s.span.span_id.as_slice())) {
            by_trace.entry(s.span.trace_id.as_slice()).or_default().push(*s);
        }
    }
    let mut data: Vec<(u64, Trace)> = by_trace
        .into_values()
        .map(|mut spans| {
            spans.sort_by_key(|s| (s.span.start_time_unix_nano, s.span.span_id.clone()));
            (spans[0].span.start_time_unix_nano, trace(&spans, &seen))
        })
        .collect();
    data.sort_by(|a, b| (a.0, &a.1.trace_id).cmp(&(b.0, &b.1.trace_id)));
    let data: Vec<Trace> = data.into_iter().map(|(_, t)| t).collect();
    Export { total: data.len(), data, limit: 0, offset: 0, errors: None }
}

/// One trace, from its spans sorted by start; `present`: every (trace, span) id received.
fn trace(spans: &[SpanView<'_>], present: &HashSet<(&[u8], &[u8])>) -> Trace {
    let mut processes: BTreeMap<String, Process> = BTreeMap::new();
    let mut ids: Vec<((String, String), String)> = Vec::new();
    let mut out = Vec::with_capacity(spans.len());
    for s in spans {
        let key = process_key(s.resource);
        let process_id = match ids.iter().find(|(k, _)| *k == key) {
            Some((_, id)) => id.clone(),
            None => {
                let id = format!("p{}", ids.len() + 1);
                let resource = s.resource.iter().filter(|kv| kv.key != "service.name");
                let tags = resource.filter_map(|kv| Some(tag(&kv.key, kv.value.as_ref()?))).collect();
                processes.insert(id.clone(), Process { service_name: key.0.clone(), tags });
                ids.push((key, id.clone()));
                id
            }
        };
        out.push(span(s, process_id, present));
    }
    Trace { trace_id: hex(&spans[0].span.trace_id), spans: out, processes, warnings: None }
}

fn span(s: &SpanView<'_>, process_id: String, present: &HashSet<(&[u8], &[u8])>) -> JaegerSpan {
    let sp = s.span;
    let (start, end) = s.times();
    let mut references = Vec::new();
    let mut warnings = Vec::new();
    let mut refer = |ref_type: &'static str, trace: &[u8], span: &[u8]| {
        if present.contains(&(trace, span)) {
            references.push(Reference { ref_type, trace_id: hex(trace), span_id: hex(span) });
        } else {
            let what = if ref_type == "CHILD_OF" { "parent" } else { "linked span" };
            warnings.push(format!("{what} {} (trace {}) was not received", hex(span), hex(trace)));
        }
    };
    if !sp.parent_span_id.is_empty() {
        refer("CHILD_OF", &sp.trace_id, &sp.parent_span_id);
    }
    for link in &sp.links {
        refer("FOLLOWS_FROM", &link.trace_id, &link.span_id);
    }
    let mut tags: Vec<Tag> = tags(&sp.attributes).collect();
    if let Some(kind) = kind_name(s.kind()) {
        tags.push(string_tag("span.kind", kind));
    }
    if let Some(scope) = s.scope.filter(|sc| !sc.name.is_empty()) {
        tags.push(string_tag("otel.scope.name", &scope.name));
        if !scope.version.is_empty() {
            tags.push(string_tag("otel.scope.version", &scope.version));
        }
    }
    if let Some(status) = &sp.status {
        match StatusCode::try_from(status.code) {
            Ok(StatusCode::Ok) => tags.push(string_tag("otel.status_code", "OK")),
            Ok(StatusCode::Error) => {
                tags.push(string_tag("otel.status_code", "ERROR"));
                tags.push(Tag { key: "error".into(), kind: "bool", value: Value::Bool(true) });
            }
            _ => {}
        }
        if !status.message.is_empty() {
            tags.push(string_tag("otel.status_description", &status.message));
        }
    }
    let logs = sp
        .events
        .iter()
        .map(|e| Log {
            timestamp: micros(e.time_unix_nano),
            fields: std::iter::once(string_tag("event", &e.name)).chain(self::tags(&e.attributes)).collect(),
        })
        .collect();
    JaegerSpan {
        trace_id: hex(&sp.trace_id),
        span_id: hex(&sp.span_id),
        flags: 1,
        operation_name: sp.name.clone(),
        references,
        start_time: micros(start),
        duration: micros(end) - micros(start),
        tags,
        logs,
        process_id,
        warnings: (!warnings.is_empty()).then_some(warnings),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span, Status};

    use super::*;
    use crate::traces::test_spans::{kv, span as mk};

    fn batch(service: &str, pod: &str, spans: Vec<Span>) -> ResourceSpans {
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", service),
                    kv("k8s.pod.name", pod),
                    kv("k8s.namespace.name", "shop"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "neutrino-proxy".into(),
                    version: "0.1.0".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn find<'a>(tags: &'a [Tag], key: &str) -> &'a Tag {
        tags.iter().find(|t| t.key == key).unwrap_or_else(|| panic!("no tag {key} in {tags:?}"))
    }

    #[test]
    fn one_entry_per_trace_with_parent_links_microseconds_and_one_process_per_pod() {
        // Trace 1: the client's CLIENT span (root) and the backend's SERVER span, its
        // child; received backend first, as batches come. Trace 2 starts earlier.
        let mut client = mk(1, 10, 0, SpanKind::Client, 1_000_000_123_456, 1_000_151_840_999);
        client.attributes.push(kv("neutrino.endpoint.utilization", 0.31));
        client.attributes.push(kv("neutrino.retries", 0_i64));
        client.attributes.push(kv("neutrino.selected", true));
        let server = mk(1, 11, 10, SpanKind::Server, 1_000_000_333_000, 1_000_151_000_000);
        let early = mk(2, 20, 0, SpanKind::Producer, 999_000_000_000, 999_000_002_000);
        let batches = vec![
            batch("neutrino-proxy", "orders-large", vec![server]),
            batch("neutrino-proxy", "client", vec![client]),
            batch("neutrino-control-plane", "", vec![early]),
        ];
        let export = convert(&batches);
        assert_eq!(export.data.len(), 2);
        assert_eq!(export.total, 2);
        assert_eq!(export.data[0].trace_id, hex(&[2; 16]), "traces by start");
        let t = &export.data[1];
        assert_eq!(t.trace_id, hex(&[1; 16]));
        assert_eq!(t.spans.len(), 2);
        let (c, s) = (&t.spans[0], &t.spans[1]);
        assert_eq!((c.span_id.as_str(), s.span_id.as_str()), (hex(&[10; 8]).as_str(), hex(&[11; 8]).as_str()));
        assert!(c.references.is_empty(), "the root has no parent");
        assert_eq!(s.references.len(), 1);
        assert_eq!(s.references[0].ref_type, "CHILD_OF");
        assert_eq!(s.references[0].span_id, c.span_id);
        assert_eq!(s.references[0].trace_id, t.trace_id);
        // Nanoseconds to microseconds, floored; the duration from the floored ends.
        assert_eq!(c.start_time, 1_000_000_123);
        assert_eq!(c.duration, 1_000_151_840 - 1_000_000_123);
        assert_eq!(s.start_time, 1_000_000_333);
        assert_eq!(c.operation_name, "POST renderInvoice");
        // One process per pod, numbered in order of appearance.
        assert_eq!((c.process_id.as_str(), s.process_id.as_str()), ("p1", "p2"));
        assert_eq!(t.processes["p1"].service_name, "neutrino-proxy");
        assert_eq!(find(&t.processes["p2"].tags, "k8s.pod.name").value, "orders-large");
        assert!(t.processes["p1"].tags.iter().all(|t| t.key != "service.name"));
        // Typed tags, plus kind and scope.
        assert_eq!(find(&c.tags, "neutrino.operation").kind, "string");
        let util = find(&c.tags, "neutrino.endpoint.utilization");
        assert_eq!((util.kind, util.value.as_f64()), ("float64", Some(0.31)));
        let retries = find(&c.tags, "neutrino.retries");
        assert_eq!((retries.kind, &retries.value), ("int64", &Value::from(0)));
        assert_eq!(find(&c.tags, "neutrino.selected").kind, "bool");
        assert_eq!(find(&c.tags, "span.kind").value, "client");
        assert_eq!(find(&s.tags, "span.kind").value, "server");
        assert_eq!(find(&c.tags, "otel.scope.name").value, "neutrino-proxy");
        assert!(c.tags.iter().all(|t| t.key != "error"), "no status, no error");
        assert_eq!(export.data[0].processes["p1"].service_name, "neutrino-control-plane");

        // The JSON Jaeger's UI reads.
        let json = serde_json::to_value(&export).unwrap();
        let js = &json["data"][1]["spans"][1];
        assert_eq!(js["traceID"], t.trace_id);
        assert_eq!(js["spanID"], s.span_id);
        assert_eq!(js["processID"], "p2");
        assert_eq!(js["flags"], 1);
        assert_eq!(js["references"][0]["refType"], "CHILD_OF");
        assert_eq!(js["startTime"], 1_000_000_333_u64);
        assert!(js["logs"].as_array().unwrap().is_empty());
        assert!(js["warnings"].is_null());
        assert_eq!(json["data"][1]["processes"]["p1"]["serviceName"], "neutrino-proxy");
        let tag = js["tags"].as_array().unwrap().iter().find(|t| t["key"] == "span.kind").unwrap();
        assert_eq!((tag["type"].as_str(), tag["value"].as_str()), (Some("string"), Some("server")));
    }

    #[test]
    fn errors_events_missing_parents_and_duplicates() {
        let mut failed = mk(3, 30, 99, SpanKind::Server, 5_000_000, 9_000_000);
        failed.status = Some(Status { code: StatusCode::Error as i32, message: "upstream reset".into() });
        failed.events.push(Event {
            time_unix_nano: 7_000_500,
            name: "nack".into(),
            attributes: vec![kv("neutrino.reason.0", "bad")],
            ..Default::default()
        });
        failed.links.push(Link { trace_id: vec![3; 16], span_id: vec![31; 8], ..Default::default() });
        let mut ok = mk(3, 31, 0, SpanKind::Internal, 4_000_000, 4_500_000);
        ok.status = Some(Status { code: StatusCode::Ok as i32, message: String::new() });
        let batches = vec![batch("svc", "a", vec![failed.clone(), ok]), batch("svc", "a", vec![failed])];
        let export = convert(&batches);
        let t = &export.data[0];
        assert_eq!(t.spans.len(), 2, "the duplicate is written once");
        assert_eq!(t.processes.len(), 1, "same service and pod: one process");
        let (ok, failed) = (&t.spans[0], &t.spans[1]);
        assert_eq!(find(&ok.tags, "otel.status_code").value, "OK");
        assert_eq!(find(&ok.tags, "span.kind").value, "internal");
        assert_eq!(find(&failed.tags, "otel.status_code").value, "ERROR");
        assert_eq!(find(&failed.tags, "otel.status_description").value, "upstream reset");
        let error = find(&failed.tags, "error");
        assert_eq!((error.kind, &error.value), ("bool", &Value::Bool(true)));
        // The parent never arrived: no reference, a warning; the link to a span present stays.
        assert_eq!(failed.references.len(), 1);
        assert_eq!(failed.references[0].ref_type, "FOLLOWS_FROM");
        assert_eq!(failed.references[0].span_id, ok.span_id);
        let warnings = failed.warnings.as_ref().unwrap();
        assert!(warnings[0].contains(&hex(&[99; 8])) && warnings[0].contains("not received"), "{warnings:?}");
        assert_eq!(failed.logs.len(), 1);
        assert_eq!(failed.logs[0].timestamp, 7_000);
        assert_eq!(failed.logs[0].fields[0], string_tag("event", "nack"));
        assert_eq!(failed.logs[0].fields[1], string_tag("neutrino.reason.0", "bad"));
    }

    #[test]
    fn the_file_is_written_with_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/traces.json");
        write(&path, &convert(&[])).unwrap();
        let json: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["data"], Value::Array(vec![]));
    }
}
