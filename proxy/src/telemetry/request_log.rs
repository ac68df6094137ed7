//! The request log: one record per request in a Redis Stream, written off the request
//! path. Requests hand a record to a bounded queue with `try_send`; one task drains it
//! in batches of pipelined `XADD ... MAXLEN ~`. When Redis is slow or down the queue
//! fills and records are dropped and counted: a request never waits for the log.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

/// One request, as logged.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Milliseconds since the Unix epoch when the response head was known.
    pub time_ms: u64,
    pub trace_id: String,
    /// Who sent it: this proxy's node id (`<pod>.<namespace>`).
    pub source: Arc<str>,
    /// The sender's SPIFFE id, when it has a mesh identity ("" otherwise).
    pub source_identity: Arc<str>,
    pub service: Arc<str>,
    pub operation: Arc<str>,
    pub endpoint: String,
    pub endpoint_pod: Arc<str>,
    /// The SPIFFE id the endpoint proved over mTLS ("" when it was called in plaintext).
    pub endpoint_identity: Arc<str>,
    pub status: u16,
    pub latency_us: u64,
    /// cpu millis, memory bytes, GPUs.
    pub cost: [u64; 3],
    /// Why that endpoint: the selection reason and its utilization with the request.
    pub reason: String,
    pub attempts: u32,
}

impl Record {
    fn fields(&self) -> [(&'static str, String); 15] {
        [
            ("time_ms", self.time_ms.to_string()),
            ("trace_id", self.trace_id.clone()),
            ("source", self.source.to_string()),
            ("source_identity", self.source_identity.to_string()),
            ("service", self.service.to_string()),
            ("operation", self.operation.to_string()),
            ("endpoint", self.endpoint.clone()),
            ("endpoint_pod", self.endpoint_pod.to_string()),
            ("endpoint_identity", self.endpoint_identity.to_string()),
            ("status", self.status.to_string()),
            ("latency_us", self.latency_us.to_string()),
            ("cost_cpu_millis", self.cost[0].to_string()),
            ("cost_memory_bytes", self.cost[1].to_string()),
            ("cost_gpu", self.cost[2].to_string()),
            ("reason", format!("{} (attempts {})", self.reason, self.attempts)),
        ]
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub redis_url: String,
    pub stream: String,
    /// Approximate length the stream is trimmed to.
    pub max_len: u64,
    pub queue: usize,
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct RequestLog {
    tx: mpsc::Sender<Record>,
    dropped: Counter,
}

impl RequestLog {
    /// Queues a record; drops and counts it when the queue is full.
    pub fn record(&self, r: Record) {
        if self.tx.try_send(r).is_err() {
            self.dropped.inc();
        }
    }
}

const BATCH: usize = 256;

/// Starts the writer task. `written` and `dropped` count records in and out of Redis.
pub fn spawn(settings: Settings, written: Counter, dropped: Counter) -> Result<RequestLog, redis::RedisError> {
    let client = redis::Client::open(settings.redis_url.as_str())?;
    let (tx, mut rx) = mpsc::channel::<Record>(settings.queue);
    let log = RequestLog { tx, dropped: dropped.clone() };
    tokio::spawn(async move {
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut backoff = Duration::from_millis(100);
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if conn.is_none() {
                match tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await {
                    Ok(Ok(c)) => {
                        conn = Some(c);
                        backoff = Duration::from_millis(100);
                    }
                    Ok(Err(e)) => tracing::debug!("request log: connecting to Redis: {e}"),
                    Err(_) => tracing::debug!("request log: connecting to Redis timed out"),
                }
            }
            let Some(c) = conn.as_mut() else {
                dropped.inc_by(batch.len() as u64);
                batch.clear();
                // Redis is away: shed what piles up meanwhile rather than hold it.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            let mut pipe = redis::pipe();
            for r in &batch {
                let cmd = pipe.cmd("XADD").arg(&settings.stream).arg("MAXLEN").arg("~").arg(settings.max_len).arg("*");
                for (k, v) in r.fields() {
                    cmd.arg(k).arg(v);
                }
                cmd.ignore();
            }
            match tokio::time::timeout(Duration::from_secs(1), pipe.query_async::<()>(c)).await {
                Ok(Ok(())) => {
                    written.inc_by(batch.len() as u64);
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::warn!(records = batch.len(), "request log: writing to Redis failed ({why}); dropped");
                    dropped.inc_by(batch.len() as u64);
                    conn = None;
                }
            }
            batch.clear();
        }
    });
    Ok(log)
}
