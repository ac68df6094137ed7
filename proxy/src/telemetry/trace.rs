//! Traces: every proxy hop makes one span per request, a CLIENT span on the way out
//! (`forward::http`) and a SERVER span on the way in (`forward::inbound`), exported
//! over OTLP/gRPC. The parent comes from the request's W3C `traceparent`/`tracestate`
//! (or, failing that, B3: `b3` or `x-b3-*`); the span's own context replaces them on
//! the request sent on, so an app that forwards these headers gets one trace.
//!
//! Off unless an OTLP endpoint is configured (`--otlp-endpoint`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`): then the data
//! path holds no [`Tracing`] and pays one branch per request. Spans are made directly
//! with the OpenTelemetry API (no `tracing` subscriber on the request path).
//!
//! Nothing here may slow or fail a request. Ending a span hands it to a bounded queue
//! without waiting: when the queue is full the span is dropped and counted. The SDK's
//! batch processor drains the queue on its own thread; each export (encoding and gRPC)
//! runs on a one-thread tokio runtime of its own (`neutrino_otel`), under a short
//! deadline, and spans of a failed or timed-out export are dropped and counted too. Metrics: `trace_spans_exported`,
//! `trace_spans_dropped` (queue full + lost in failed exports), `trace_export_failures`.
//! It must not change a request beyond its trace headers, nor decide where it goes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_propagator_b3::B3Encoding;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanExporter};
use thiserror::Error;

use crate::route::{Operation, ServiceEntry};
use crate::select::Choice;
use crate::select::endpoints::Endpoint;
pub use neutrino_otel::{Counters, ExportRuntime};

const TRACEPARENT: &str = "traceparent";
const B3_SINGLE: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
/// Every B3 header, removed from a request whose context we replace.
const B3_HEADERS: [&str; 6] = ["b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"];

/// What the proxy's flags add to the `OTEL_*` variables.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `--otlp-endpoint`; None: the `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` variables.
    pub endpoint: Option<String>,
    pub pod: String,
    pub namespace: String,
    /// The proxy's node id (`<pod>.<namespace>`): `service.instance.id`, and the caller
    /// identity on client spans until mTLS brings a verified one.
    pub instance: String,
}

impl Settings {
    /// Tracing settings if tracing is on: an endpoint given or set in the environment,
    /// and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
    pub fn if_enabled(endpoint: Option<String>, pod: &str, namespace: &str, instance: &str) -> Option<Settings> {
        let endpoint = endpoint.filter(|e| !e.trim().is_empty());
        neutrino_otel::enabled(endpoint.as_deref()).then(|| Settings {
            endpoint,
            pod: pod.to_string(),
            namespace: namespace.to_string(),
            instance: instance.to_string(),
        })
    }
}

#[derive(Debug, Error)]
pub enum TraceError {
    #[error(
        "OTLP trace exporter: {0}; check --otlp-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT \
         (e.g. http://otel-collector.observability:4317)"
    )]
    Exporter(String),
}

/// The tracer of a proxy with tracing on.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    w3c: TraceContextPropagator,
    /// Extracts both B3 forms (single header first).
    b3: opentelemetry_propagator_b3::Propagator,
    /// Who is calling, on client spans.
    identity: opentelemetry::Value,
}

impl Tracing {
    /// Starts the OTLP/gRPC exporter and the batch processor. Exports run on a runtime of
    /// their own (one thread), never on the threads that serve requests.
    pub fn start(settings: &Settings, counters: Counters) -> Result<Tracing, TraceError> {
        let (exporter, runtime, timeout) =
            neutrino_otel::otlp_exporter(settings.endpoint.as_deref()).map_err(TraceError::Exporter)?;
        let resource = neutrino_otel::resource(
            "neutrino-proxy",
            vec![
                KeyValue::new("service.instance.id", settings.instance.clone()),
                KeyValue::new("k8s.pod.name", settings.pod.clone()),
                KeyValue::new("k8s.namespace.name", settings.namespace.clone()),
            ],
        );
        Ok(Tracing::with_exporter(exporter, runtime, resource, counters, timeout, &settings.instance))
    }

