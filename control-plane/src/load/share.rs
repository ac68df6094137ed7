//! Share: control-plane replicas exchange load reports through Redis, so each pushes
//! the global view whichever replica a proxy is connected to.
//!
//! Each report a proxy sends to this replica is written as a key with a TTL (for
//! replicas that start or reconnect later: they read all keys to catch up) and
//! published on a channel (for replicas already listening). Reports from the channel
//! go to the aggregator like local ones; the newest measurement wins there, so echoes
//! and reordering are harmless. When Redis is away, this replica keeps serving what its
//! own proxies report, says "degraded" in `/ready` and metrics, and catches up when
//! Redis returns. It must not block the aggregator: writes go through a bounded queue
//! that drops when full.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{PodReport, ShareStatus};
use crate::metrics::{Metrics, OriginLabel};
use crate::model::LoadReport;
use crate::translate::REPORT_TTL_MS;

#[derive(Debug, Clone)]
pub struct ShareSettings {
    pub redis_url: String,
    /// This replica's name, so it can ignore its own messages.
    pub replica: String,
    /// Prefix of keys and the channel name, e.g. "neutrino:load".
    pub prefix: String,
}

/// One report as it travels through Redis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Wire {
    pub replica: String,
    pub pod: String,
    pub report: LoadReport,
}

/// The aggregator's handle to the writer.
#[derive(Debug)]
pub struct Share {
    tx: mpsc::Sender<Wire>,
    replica: String,
    metrics: Arc<Metrics>,
}

impl Share {
    pub fn publish(&self, pod: &str, report: LoadReport) {
        let wire = Wire { replica: self.replica.clone(), pod: pod.to_string(), report };
        if self.tx.try_send(wire).is_err() {
            self.metrics.redis_writes_dropped.inc();
        }
    }
}

/// Starts the writer and the listener; reports from other replicas go to `to_aggregator`.
pub fn spawn(
    settings: ShareSettings,
    to_aggregator: mpsc::Sender<PodReport>,
    status: Arc<ArcSwap<ShareStatus>>,
    metrics: Arc<Metrics>,
) -> Share {
    let (tx, rx) = mpsc::channel(4096);
    let client = match redis::Client::open(settings.redis_url.as_str()) {
        Ok(c) => Some(c),
        Err(e) => {
            // Checked at start-up by the binary; here only a library caller can get it wrong.
            set_status(&status, "degraded", Some(format!("redis url {:?}: {e}", settings.redis_url)));
            None
        }
    };
    if let Some(client) = client {
        tokio::spawn(write(client.clone(), settings.clone(), rx, Arc::clone(&metrics)));
        tokio::spawn(listen(client, settings.clone(), to_aggregator, status, Arc::clone(&metrics)));
    }
    Share { tx, replica: settings.replica, metrics }
}

fn set_status(status: &ArcSwap<ShareStatus>, state: &str, error: Option<String>) {
    let mut s = ShareStatus::clone(&status.load());
    s.state = state.to_string();
    if error.is_some() || state == "connected" {
        s.last_error = error;
    }
    status.store(Arc::new(s));
}

const BATCH: usize = 512;

/// Writes this replica's reports: `SET key value PX ttl` and `PUBLISH`, pipelined.
async fn write(client: redis::Client, settings: ShareSettings, mut rx: mpsc::Receiver<Wire>, metrics: Arc<Metrics>) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        if conn.is_none() {
            conn = connect(&client).await.ok();
        }
        let Some(c) = conn.as_mut() else {
            // Redis is away: these reports still count locally; others will catch up
            // from the next ones once it is back.
            metrics.redis_writes_dropped.inc_by(batch.len() as u64);
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        for w in &batch {
            let Ok(json) = serde_json::to_string(w) else { continue };
            pipe.cmd("SET")
                .arg(format!("{}:{}", settings.prefix, w.pod))
                .arg(&json)
                .arg("PX")
                .arg(REPORT_TTL_MS)
                .ignore();
            pipe.cmd("PUBLISH").arg(&settings.prefix).arg(&json).ignore();
        }
        match tokio::time::timeout(Duration::from_secs(1), pipe.query_async::<()>(c)).await {
            Ok(Ok(())) => {
                metrics.redis_writes.inc_by(batch.len() as u64);
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::debug!("load share: writing {} report(s) to Redis failed: {why}", batch.len());
                metrics.redis_writes_dropped.inc_by(batch.len() as u64);
                conn = None;
            }
        }
        batch.clear();
    }
}

