//! Trace: one span per Discovery push, from the response leaving to the proxy's answer.
//!
//! A push span (`push <Kind>`, kind PRODUCER) carries the proxy, the type, the nonce,
//! the snapshot generation and how many resources and removals it held. The proxy's
//! ACK ends it OK; a NACK ends it with an error status and the proxy's reasons as an
//! event; a stream that ends first ends it with an error saying so. Exported over
//! OTLP/gRPC through `neutrino_otel` (bounded queue, own export runtime), configured by
//! `--otlp-endpoint` or the standard `OTEL_*` variables, sampled as the SDK's sampler
//! says (`OTEL_TRACES_SAMPLER`). Off unless an endpoint is configured. It must not
//! delay or change a push: spans are handed over without waiting.

use std::borrow::Cow;

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

/// The control plane's tracer, when tracing is on.
#[derive(Debug)]
pub struct PushTracer {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// One push, in flight until the proxy answers.
#[derive(Debug)]
pub struct PushSpan(Span);

/// What a push span records about the response.
#[derive(Debug, Clone, Copy)]
pub struct Push<'a> {
    pub node: &'a str,
    pub type_url: &'a str,
    pub nonce: &'a str,
    pub generation: u64,
    pub resources: usize,
    pub removed: usize,
}

impl PushTracer {
    /// Starts exporting when an endpoint is configured (`endpoint`, or the `OTEL_*`
    /// variables); `Ok(None)` when tracing is off.
    pub fn start(
        endpoint: Option<&str>,
        replica: &str,
        counters: neutrino_otel::Counters,
    ) -> Result<Option<PushTracer>, String> {
        if !neutrino_otel::enabled(endpoint) {
            return Ok(None);
        }
        let (exporter, runtime, timeout) = neutrino_otel::otlp_exporter(endpoint)?;
        let resource = neutrino_otel::resource(
            "neutrino-control-plane",
            vec![KeyValue::new("service.instance.id", replica.to_string())],
        );
        let provider = neutrino_otel::provider(exporter, runtime, resource, counters, timeout);
        let scope =
            InstrumentationScope::builder("neutrino-control-plane").with_version(env!("CARGO_PKG_VERSION")).build();
        let tracer = provider.tracer_with_scope(scope);
        Ok(Some(PushTracer { provider, tracer }))
    }

    /// The span of a response being sent.
    pub fn push(&self, p: Push<'_>) -> PushSpan {
        let kind = neutrino_proto::type_url::short(p.type_url).to_string();
        let span = self
            .tracer
            .span_builder(format!("push {kind}"))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("neutrino.node", p.node.to_string()),
                KeyValue::new("neutrino.resource.kind", kind),
                KeyValue::new("neutrino.nonce", p.nonce.to_string()),
                KeyValue::new("neutrino.generation", i64::try_from(p.generation).unwrap_or(i64::MAX)),
                KeyValue::new("neutrino.resources", i64::try_from(p.resources).unwrap_or(i64::MAX)),
                KeyValue::new("neutrino.removed", i64::try_from(p.removed).unwrap_or(i64::MAX)),
            ])
            .start(&self.tracer);
        PushSpan(span)
    }

    /// Exports what is queued and stops.
    pub async fn shutdown(&self) {
        neutrino_otel::shutdown(&self.provider).await;
    }
}

impl PushSpan {
    /// The proxy accepted the update.
    pub fn acked(mut self) {
        self.0.set_attribute(KeyValue::new("neutrino.outcome", "ack"));
        self.0.set_status(Status::Ok);
        self.0.end();
    }

    /// The proxy rejected it: its message and one event attribute per reason.
    pub fn nacked(mut self, message: &str, reasons: &[String]) {
        self.0.set_attribute(KeyValue::new("neutrino.outcome", "nack"));
        let attrs: Vec<KeyValue> =
            reasons.iter().enumerate().map(|(i, r)| KeyValue::new(format!("neutrino.reason.{i}"), r.clone())).collect();
        self.0.add_event("nack", attrs);
        self.0.set_status(Status::error(Cow::Owned(format!("proxy rejected the update: {message}"))));
        self.0.end();
    }

    /// The stream ended before the proxy answered.
    pub fn abandoned(mut self, why: &'static str) {
        self.0.set_attribute(KeyValue::new("neutrino.outcome", "unanswered"));
        self.0.set_status(Status::error(why));
        self.0.end();
    }
}