    /// The tracer over any exporter (tests use an in-process one), exporting on `runtime`.
    pub fn with_exporter<E: SpanExporter + 'static>(
        exporter: E,
        runtime: ExportRuntime,
        resource: Resource,
        counters: Counters,
        timeout: Duration,
        identity: &str,
    ) -> Tracing {
        let provider = neutrino_otel::provider(exporter, runtime, resource, counters, timeout);
        let scope = InstrumentationScope::builder("neutrino-proxy").with_version(env!("CARGO_PKG_VERSION")).build();
        let tracer = provider.tracer_with_scope(scope);
        Tracing {
            provider,
            tracer,
            w3c: TraceContextPropagator::new(),
            b3: opentelemetry_propagator_b3::Propagator::with_encoding(B3Encoding::SingleAndMultiHeader),
            identity: opentelemetry::Value::from(identity.to_string()),
        }
    }

    /// Exports what is queued and stops, waiting at most [`neutrino_otel::SHUTDOWN_TIMEOUT`].
    pub async fn shutdown(&self) {
        neutrino_otel::shutdown(&self.provider).await;
    }

    /// Exports what is queued now (tests).
    pub async fn flush(&self) {
        neutrino_otel::flush(&self.provider).await;
    }

    /// The parent a request names (W3C first, else B3), and the B3 form the request
    /// carries, if any: that form is rewritten too on the request sent on, so B3 headers
    /// never point at an older span than `traceparent`.
    fn extract(&self, headers: &HeaderMap) -> (Context, Option<B3Encoding>) {
        let b3 = if headers.contains_key(B3_SINGLE) {
            Some(B3Encoding::SingleHeader)
        } else if headers.contains_key(B3_TRACE_ID) {
            Some(B3Encoding::MultipleHeader)
        } else {
            None
        };
        let h = Headers(headers);
        if headers.contains_key(TRACEPARENT) {
            let cx = self.w3c.extract_with_context(&Context::new(), &h);
            if cx.span().span_context().is_valid() {
                return (cx, b3);
            }
        }
        match b3 {
            Some(_) => (self.b3.extract_with_context(&Context::new(), &h), b3),
            None => (Context::new(), None),
        }
    }

    /// The CLIENT span of a request this proxy sends to `svc` for its app.
    /// `host` is the authority the app named; `port` the service port.
    pub fn client_span<B>(
        &self,
        req: &http::Request<B>,
        host: Option<&str>,
        svc: &ServiceEntry,
        op: &Operation,
        port: u16,
    ) -> HopSpan {
        let (method, path) = (req.method(), req.uri().path());
        let (parent, b3) = self.extract(req.headers());
        let cost = &op.cost;
        let mut attributes = common(method, path, op);
        attributes.extend([
            KeyValue::new("server.address", host.map(|h| crate::route::strip_port(h).to_string()).unwrap_or_default()),
            KeyValue::new("server.port", i64::from(port)),
            KeyValue::new("neutrino.service", Arc::clone(&svc.key)),
            KeyValue::new("neutrino.cost.cpu_millis", to_i64(cost.cpu_millis)),
            KeyValue::new("neutrino.cost.memory_bytes", to_i64(cost.memory_bytes)),
            KeyValue::new("neutrino.cost.gpu", to_i64(cost.gpu)),
            KeyValue::new("neutrino.peer.identity", self.identity.clone()),
        ]);
        let span = self
            .tracer
            .span_builder(span_name(method, op))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        HopSpan { span, b3 }
    }

    /// The SERVER span of a request for this pod. `svc` is the service the pod serves.
    pub fn server_span(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        svc: Option<(&ServiceEntry, &Operation)>,
        pod: &Arc<str>,
    ) -> HopSpan {
        let (parent, b3) = self.extract(headers);
        let name = match svc {
            Some((_, op)) => span_name(method, op),
            None => method.to_string(),
        };
        let mut attributes = match svc {
            Some((s, op)) => {
                let mut a = common(method, path, op);
                a.push(KeyValue::new("neutrino.service", Arc::clone(&s.key)));
                a
            }
            None => vec![
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ],
        };
        attributes.push(KeyValue::new("neutrino.pod", Arc::clone(pod)));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        HopSpan { span, b3 }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `<METHOD> <operation id>`, or the route's path template, or the method alone.
fn span_name(method: &Method, op: &Operation) -> String {
    let what = if op.operation_id.is_empty() { &op.path_template } else { &op.operation_id };
    if what.is_empty() { method.to_string() } else { format!("{method} {what}") }
}

/// The attributes both kinds of span carry.
fn common(method: &Method, path: &str, op: &Operation) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(16);
    a.push(KeyValue::new("http.request.method", method.to_string()));
    a.push(KeyValue::new("url.path", path.to_string()));
    if !op.path_template.is_empty() {
        a.push(KeyValue::new("http.route", Arc::clone(&op.path_template)));
    }
    a.push(KeyValue::new("neutrino.operation", Arc::clone(&op.operation_id)));
    a
}

