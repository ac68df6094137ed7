//! What stands between an ended span and the OTLP collector. A bounded count in front of the SDK's batch processor (a span that
//! finds the queue full is dropped and counted, never waited for), and each export run
//! on a runtime of its own under a deadline, its outcome counted. It must not block the
//! thread that ends a span, nor run exports on the threads that serve requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanData, SpanExporter, SpanProcessor};

use super::Counters;

/// The processor in front of the SDK's batch processor: a span that ends when
/// `queue` spans already wait for export is dropped and counted, never waited for.
/// (The SDK's processor drops too when its queue is full, but does not say how many.)
#[derive(Debug)]
pub(super) struct Bounded {
    pub(super) inner: BatchSpanProcessor,
    /// Spans handed to `inner` and not yet given to the exporter.
    pub(super) pending: Arc<AtomicUsize>,
    pub(super) queue: usize,
    pub(super) counters: Counters,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.counters.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Runs each export of `inner` on the tokio runtime, under a deadline, and counts the
/// outcome. The batch processor's thread waits for it; requests never do.
#[derive(Debug)]
pub(super) struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: ExportRuntime,
    timeout: Duration,
    pending: Arc<AtomicUsize>,
    counters: Counters,
    /// Whether the last export failed: logged on change only.
    failing: AtomicBool,
}

impl<E> OnRuntime<E> {
    pub(super) fn new(
        inner: E,
        runtime: ExportRuntime,
        timeout: Duration,
        pending: &Arc<AtomicUsize>,
        counters: &Counters,
    ) -> Self {
        OnRuntime {
            inner: Arc::new(inner),
            runtime,
            timeout,
            pending: Arc::clone(pending),
            counters: counters.clone(),
            failing: AtomicBool::new(false),
        }
    }
}

/// A one-thread tokio runtime for exports (tonic needs a runtime), apart from the
/// threads that serve requests: encoding and sending a batch never takes their time.
#[derive(Debug)]
pub struct ExportRuntime(Option<tokio::runtime::Runtime>);

impl ExportRuntime {
    pub fn new() -> std::io::Result<ExportRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        Ok(ExportRuntime(Some(rt)))
    }

    /// Runs `f` with this runtime as the current one (tasks it spawns land here).
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.0 {
            Some(rt) => {
                let _guard = rt.enter();
                f()
            }
            None => f(),
        }
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(|rt| rt.handle())
    }
}

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        // Dropped from async code at shutdown: a runtime may only be let go in the background there.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.pending.fetch_sub(n, Ordering::AcqRel);
        let inner = Arc::clone(&self.inner);
        let timeout = self.timeout;
        let Some(runtime) = self.runtime.handle() else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        let outcome = runtime
            .spawn(async move { tokio::time::timeout(timeout, inner.export(batch)).await })
            .await
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))
            .and_then(|r| r.map_err(|_| OTelSdkError::Timeout(timeout)))
            .and_then(|r| r);
        match &outcome {
            Ok(()) => {
                self.counters.exported.inc_by(n as u64);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("traces: exporting again");
                }
            }
            Err(e) => {
                self.counters.export_failures.inc();
                self.counters.dropped.inc_by(n as u64);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!("traces: export failed, {n} spans dropped: {e} (further failures are counted only)");
                }
            }
        }
        outcome
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.set_resource(resource),
            None => tracing::warn!("traces: the resource could not be set on the exporter"),
        }
    }
}
