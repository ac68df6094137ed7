//! The demo's traces (the end of `neutrino demo`'s step 4/4, after the workload): where
//! the spans of the control plane and every sidecar go, and what the demo shows of them.
//!
//! Without `--otlp-endpoint` the demo runs its own OTLP/gRPC trace receiver on a loopback
//! port ([`receive`]), points every process it starts at it, and afterwards prints the
//! waterfall of one heavy request ([`render`]) and writes every span it received to a file
//! Jaeger's UI loads ([`jaeger`]). With `--otlp-endpoint` the spans go to that collector
//! (a real Jaeger) and the demo only says how many were exported there.
//!
//! It must never slow or fail the demo: every wait is bounded (a few seconds at most, and
//! usually a fraction of a second), and a receiver, collector or file problem is printed
//! as a warning while the demo still succeeds. It must not change what the mesh does with
//! a request: it only sets the standard `OTEL_*` variables of the processes.

pub mod jaeger;
pub mod receive;
pub mod render;

use std::path::Path;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};

/// How often the proxies and the control plane send their batches (`OTEL_BSP_SCHEDULE_DELAY`).
pub const SCHEDULE_DELAY: Duration = Duration::from_millis(200);
/// The longest the demo waits for spans after its workload.
pub const WAIT_LIMIT: Duration = Duration::from_secs(5);
/// No new request spans for this long (and the trace to show complete): all have arrived.
pub const QUIET: Duration = Duration::from_millis(500);
/// The pod of the demo client's sidecar, which makes the CLIENT spans.
pub const CLIENT_POD: &str = "client";
/// The operations whose trace the demo prefers to show, heaviest first.
pub const HEAVY: [&str; 2] = ["renderInvoice", "forecastDemand"];

/// One received span with the resource and scope it came under.
#[derive(Debug, Clone, Copy)]
pub struct SpanView<'a> {
    pub resource: &'a [KeyValue],
    pub scope: Option<&'a InstrumentationScope>,
    pub span: &'a Span,
}

impl<'a> SpanView<'a> {
    /// Who made it: the pod (`k8s.pod.name`), else the service (`service.name`).
    pub fn source(&self) -> &'a str {
        attr_str(self.resource, "k8s.pod.name")
            .filter(|p| !p.is_empty())
            .or_else(|| attr_str(self.resource, "service.name"))
            .unwrap_or("?")
    }

    pub fn attr(&self, key: &str) -> Option<&'a AnyValue> {
        attr(&self.span.attributes, key)
    }

    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// Start and end, nanoseconds since the epoch (an end before the start is the start).
    pub fn times(&self) -> (u64, u64) {
        (self.span.start_time_unix_nano, self.span.end_time_unix_nano.max(self.span.start_time_unix_nano))
    }
}

/// Every span of `batches`, in the order received.
pub fn spans(batches: &[ResourceSpans]) -> Vec<SpanView<'_>> {
    let mut out = Vec::new();
    for rs in batches {
        let resource = rs.resource.as_ref().map(|r| r.attributes.as_slice()).unwrap_or_default();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                out.push(SpanView { resource, scope: ss.scope.as_ref(), span });
            }
        }
    }
    out
}

/// How many spans `batches` hold whose resource is `service` (`service.name`).
pub fn count_from(batches: &[ResourceSpans], service: &str) -> usize {
    batches
        .iter()
        .filter(|rs| rs.resource.as_ref().is_some_and(|r| attr_str(&r.attributes, "service.name") == Some(service)))
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attrs.iter().find(|kv| kv.key == key)?.value.as_ref()
}

pub fn attr_str<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key)?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// A value as text: strings as they are, numbers and booleans printed, lists in brackets.
pub fn text(v: &AnyValue) -> String {
    use any_value::Value;
    match &v.value {
        None => String::new(),
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(Value::ArrayValue(a)) => format!("[{}]", a.values.iter().map(text).collect::<Vec<_>>().join(", ")),
        Some(Value::KvlistValue(l)) => {
            let kvs: Vec<String> = l
                .values
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value.as_ref().map(text).unwrap_or_default()))
                .collect();
            format!("{{{}}}", kvs.join(", "))
        }
        Some(Value::StringValueStrindex(i)) => format!("#{i}"),
    }
}

/// The environment that points a process's OTLP exporter at `endpoint`, with short batches
/// so spans arrive soon after the work.
pub fn exporter_env(endpoint: &str) -> [(&'static str, String); 2] {
    [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()), ("OTEL_BSP_SCHEDULE_DELAY", ms(SCHEDULE_DELAY))]
}