/// One hop's span, from the request head to the response head.
#[derive(Debug)]
pub struct HopSpan {
    span: opentelemetry_sdk::trace::Span,
    /// The B3 form the request came with, also written on the request sent on.
    b3: Option<B3Encoding>,
}

impl HopSpan {
    /// Records the endpoint chosen for an attempt (the last one stays).
    pub fn chose(&mut self, endpoint: &Endpoint, target: SocketAddr, choice: &Choice, attempt: u32) {
        if !self.span.is_recording() {
            return;
        }
        self.span.set_attributes([
            KeyValue::new("network.peer.address", target.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(target.port())),
            KeyValue::new("neutrino.endpoint", target.to_string()),
            KeyValue::new("neutrino.endpoint.pod", Arc::clone(&endpoint.pod)),
            KeyValue::new("neutrino.selection.reason", choice.reason.as_str()),
            KeyValue::new("neutrino.endpoint.utilization", choice.utilization),
            KeyValue::new("neutrino.retries", i64::from(attempt.saturating_sub(1))),
        ]);
        if let Some(id) = &endpoint.identity {
            self.span.set_attribute(KeyValue::new("neutrino.endpoint.identity", Arc::clone(id)));
        }
    }

    /// On a server span: the caller's identity as mesh mTLS verified it ("-" for a
    /// caller without one).
    pub fn set_peer(&mut self, peer: Option<&Arc<str>>) {
        if self.span.is_recording() {
            let v = peer.map(Arc::clone).unwrap_or_else(|| Arc::from("-"));
            self.span.set_attribute(KeyValue::new("neutrino.peer.identity", v));
        }
    }

