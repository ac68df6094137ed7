//! The demo's OTLP/gRPC trace receiver: the trace service of an OpenTelemetry collector on
//! an ephemeral loopback port, keeping every span it is sent (up to [`MAX_SPANS`]) in
//! memory, and telling waiters when more arrive. It accepts every export and never makes
//! an exporter wait on anything but a short lock; it must not filter or change spans.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Spans kept at most; more are counted and dropped (the demo sends a few thousand).
pub const MAX_SPANS: usize = 200_000;
/// The largest export accepted (the exporters send batches of at most 512 spans).
const MAX_MESSAGE: usize = 32 << 20;

#[derive(Debug, Error)]
pub enum ReceiveError {
    #[error("the demo's trace receiver could not listen on 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct Kept {
    batches: Vec<ResourceSpans>,
    spans: usize,
}

#[derive(Debug)]
struct Shared {
    kept: Mutex<Kept>,
    dropped: AtomicU64,
    /// The number of spans kept, for waiters.
    count: watch::Sender<usize>,
}

impl Shared {
    fn kept(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone)]
struct Service(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let batch = req.into_inner().resource_spans;
        let n: usize = batch.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum();
        let total = {
            let mut kept = self.0.kept();
            if kept.spans + n > MAX_SPANS {
                self.0.dropped.fetch_add(n as u64, Ordering::Relaxed);
                None
            } else {
                kept.batches.extend(batch);
                kept.spans += n;
                Some(kept.spans)
            }
        };
        if let Some(total) = total {
            self.0.count.send_replace(total);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// What [`Receiver::settle`] saw last.
#[derive(Debug)]
pub struct Settled<T> {
    /// What the `ready` check found, if anything, on `batches`.
    pub found: Option<T>,
    pub batches: Vec<ResourceSpans>,
}

impl Receiver {
    /// Listens on an ephemeral port of 127.0.0.1 and serves OTLP/gRPC there.
    pub async fn start() -> Result<Receiver, ReceiveError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(ReceiveError::Bind)?;
        let addr = listener.local_addr().map_err(ReceiveError::Bind)?;
        let shared =
            Arc::new(Shared { kept: Mutex::default(), dropped: AtomicU64::new(0), count: watch::channel(0).0 });
        let svc = TraceServiceServer::new(Service(Arc::clone(&shared))).max_decoding_message_size(MAX_MESSAGE);
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(async move {
            let serve =
                tonic::transport::Server::builder().add_service(svc).serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                });
            if let Err(e) = serve.await {
                eprintln!("warning: the demo's trace receiver stopped: {e}");
            }
        });
        Ok(Receiver { shared, addr, _stop: stop })
    }

    /// Where exporters send: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything received so far.
    pub fn batches(&self) -> Vec<ResourceSpans> {
        self.shared.kept().batches.clone()
    }

    /// Spans not kept because [`MAX_SPANS`] were.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits, at most `limit`, until `ready` finds something in what was received and
    /// `progress` (a count of the spans that matter) has not moved for `quiet`; wakes on
    /// each export, never polls. Returns what it found, if anything, and all spans.
    pub async fn settle<T>(
        &self,
        limit: Duration,
        quiet: Duration,
        ready: impl Fn(&[ResourceSpans]) -> Option<T>,
        progress: impl Fn(&[ResourceSpans]) -> usize,
    ) -> Settled<T> {
        let deadline = Instant::now() + limit;
        let mut changes = self.shared.count.subscribe();
        let (mut last, mut moved) = (None, Instant::now());
        loop {
            changes.borrow_and_update();
            let (found, count) = {
                let kept = self.shared.kept();
                (ready(&kept.batches), progress(&kept.batches))
            };
            let now = Instant::now();
            if last != Some(count) {
                (last, moved) = (Some(count), now);
            }
            let done_at = if found.is_some() { (moved + quiet).min(deadline) } else { deadline };
            if now >= done_at {
                return Settled { found, batches: self.batches() };
            }
            // Woken by more spans, or at `done_at`: either way, look again.
            if let Ok(Err(_)) = tokio::time::timeout_at(done_at, changes.changed()).await {
                return Settled { found, batches: self.batches() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span};

    use super::*;

    fn batch(n: usize) -> ExportTraceServiceRequest {
        let spans = (0..n).map(|i| Span { name: format!("s{i}"), ..Default::default() }).collect();
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    fn count(b: &[ResourceSpans]) -> usize {
        b.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum()
    }

    #[tokio::test]
    async fn keeps_what_exporters_send_and_settles_once_it_is_quiet() {
        let receiver = Receiver::start().await.unwrap();
        let mut client = TraceServiceClient::connect(receiver.endpoint()).await.unwrap();
        client.export(batch(2)).await.unwrap();
        let started = Instant::now();
        let quiet = Duration::from_millis(200);
        let sending = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.export(batch(3)).await.unwrap();
        });
        // Ready from the start, but spans keep arriving: it waits until they stop.
        let settled = receiver.settle(Duration::from_secs(5), quiet, |b| Some(count(b)), count).await;
        sending.await.unwrap();
        assert_eq!(count(&settled.batches), 5);
        assert!(started.elapsed() >= quiet && started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());

        // Never ready: it gives up at the limit with what it has.
        let started = Instant::now();
        let settled = receiver.settle(Duration::from_millis(300), quiet, |_| None::<()>, count).await;
        assert!(settled.found.is_none());
        assert_eq!(count(&settled.batches), 5);
        assert!(started.elapsed() >= Duration::from_millis(300) && started.elapsed() < Duration::from_secs(3));
        assert_eq!(receiver.dropped(), 0);
    }
}
