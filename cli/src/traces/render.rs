//! Which trace the demo shows, and its waterfall as text: one row per span, indented by
//! its depth under the root, its place on a time bar and its start and end relative to
//! the trace's start, then what the proxies recorded on it (the endpoint chosen and why,
//! the peer's identity, the status). Pure: no IO, no clock.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

use super::{SpanView, hex, spans, text};

/// Cells of the time bar.
const BAR: usize = 30;

/// The trace id of a request `client_pod`'s sidecar sent (its CLIENT span) that a
/// backend's sidecar served (a SERVER span, that span's child), for the first of
/// `operations` (`neutrino.operation`) that has one, else any: of those, the one of median
/// duration (a typical request, not the slowest).
pub fn pick(batches: &[ResourceSpans], client_pod: &str, operations: &[&str]) -> Option<Vec<u8>> {
    let all = spans(batches);
    let served: HashSet<(&[u8], &[u8])> = all
        .iter()
        .filter(|s| s.kind() == SpanKind::Server)
        .map(|s| (s.span.trace_id.as_slice(), s.span.parent_span_id.as_slice()))
        .collect();
    let mut complete: Vec<(&str, u64, &[u8])> = all
        .iter()
        .filter(|s| s.kind() == SpanKind::Client && s.source() == client_pod)
        .filter(|s| served.contains(&(s.span.trace_id.as_slice(), s.span.span_id.as_slice())))
        .map(|s| {
            let (start, end) = s.times();
            let op = match s.attr("neutrino.operation").and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(op)) => op.as_str(),
                _ => "",
            };
            (op, end - start, s.span.trace_id.as_slice())
        })
        .collect();
    complete.sort_by_key(|c| (c.1, c.2));
    let median = |of: Vec<&(&str, u64, &[u8])>| of.get(of.len() / 2).map(|c| c.2.to_vec());
    operations
        .iter()
        .find_map(|op| median(complete.iter().filter(|c| c.0 == *op).collect()))
        .or_else(|| median(complete.iter().collect()))
}

/// `n` with thousands separators: 151840 -> "151,840".
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The bar of a span from `start` to `end` on a trace of `total` (all relative, ns).
fn bar(start: u64, end: u64, total: u64) -> String {
    let total = u128::from(total.max(1));
    let (s, e) = (u128::from(start), u128::from(end));
    let cells = (0..BAR as u128).map(|i| {
        let (from, to) = (total * i / BAR as u128, total * (i + 1) / BAR as u128);
        let covered = (s < to && e > from) || (s == e && s >= from && (s < to || i == BAR as u128 - 1));
        if covered { '=' } else { '.' }
    });
    format!("[{}]", cells.collect::<String>())
}

fn kind_label(kind: SpanKind) -> &'static str {
    match kind {
        SpanKind::Unspecified => "-",
        SpanKind::Internal => "INTERNAL",
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
        SpanKind::Producer => "PRODUCER",
        SpanKind::Consumer => "CONSUMER",
    }
}

/// What the proxies recorded on a span, as `key=value` words.
fn details(s: &SpanView<'_>) -> String {
    let get = |k: &str| s.attr(k).map(text).filter(|v| !v.is_empty());
    let mut words = Vec::new();
    if let Some(endpoint) = get("neutrino.endpoint") {
        match get("neutrino.endpoint.pod") {
            Some(pod) => words.push(format!("endpoint {endpoint} ({pod})")),
            None => words.push(format!("endpoint {endpoint}")),
        }
    }
    if let Some(reason) = get("neutrino.selection.reason") {
        words.push(format!("reason={reason}"));
    }
    if let Some(Some(any_value::Value::DoubleValue(u))) = s.attr("neutrino.endpoint.utilization").map(|v| &v.value) {
        words.push(format!("util={u:.2}"));
    }
    if let Some(retries) = get("neutrino.retries").filter(|r| r != "0") {
        words.push(format!("retries={retries}"));
    }
    match s.kind() {
        SpanKind::Client => words.extend(get("neutrino.endpoint.identity").map(|p| format!("peer={p}"))),
        SpanKind::Server => words.extend(get("neutrino.peer.identity").map(|p| format!("caller={p}"))),
        _ => {}
    }
    if let Some(status) = get("http.response.status_code") {
        words.push(format!("status={status}"));
    }
    if let Some(st) = s.span.status.as_ref().filter(|st| st.code == StatusCode::Error as i32) {
        words.push(if st.message.is_empty() { "ERROR".to_string() } else { format!("ERROR: {}", st.message) });
    }
    words.join(" ")
}

/// What the trace was: `METHOD route, operation` of its first root, else its span name.
fn title(root: &SpanView<'_>) -> String {
    let get = |k: &str| root.attr(k).map(text).filter(|v| !v.is_empty());
    let what = match (get("http.request.method"), get("http.route").or_else(|| get("url.path"))) {
        (Some(method), Some(route)) => format!("{method} {route}"),
        _ => root.span.name.clone(),
    };
    match get("neutrino.operation") {
        Some(op) => format!("{what}, {op}"),
        None => what,
    }
}