    /// Writes this span's context on the request sent on, replacing what it carried:
    /// `traceparent`/`tracestate` always, B3 too (in its form) when the request had it.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        if self.b3.is_some() {
            for h in B3_HEADERS {
                headers.remove(h);
            }
        }
        TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(headers));
        if let Some(enc) = &self.b3 {
            opentelemetry_propagator_b3::Propagator::with_encoding(enc.clone())
                .inject_context(&cx, &mut HeadersMut(headers));
        }
    }

    /// Ends the span at the response head: its status, and an error for 5xx (with the
    /// proxy's `x-neutrino-reason` when it answered itself).
    pub fn end(mut self, status: StatusCode, reason: Option<&HeaderValue>) {
        if self.span.is_recording() {
            self.span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
            if status.is_server_error() {
                self.span.set_attribute(KeyValue::new("error.type", status.as_str().to_string()));
                let why = reason.and_then(|r| r.to_str().ok()).unwrap_or_default().to_string();
                self.span.set_status(Status::error(why));
            }
        }
        self.span.end();
    }

    /// This span's trace and span id, hex (tests).
    pub fn ids(&self) -> (String, String) {
        let sc = self.span.span_context();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else { return };
        match HeaderValue::from_str(&value) {
            Ok(v) if !value.is_empty() => {
                self.0.insert(name, v);
            }
            // An empty tracestate is no header at all.
            _ => {
                self.0.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
    use opentelemetry_sdk::trace::SpanData;

    use super::*;

    /// Keeps what it is given; fails while `down`.
    #[derive(Debug, Default, Clone)]
    struct Memory {
        spans: Arc<Mutex<Vec<SpanData>>>,
        down: Arc<AtomicBool>,
    }

    impl SpanExporter for Memory {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.down.load(Ordering::Relaxed) {
                return Err(OTelSdkError::InternalFailure("down".into()));
            }
            self.spans.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn tracing(exporter: Memory, counters: Counters) -> Tracing {
        let runtime = ExportRuntime::new().expect("export runtime");
        Tracing::with_exporter(
            exporter,
            runtime,
            Resource::builder_empty().build(),
            counters,
            Duration::from_secs(1),
            "a.ns",
        )
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn w3c_parent_is_continued_and_replaced_on_the_request_sent_on() {
        let mem = Memory::default();
        let counters = Counters::default();
        let t = tracing(mem.clone(), counters.clone());
        let incoming = headers(&[
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("tracestate", "vendor=x"),
        ]);
        let pod: Arc<str> = Arc::from("b-0");
        let span = t.server_span(&Method::GET, "/items/1", &incoming, None, &pod);
        let (trace_id, span_id) = span.ids();
        assert_eq!(trace_id, "0af7651916cd43dd8448eb211c80319c");
        let mut out = incoming.clone();
        span.inject(&mut out);
        assert_eq!(out["traceparent"], format!("00-{trace_id}-{span_id}-01").as_str());
        assert_eq!(out["tracestate"], "vendor=x");
        span.end(StatusCode::BAD_GATEWAY, Some(&HeaderValue::from_static("connection refused")));
        t.flush().await;
        let spans = mem.spans.lock().unwrap();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(s.parent_span_id.to_string(), "b7ad6b7169203331");
        assert!(s.parent_span_is_remote);
        assert_eq!(s.status, Status::error("connection refused"));
        let attr = |k: &str| s.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.to_string());
        assert_eq!(attr("http.response.status_code").as_deref(), Some("502"));
        assert_eq!(attr("neutrino.pod").as_deref(), Some("b-0"));
        assert_eq!(counters.exported.get(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn b3_is_accepted_on_input_and_answered_in_kind() {
        let t = tracing(Memory::default(), Counters::default());
        let pod: Arc<str> = Arc::from("b-0");
        let single = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let span = t.server_span(&Method::GET, "/", &single, None, &pod);
        let (trace_id, span_id) = span.ids();
        assert_eq!(trace_id, "80f198ee56343ba864fe8b2a57d3eff7");
        let mut out = single.clone();
        span.inject(&mut out);
        assert_eq!(out["traceparent"], format!("00-{trace_id}-{span_id}-01").as_str());
        assert_eq!(out["b3"], format!("{trace_id}-{span_id}-1").as_str());
        span.end(StatusCode::OK, None);

        let multi = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let span = t.server_span(&Method::GET, "/", &multi, None, &pod);
        let (trace_id, span_id) = span.ids();
        assert_eq!(trace_id, "463ac35c9f6413ad48485a3953bb6124");
        let mut out = multi.clone();
        span.inject(&mut out);
        assert_eq!(out["x-b3-spanid"], span_id.as_str());
        assert!(out.contains_key("traceparent"));
        span.end(StatusCode::OK, None);

        // Both: W3C wins, and the B3 header is rewritten to agree with it.
        let both = headers(&[
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("b3", "0af7651916cd43dd8448eb211c80319c-1111111111111111-1"),
        ]);
        let span = t.server_span(&Method::GET, "/", &both, None, &pod);
        let (trace_id, span_id) = span.ids();
        assert_eq!(trace_id, "0af7651916cd43dd8448eb211c80319c");
        let mut out = both.clone();
        span.inject(&mut out);
        assert_eq!(out["b3"], format!("{trace_id}-{span_id}-1").as_str());
        span.end(StatusCode::OK, None);

        // No parent: a new trace, and W3C only on the way out.
        let span = t.server_span(&Method::GET, "/", &HeaderMap::new(), None, &pod);
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        assert!(out.contains_key("traceparent"));
        assert!(!out.contains_key("tracestate") && !out.contains_key("b3"));
        span.end(StatusCode::OK, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_or_a_failed_export_drops_and_counts_never_waits() {
        let mem = Memory::default();
        mem.down.store(true, Ordering::Relaxed);
        let counters = Counters::default();
        let t = tracing(mem.clone(), counters.clone());
        let pod: Arc<str> = Arc::from("b-0");
        let started = std::time::Instant::now();
        let n = neutrino_otel::DEFAULT_QUEUE + 500;
        for _ in 0..n {
            t.server_span(&Method::GET, "/", &HeaderMap::new(), None, &pod).end(StatusCode::OK, None);
        }
        assert!(started.elapsed() < Duration::from_secs(5), "ending spans never waits");
        t.flush().await;
        t.shutdown().await;
        assert_eq!(counters.exported.get(), 0);
        assert_eq!(counters.dropped.get(), n as u64, "every span is dropped: by the queue or the failed export");
        assert!(counters.export_failures.get() >= 1);
    }
}