/// Variables removed from the processes' environment: they would send spans elsewhere
/// or switch them off.
pub const CLEARED_ENV: [&str; 3] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER"];

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// The demo's summary with the built-in receiver: one heavy request's waterfall, and every
/// span written to `file`. Never fails: problems are lines of the summary.
pub async fn summary(receiver: &receive::Receiver, file: &Path) -> String {
    let started = Instant::now();
    let settled = receiver
        .settle(WAIT_LIMIT, QUIET, |b| render::pick(b, CLIENT_POD, &HEAVY), |b| count_from(b, "neutrino-proxy"))
        .await;
    let (picked, batches) = (settled.found, settled.batches);
    let all = spans(&batches);
    let export = jaeger::convert(&batches);
    let mut out = format!(
        "\ntraces: the control plane and the sidecars sent {} spans ({} traces) to the demo's OTLP/gRPC receiver at {}",
        all.len(),
        export.data.len(),
        receiver.endpoint()
    );
    if receiver.dropped() > 0 {
        out.push_str(&format!(" ({} more were not kept: too many)", receiver.dropped()));
    }
    match &picked {
        Some(trace) => {
            out.push_str("; one heavy request, sidecar to sidecar:\n");
            out.push_str(&render::waterfall(&batches, trace));
        }
        None => out.push_str(&format!(
            "\nwarning: no trace of a request from the client's sidecar to a backend's arrived within {:.1} s\n",
            started.elapsed().as_secs_f64()
        )),
    }
    match jaeger::write(file, &export) {
        Ok(()) => out.push_str(&format!(
            "all traces: {} (Jaeger JSON: in Jaeger's UI, Search -> Upload JSON; to send them to a running \
             Jaeger instead, pass --otlp-endpoint http://127.0.0.1:4317)\n",
            file.display()
        )),
        Err(e) => out.push_str(&format!("warning: {e}\n")),
    }
    out
}

/// The demo's summary when the spans went to `endpoint`: how many the processes exported
/// there (from their `/metrics`, once the counts stop moving), and where to look.
pub async fn external_summary(endpoint: &str, admin_ports: &[u16]) -> String {
    let counts = || async {
        let mut sum = (0.0, 0.0);
        for port in admin_ports {
            let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => continue,
            };
            let metric = |name: &str| -> f64 {
                text.lines()
                    .filter(|l| l.starts_with(name))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            };
            sum.0 += metric("neutrino_proxy_trace_spans_exported_total");
            sum.1 += metric("neutrino_proxy_trace_spans_dropped_total");
        }
        sum
    };
    let deadline = Instant::now() + WAIT_LIMIT;
    let (mut last, mut since) = (counts().await, Instant::now());
    while Instant::now() < deadline && since.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counts().await;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    let (exported, dropped) = last;
    let host = endpoint.parse::<http::Uri>().ok().and_then(|u| u.host().map(str::to_string));
    let ui = format!("http://{}:16686", host.as_deref().unwrap_or("127.0.0.1"));
    let mut out = format!(
        "\ntraces: the sidecars exported {exported:.0} spans to {endpoint} over OTLP/gRPC (dropped: {dropped:.0}); \
         if that is Jaeger, open {ui}, service neutrino-proxy, operation POST renderInvoice (the control \
         plane's pushes are under neutrino-control-plane)\n"
    );
    if exported == 0.0 {
        out.push_str(&format!(
            "warning: no span reached {endpoint}: is a collector listening there (Jaeger: its OTLP gRPC port, 4317)?\n"
        ));
    }
    out
}

/// Hand-built OTLP spans for the tests of the conversions.
#[cfg(test)]
pub mod test_spans {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::Span;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

    pub trait Any {
        fn any(self) -> any_value::Value;
    }
    impl Any for &str {
        fn any(self) -> any_value::Value {
            any_value::Value::StringValue(self.to_string())
        }
    }
    impl Any for i64 {
        fn any(self) -> any_value::Value {
            any_value::Value::IntValue(self)
        }
    }
    impl Any for f64 {
        fn any(self) -> any_value::Value {
            any_value::Value::DoubleValue(self)
        }
    }
    impl Any for bool {
        fn any(self) -> any_value::Value {
            any_value::Value::BoolValue(self)
        }
    }

    pub fn kv(key: &str, v: impl Any) -> KeyValue {
        KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(v.any()) }), ..Default::default() }
    }

    /// A `POST renderInvoice` span of trace `[trace; 16]`, id `[id; 8]`, parent `[parent; 8]`
    /// (0: none), from `start` to `end` (ns since the epoch).
    pub fn span(trace: u8, id: u8, parent: u8, kind: SpanKind, start: u64, end: u64) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            name: "POST renderInvoice".into(),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes: vec![
                kv("http.request.method", "POST"),
                kv("http.route", "/orders/{id}/render"),
                kv("neutrino.operation", "renderInvoice"),
            ],
            ..Default::default()
        }
    }
}
