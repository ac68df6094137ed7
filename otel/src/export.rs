//! What stands between an ended span and the OTLP collector. A bounded count in front of the SDK's batch processor (a span that
//! finds the queue full is dropped and counted, never waited for), and each export run
//! on a runtime of its own under a deadline, its outcome counted. It must not block the
//! thread that ends a span, nor run exports on the threads that serve requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    /// After a failure, batches are dropped without an attempt until `until`: a collector
    /// that is down would otherwise cost a proto conversion and a connection attempt per
    /// batch (~6 µs of CPU per span, measured), CPU the node's requests need. Only the
    /// batch processor's thread calls `export`, so this lock is never contended.
    backoff: std::sync::Mutex<Backoff>,
}

/// When exports may be tried again, and the wait after the next failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Backoff {
    pub(super) until: Option<Instant>,
    pub(super) next: Duration,
}

/// The first wait after a failure, doubled after each failed attempt up to [`BACKOFF_MAX`].
pub(super) const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Default for Backoff {
    fn default() -> Self {
        Backoff { until: None, next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// Whether a batch arriving at `now` is to be tried.
    pub(super) fn may_try(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now >= until)
    }

    /// The state after an attempt that ended at `now`.
    pub(super) fn after(self, ok: bool, now: Instant) -> Backoff {
        match ok {
            true => Backoff::default(),
            false => Backoff { until: Some(now + self.next), next: (self.next * 2).min(BACKOFF_MAX) },
        }
    }
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
            backoff: std::sync::Mutex::new(Backoff::default()),
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
        let backoff = *self.backoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !backoff.may_try(Instant::now()) {
            self.counters.dropped.inc_by(n as u64);
            return Err(OTelSdkError::InternalFailure("the collector failed recently; batch dropped".into()));
        }
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
        let mut state = self.backoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *state = state.after(outcome.is_ok(), Instant::now());
        drop(state);
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
                    tracing::warn!(
                        "traces: export failed, {n} spans dropped: {e}; retrying after {} s, then backing off up \
                         to {} s (further failures are counted only)",
                        BACKOFF_MIN.as_secs(),
                        BACKOFF_MAX.as_secs()
                    );
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::AtomicU32;

    use super::*;

    #[test]
    fn a_failure_waits_doubling_up_to_the_cap_and_a_success_resets() {
        let t0 = Instant::now();
        let b = Backoff::default();
        assert!(b.may_try(t0));
        let b = b.after(false, t0);
        assert!(!b.may_try(t0 + Duration::from_millis(999)));
        assert!(b.may_try(t0 + BACKOFF_MIN));
        let mut b = b;
        for _ in 0..10 {
            b = b.after(false, t0);
        }
        assert_eq!(b.next, BACKOFF_MAX);
        assert!(!b.may_try(t0 + BACKOFF_MAX - Duration::from_millis(1)));
        assert_eq!(b.after(true, t0), Backoff::default());
    }

    /// Fails every call, counting them.
    #[derive(Debug, Default)]
    struct Down(Arc<AtomicU32>);

    impl SpanExporter for Down {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.fetch_add(1, Ordering::Relaxed);
            Err(OTelSdkError::InternalFailure("refused".into()))
        }
    }

    #[test]
    fn batches_after_a_failure_are_dropped_and_counted_without_an_attempt() {
        let calls = Arc::new(AtomicU32::new(0));
        let counters = Counters::default();
        let pending = Arc::new(AtomicUsize::new(0));
        let runtime = ExportRuntime::new().unwrap();
        let exporter = OnRuntime::new(Down(Arc::clone(&calls)), runtime, Duration::from_secs(1), &pending, &counters);
        let batch = || vec![test_span(); 3];
        for _ in 0..5 {
            pending.fetch_add(3, Ordering::AcqRel);
            assert!(futures_executor(exporter.export(batch())).is_err());
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1, "one attempt, then the backoff");
        assert_eq!(counters.dropped.get(), 15, "every span counted as dropped");
        assert_eq!(counters.export_failures.get(), 1);
        assert_eq!(pending.load(Ordering::Acquire), 0);
    }

    fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    fn test_span() -> SpanData {
        use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status};
        SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "t".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }
}