/// The waterfall of trace `trace_id`: a title line, then one row per span, children under
/// their parent (by start), indented by depth; a span whose parent did not arrive is a root.
pub fn waterfall(batches: &[ResourceSpans], trace_id: &[u8]) -> String {
    let mut seen = HashSet::new();
    let mut spans: Vec<SpanView<'_>> = spans(batches)
        .into_iter()
        .filter(|s| s.span.trace_id == trace_id && seen.insert(s.span.span_id.as_slice()))
        .collect();
    spans.sort_by_key(|s| (s.span.start_time_unix_nano, s.span.span_id.clone()));
    let Some(t0) = spans.iter().map(|s| s.times().0).min() else {
        return format!("trace {}: no spans\n", hex(trace_id));
    };
    let t1 = spans.iter().map(|s| s.times().1).max().unwrap_or(t0);
    let index: HashMap<&[u8], usize> = spans.iter().enumerate().map(|(i, s)| (s.span.span_id.as_slice(), i)).collect();
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        match index.get(s.span.parent_span_id.as_slice()).filter(|p| **p != i) {
            Some(p) if !s.span.parent_span_id.is_empty() => children.entry(*p).or_default().push(i),
            _ => roots.push(i),
        }
    }
    // Depth first, children in start order (spans are sorted, so are the lists).
    let mut rows = Vec::with_capacity(spans.len());
    let mut stack: Vec<(usize, usize)> = roots.iter().rev().map(|r| (*r, 0)).collect();
    while let Some((i, depth)) = stack.pop() {
        rows.push((i, depth));
        if rows.len() > spans.len() {
            break; // a cycle of parent ids; never from a real tracer
        }
        stack.extend(children.get(&i).into_iter().flatten().rev().map(|c| (*c, depth + 1)));
    }

    let label = |i: usize, depth: usize| format!("{}{}", "  ".repeat(depth + 1), spans[i].source());
    let us = |ns: u64| grouped((ns - t0) / 1000);
    let w_label = rows.iter().map(|(i, d)| label(*i, *d).chars().count()).max().unwrap_or(0);
    let w_kind = rows.iter().map(|(i, _)| kind_label(spans[*i].kind()).len()).max().unwrap_or(0);
    let w_name = rows.iter().map(|(i, _)| spans[*i].span.name.chars().count()).max().unwrap_or(0);
    let w_time = us(t1).len();
    let root = &spans[rows.first().map(|r| r.0).unwrap_or(0)];
    let n = spans.len();
    let mut out = format!(
        "trace {} ({}): {n} span{}, {:.2} ms\n",
        hex(trace_id),
        title(root),
        if n == 1 { "" } else { "s" },
        (t1 - t0) as f64 / 1e6
    );
    for (i, depth) in rows {
        let s = &spans[i];
        let (start, end) = s.times();
        let row = format!(
            "{:<w_label$}  {:<w_kind$}  {:<w_name$}  {}  {:>w_time$} µs .. {:>w_time$} µs  {}",
            label(i, depth),
            kind_label(s.kind()),
            s.span.name,
            bar(start - t0, end - t0, t1 - t0),
            us(start),
            us(end),
            details(s)
        );
        let _ = writeln!(out, "{}", row.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span, Status};

    use super::*;
    use crate::traces::test_spans::{kv, span};

    fn from(pod: &str, spans: Vec<Span>) -> ResourceSpans {
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "neutrino-proxy"), kv("k8s.pod.name", pod)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }
    }

    const T0: u64 = 1_700_000_000_000_000_000;

    /// A client span from `start` µs lasting `dur` µs, and (`served`) the server span under it.
    fn request(trace: u8, op: &str, start: u64, dur: u64, served: bool) -> Vec<ResourceSpans> {
        let (s, e) = (T0 + start * 1000, T0 + (start + dur) * 1000);
        let mut c = span(trace, trace, 0, SpanKind::Client, s, e);
        c.attributes[2] = kv("neutrino.operation", op);
        let mut out = vec![from("client", vec![c])];
        if served {
            out.push(from("orders-large", vec![span(trace, trace + 100, trace, SpanKind::Server, s + 1000, e - 1000)]));
        }
        out
    }

    #[test]
    fn picks_a_served_request_of_the_first_operation_that_has_one_with_median_duration() {
        let mut batches = Vec::new();
        batches.extend(request(1, "renderInvoice", 0, 500, true));
        batches.extend(request(2, "renderInvoice", 0, 900, true));
        batches.extend(request(3, "renderInvoice", 0, 700, true));
        batches.extend(request(4, "renderInvoice", 0, 800, false)); // not served (yet): never picked
        batches.extend(request(5, "getOrder", 0, 100, true));
        batches.extend(request(6, "forecastDemand", 0, 100, true));
        assert_eq!(pick(&batches, "client", &["renderInvoice", "forecastDemand"]), Some(vec![3; 16]), "median");
        assert_eq!(pick(&batches, "client", &["createOrder", "forecastDemand"]), Some(vec![6; 16]));
        // None of the operations: any served request, median (100, 100, 500, 700, 900).
        assert_eq!(pick(&batches, "client", &["createOrder"]), Some(vec![1; 16]));
        assert_eq!(pick(&batches, "someone-else", &["renderInvoice"]), None);
        assert_eq!(pick(&request(7, "renderInvoice", 0, 10, false), "client", &["renderInvoice"]), None);
    }

    #[test]
    fn the_waterfall_indents_children_under_their_parent_in_start_order() {
        let at = |us: u64| T0 + us * 1000;
        let mut client = span(1, 1, 0, SpanKind::Client, at(0), at(151_840));
        client.attributes.extend([
            kv("neutrino.endpoint", "127.0.0.1:28083"),
            kv("neutrino.endpoint.pod", "orders-large"),
            kv("neutrino.selection.reason", "p2c"),
            kv("neutrino.endpoint.utilization", 0.3125),
            kv("neutrino.retries", 1_i64),
            kv("neutrino.endpoint.identity", "spiffe://cluster.local/ns/shop/sa/orders"),
            kv("neutrino.peer.identity", "client.shop"),
            kv("http.response.status_code", 200_i64),
        ]);
        // The first attempt failed on orders-small; the retry went to orders-large.
        let mut first = span(1, 2, 1, SpanKind::Server, at(210), at(1_420));
        first.status = Some(Status { code: StatusCode::Error as i32, message: "reset".into() });
        let mut second = span(1, 3, 1, SpanKind::Server, at(2_000), at(151_000));
        second.attributes.extend([
            kv("neutrino.peer.identity", "spiffe://cluster.local/ns/shop/sa/client"),
            kv("http.response.status_code", 200_i64),
        ]);
        let app = span(1, 4, 3, SpanKind::Internal, at(2_500), at(150_000));
        let orphan = span(1, 5, 77, SpanKind::Server, at(151_840), at(151_840));
        let other_trace = span(2, 6, 0, SpanKind::Client, at(0), at(10));
        let batches = vec![
            from("orders-large", vec![second, app]),
            from("orders-small", vec![first]),
            from("client", vec![client.clone(), other_trace]),
            from("client", vec![client]), // received twice: shown once
            from("orders-medium", vec![orphan]),
        ];
        let text = waterfall(&batches, &[1; 16]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!("trace {} (POST /orders/{{id}}/render, renderInvoice): 5 spans, 151.84 ms", hex(&[1; 16]))
        );
        assert_eq!(lines.len(), 6, "{text}");
        let starts: Vec<&str> = lines[1..].iter().map(|l| l.trim_start().split(' ').next().unwrap()).collect();
        assert_eq!(starts, ["client", "orders-small", "orders-large", "orders-large", "orders-medium"], "{text}");
        let indent = |l: &str| l.len() - l.trim_start().len();
        let indents: Vec<usize> = lines[1..].iter().map(|l| indent(l)).collect();
        assert_eq!(indents, [2, 4, 4, 6, 2], "depth under the root; a span without its parent is a root:\n{text}");
        assert!(lines[1].contains("CLIENT") && lines[2].contains("SERVER") && lines[4].contains("INTERNAL"));
        // Offsets from the root's start, in µs; the columns line up.
        assert!(lines[1].contains("      0 µs .. 151,840 µs"), "{text}");
        assert!(lines[2].contains("    210 µs ..   1,420 µs"), "{text}");
        assert!(lines[3].contains("  2,000 µs .. 151,000 µs"), "{text}");
        let col = |l: &str| l.find('[').unwrap();
        assert!(lines[1..].iter().all(|l| col(l) == col(lines[1])), "{text}");
        assert!(lines[1].contains("[==============================]"), "{text}");
        assert!(lines[2].contains("[=.............................]"), "{text}");
        assert!(lines[5].contains("[.............................=]"), "an instant at the end: {text}");
        assert!(
            lines[1].ends_with(
                "endpoint 127.0.0.1:28083 (orders-large) reason=p2c util=0.31 retries=1 \
                 peer=spiffe://cluster.local/ns/shop/sa/orders status=200"
            ),
            "{text}"
        );
        assert!(lines[2].ends_with("ERROR: reset"), "{text}");
        assert!(lines[3].ends_with("caller=spiffe://cluster.local/ns/shop/sa/client status=200"), "{text}");
        assert!(!text.contains("client.shop"), "a client span's own identity is not its peer");
        assert!(waterfall(&batches, &[9; 16]).contains("no spans"));
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_840), "1,840");
        assert_eq!(grouped(151_840), "151,840");
        assert_eq!(grouped(12_345_678), "12,345,678");
    }
}