async fn connect(client: &redis::Client) -> Result<redis::aio::MultiplexedConnection, String> {
    match tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connecting timed out".into()),
    }
}

/// Listens for other replicas' reports; on every (re)connect, first catches up from
/// the keys. Reconnects with backoff while Redis is away.
async fn listen(
    client: redis::Client,
    settings: ShareSettings,
    to_aggregator: mpsc::Sender<PodReport>,
    status: Arc<ArcSwap<ShareStatus>>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let why = match session(&client, &settings, &to_aggregator, &status, &metrics).await {
            Ok(()) => "the connection closed".to_string(),
            Err(e) => e,
        };
        metrics.redis_connected.set(0);
        if to_aggregator.is_closed() {
            return;
        }
        tracing::warn!(
            "load share: Redis at {} unavailable ({why}); serving this replica's own reports, retrying in {backoff:?}",
            settings.redis_url
        );
        set_status(&status, "degraded", Some(format!("redis {}: {why}", settings.redis_url)));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        if why == "the connection closed" {
            backoff = Duration::from_millis(100);
        }
    }
}

async fn session(
    client: &redis::Client,
    settings: &ShareSettings,
    to_aggregator: &mpsc::Sender<PodReport>,
    status: &ArcSwap<ShareStatus>,
    metrics: &Metrics,
) -> Result<(), String> {
    let timeout = Duration::from_secs(2);
    let mut pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| e.to_string())?;
    // Subscribe before reading the keys: nothing published in between is missed.
    pubsub.subscribe(&settings.prefix).await.map_err(|e| e.to_string())?;
    let caught_up = catch_up(client, settings, to_aggregator, metrics).await?;
    tracing::info!(reports = caught_up, "load share: connected to Redis at {}", settings.redis_url);
    set_status(status, "connected", None);
    metrics.redis_connected.set(1);
    let mut messages = pubsub.into_on_message();
    while let Some(msg) = messages.next().await {
        let Ok(payload) = msg.get_payload::<String>() else { continue };
        deliver(&payload, settings, to_aggregator, metrics);
    }
    Ok(())
}

/// Reads every report key (those of pods whose report has not expired).
async fn catch_up(
    client: &redis::Client,
    settings: &ShareSettings,
    to_aggregator: &mpsc::Sender<PodReport>,
    metrics: &Metrics,
) -> Result<usize, String> {
    let mut conn = connect(client).await?;
    let pattern = format!("{}:*", settings.prefix);
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut n = 0;
    for chunk in keys.chunks(500) {
        let values: Vec<Option<String>> =
            redis::cmd("MGET").arg(chunk).query_async(&mut conn).await.map_err(|e| e.to_string())?;
        for v in values.into_iter().flatten() {
            n += usize::from(deliver(&v, settings, to_aggregator, metrics));
        }
    }
    Ok(n)
}

/// Hands one wire report from another replica to the aggregator; false when it was
/// this replica's own, malformed, or dropped.
fn deliver(
    payload: &str,
    settings: &ShareSettings,
    to_aggregator: &mpsc::Sender<PodReport>,
    metrics: &Metrics,
) -> bool {
    let Ok(w) = serde_json::from_str::<Wire>(payload) else {
        metrics.redis_malformed.inc();
        return false;
    };
    if w.replica == settings.replica {
        return false;
    }
    let sent = to_aggregator.try_send(PodReport { pod: w.pod, report: w.report, local: false }).is_ok();
    if sent {
        metrics.load_reports.get_or_create(&OriginLabel { origin: "redis" }).inc();
    } else {
        metrics.load_reports_dropped.inc();
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_and_malformed_messages_are_not_delivered() {
        let settings =
            ShareSettings { redis_url: String::new(), replica: "cp-a".into(), prefix: "neutrino:load".into() };
        let (tx, mut rx) = mpsc::channel(4);
        let metrics = Metrics::default();
        let report = LoadReport { in_flight: [5, 0, 0], measured_at_ms: 99 };
        let json = |replica: &str| {
            serde_json::to_string(&Wire { replica: replica.into(), pod: "ns/p".into(), report }).expect("json")
        };
        assert!(!deliver(&json("cp-a"), &settings, &tx, &metrics), "our own echo");
        assert!(!deliver("{not json", &settings, &tx, &metrics));
        assert!(deliver(&json("cp-b"), &settings, &tx, &metrics));
        let got = rx.try_recv().expect("delivered");
        assert_eq!((got.pod.as_str(), got.report, got.local), ("ns/p", report, false));
        assert_eq!(metrics.redis_malformed.get(), 1);
    }
}
