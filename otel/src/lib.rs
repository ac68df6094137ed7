//! Trace export for every Neutrino binary that traces: the proxy (a span per request)
//! and the control plane (a span per push). One pipeline: an OTLP/gRPC exporter
//! configured by the standard `OTEL_*` variables, a bounded queue in front of the SDK's
//! batch processor, and exports run on a one-thread runtime of their own under a short
//! deadline. Whatever the collector does, the code that ends a span never waits: spans
//! that find the queue full, or whose export fails, are dropped and counted.
//!
//! It must not make spans itself, nor decide what is sampled (the SDK's sampler reads
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`; unset, parent-based always-on).

mod export;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanExporter};
use prometheus_client::metrics::counter::Counter;

pub use export::ExportRuntime;
use export::{Bounded, OnRuntime};

/// The queue of ended spans waiting for export, unless `OTEL_BSP_MAX_QUEUE_SIZE` says.
pub const DEFAULT_QUEUE: usize = 2048;
/// One export's deadline, unless `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` or
/// `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds) says: short, so a slow collector costs
/// queue room, never the traced work.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for the last spans to be exported.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// What happens to ended spans, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans lost: the queue was full when they ended, or their export failed.
    pub dropped: Counter,
    /// Export calls that failed or missed their deadline.
    pub export_failures: Counter,
}

/// True when an OTLP endpoint is configured (`flag`, or the `OTEL_EXPORTER_OTLP_*`
/// variables) and neither `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
pub fn enabled(flag: Option<&str>) -> bool {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let configured = flag.is_some()
        || var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    configured && !disabled
}

fn env_ms(keys: &[&str]) -> Option<Duration> {
    keys.iter().find_map(|k| std::env::var(k).ok()?.trim().parse::<u64>().ok()).map(Duration::from_millis)
}

fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok()?.trim().parse().ok().filter(|&n| n > 0)
}

/// The OTLP/gRPC exporter (to `endpoint`, else where `OTEL_*` says), built on its own
/// export runtime; with the deadline each export gets.
pub fn otlp_exporter(
    endpoint: Option<&str>,
) -> Result<(opentelemetry_otlp::SpanExporter, ExportRuntime, Duration), String> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig as _};
    let timeout =
        env_ms(&["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]).unwrap_or(DEFAULT_EXPORT_TIMEOUT);
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_timeout(timeout);
    if let Some(e) = endpoint {
        builder = builder.with_endpoint(e.to_string());
    }
    // The deadline bounds an export whole; the processor's queue absorbs the rest.
    builder = builder.with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled());
    let runtime = ExportRuntime::new().map_err(|e| e.to_string())?;
    // Built inside the export runtime, so the gRPC channel's own tasks run there too.
    let exporter = runtime.enter(|| builder.build()).map_err(|e| e.to_string())?;
    Ok((exporter, runtime, timeout))
}

/// The resource spans are reported under: `default_service` as `service.name` unless
/// `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) says otherwise,
/// this build's version, and `attributes`.
pub fn resource(default_service: &'static str, attributes: Vec<KeyValue>) -> Resource {
    let mut resource = Resource::builder();
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .is_ok_and(|a| a.split(',').any(|kv| kv.trim_start().starts_with("service.name=")));
    if !named {
        resource = resource.with_service_name(default_service);
    }
    resource
        .with_attributes(attributes)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A tracer provider over `exporter`: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`,
/// default [`DEFAULT_QUEUE`]) in front of the SDK's batch processor, each export run on
/// `runtime` within `timeout`, outcomes counted in `counters`.
pub fn provider<E: SpanExporter + 'static>(
    exporter: E,
    runtime: ExportRuntime,
    resource: Resource,
    counters: Counters,
    timeout: Duration,
) -> SdkTracerProvider {
    let queue = env_usize("OTEL_BSP_MAX_QUEUE_SIZE").unwrap_or(DEFAULT_QUEUE);
    let pending = Arc::new(AtomicUsize::new(0));
    let exporter = OnRuntime::new(exporter, runtime, timeout + Duration::from_millis(100), &pending, &counters);
    // The rest of the batch settings (OTEL_BSP_SCHEDULE_DELAY, ..._MAX_EXPORT_BATCH_SIZE)
    // come from the environment.
    let config = BatchConfigBuilder::default().with_max_queue_size(queue).build();
    let processor = Bounded { inner: BatchSpanProcessor::new(exporter, config), pending, queue, counters };
    SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build()
}

/// Exports what is queued and stops, waiting at most [`SHUTDOWN_TIMEOUT`] (off the
/// async threads: the SDK's shutdown blocks).
pub async fn shutdown(provider: &SdkTracerProvider) {
    let provider = provider.clone();
    let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)).await;
    if let Ok(Err(e)) = done {
        tracing::warn!("traces: shutdown: {e}");
    }
}

/// Exports what is queued now (tests).
pub async fn flush(provider: &SdkTracerProvider) {
    let provider = provider.clone();
    let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
}
