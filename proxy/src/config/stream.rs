//! Source of config in mesh mode: the Discovery stream to the control plane.
//!
//! Subscribes to every resource type, hands each response to the applier and answers
//! it with an ACK or a NACK carrying the applier's reasons. On any failure it
//! reconnects with exponential backoff and jitter and resumes with the versions it
//! holds, so unchanged resources are not sent again. While the control plane is away
//! the last good snapshot keeps serving. Given several control-plane addresses, each
//! reconnect tries the next. It also carries the pod's load reports (out of band) to
//! the control plane. It must not validate or publish by itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use neutrino_proto::discovery_client::DiscoveryClient;
use neutrino_proto::{
    CODE_INVALID_ARGUMENT, DiscoveryRequest, DiscoveryResponse, ErrorDetail, Node, WILDCARD, type_url,
};
use rand::Rng;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Applier, Update};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// "host:port" or "http://host:port"; several, comma-separated, are tried in turn.
    pub control_plane: String,
    pub node: Node,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// When set, the control plane is reached over TLS verified against these anchors
    /// (its TLS port, 15012); plaintext otherwise.
    pub trust: Option<Arc<crate::identity::tls::Trust>>,
}

/// The stream's state, for `/config_dump`. Written only by the stream task.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStatus {
    /// The address of the current (or last) stream.
    pub control_plane: String,
    /// "connecting", "connected", "disconnected" or "local" (file mode).
    pub state: String,
    /// Streams established so far; more than one means the proxy reconnected.
    pub connects: u64,
    pub last_error: Option<String>,
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub responses: u64,
    pub resources_received: u64,
    pub removals_received: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_nonce: String,
    pub last_system_version: String,
    /// Reasons of the most recent NACK, until a later update is accepted.
    pub last_nack: Option<Vec<String>>,
}

#[derive(Debug, Error)]
enum SessionError {
    #[error(
        "connecting to the control plane at {addr}: {cause}; check NEUTRINO_CONTROL_PLANE (the TLS port 15012 with --ca-file) and that the control plane is running"
    )]
    Connect { addr: String, cause: String },
    #[error("control plane address {0:?} is not a valid URI; use host:port or http://host:port")]
    Address(String),
    #[error("opening the discovery stream: {0}")]
    Open(tonic::Status),
    #[error("discovery stream failed: {0}")]
    Stream(tonic::Status),
    #[error("the control plane closed the discovery stream")]
    Closed,
}

/// Exponential backoff with jitter: `min * 2^attempt`, capped at `max`, then scaled
/// into [50 %, 100 %] by `unit` (a uniform random number in [0, 1)).
pub fn backoff(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    exp.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

/// The addresses in a `control_plane` setting, in order.
pub fn addresses(control_plane: &str) -> Vec<String> {
    control_plane.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect()
}

/// Runs forever: connect, stream, and on failure wait and reconnect (to the next
/// control-plane address, when there are several).
pub async fn run(
    settings: StreamSettings,
    applier: Applier,
    status: Arc<ArcSwap<StreamStatus>>,
    metrics: Arc<Metrics>,
    mut reports: Option<crate::LoadReports>,
) {
    let mut attempt = 0u32;
    let writer = StatusWriter { status };
    let addrs = addresses(&settings.control_plane);
    let mut which = 0usize;
    loop {
        let addr = addrs.get(which % addrs.len().max(1)).cloned().unwrap_or_default();
        which = which.wrapping_add(1);
        writer.update(|s| {
            s.state = "connecting".into();
            s.control_plane.clone_from(&addr);
        });
        let mut got_response = false;
        let result = session(&settings, &addr, &applier, &writer, &metrics, &mut got_response, reports.as_mut()).await;
        metrics.stream_connected.set(0);
        let why = match result {
            Ok(()) => SessionError::Closed.to_string(),
            Err(e) => e.to_string(),
        };
        if got_response {
            // The last stream worked: the next attempt starts from the shortest delay.
            attempt = 0;
        }
        let delay = backoff(attempt, settings.backoff_min, settings.backoff_max, rand::rng().random());
        attempt = attempt.saturating_add(1);
        tracing::warn!("config: {why}; keeping the last good config, reconnecting in {delay:?}");
        writer.update(|s| {
            s.state = "disconnected".into();
            s.last_error = Some(why);
        });
        tokio::time::sleep(delay).await;
    }
}

struct StatusWriter {
    status: Arc<ArcSwap<StreamStatus>>,
}

impl StatusWriter {
    fn update(&self, f: impl FnOnce(&mut StreamStatus)) {
        let mut s = StreamStatus::clone(&self.status.load());
        f(&mut s);
        self.status.store(Arc::new(s));
    }
}

async fn session(
    settings: &StreamSettings,
    addr: &str,
    applier: &Applier,
    writer: &StatusWriter,
    metrics: &Metrics,
    got_response: &mut bool,
    mut reports: Option<&mut crate::LoadReports>,
) -> Result<(), SessionError> {
    let anchors = settings.trust.as_ref().map(|t| t.anchors_pem());
    let endpoint = crate::identity::control_plane_endpoint(addr, anchors.as_ref().map(|a| a.as_slice()))
        .map_err(|_| SessionError::Address(addr.to_string()))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| SessionError::Connect { addr: addr.to_string(), cause: crate::error_chain(&e) })?;
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(256 << 20);

    let (tx, rx) = mpsc::channel(16);
    let current = applier.current();
    for (i, t) in type_url::ALL.iter().enumerate() {
        let req = DiscoveryRequest {
            node: (i == 0).then(|| settings.node.clone()),
            type_url: t.to_string(),
            subscribe: vec![WILDCARD.to_string()],
            initial_resource_versions: current.versions(t),
            ..Default::default()
        };
        // The receiver is alive: it is consumed by the call below.
        let _ = tx.send(req).await;
    }
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.map_err(SessionError::Open)?.into_inner();
    writer.update(|s| {
        s.state = "connected".into();
        s.connects += 1;
        s.last_error = None;
    });
    metrics.stream_connected.set(1);
    metrics.stream_connects.inc();
    tracing::info!(control_plane = %addr, "config: discovery stream open");

    // The newest report goes out on a new stream too: the control plane may be another
    // replica that has not heard from this pod yet.
    if let Some(r) = reports.as_deref_mut() {
        r.mark_changed();
    }
    loop {
        let answer = tokio::select! {
            msg = inbound.message() => match msg.map_err(SessionError::Stream)? {
                Some(resp) => {
                    *got_response = true;
                    handle(resp, applier, writer, metrics)
                }
                None => return Ok(()),
            },
            Some(report) = next_report(reports.as_deref_mut()) => {
                metrics.load_reports_sent.inc();
                DiscoveryRequest { load_report: Some(report), ..Default::default() }
            }
        };
        if tx.send(answer).await.is_err() {
            return Err(SessionError::Closed);
        }
    }
}

/// The next load report to send; pending forever when there are none to send.
async fn next_report(reports: Option<&mut crate::LoadReports>) -> Option<neutrino_proto::LoadReport> {
    let Some(rx) = reports else { return std::future::pending().await };
    loop {
        if rx.changed().await.is_err() {
            // The sampler is gone (shutting down): nothing more to report.
            return std::future::pending().await;
        }
        if let Some(r) = *rx.borrow_and_update() {
            return Some(r);
        }
    }
}

/// Applies one response and builds its ACK or NACK.
fn handle(resp: DiscoveryResponse, applier: &Applier, writer: &StatusWriter, metrics: &Metrics) -> DiscoveryRequest {
    let kind = crate::metrics::KindLabel::of(&resp.type_url);
    let (n_res, n_rem) = (resp.resources.len() as u64, resp.removed_resources.len() as u64);
    let nonce = resp.nonce.clone();
    let type_url_s = resp.type_url.clone();
    let system_version = resp.system_version.clone();
    let update = Update { type_url: resp.type_url, upserts: resp.resources, removed: resp.removed_resources };
    let result = applier.apply(update);
    let error_detail = match &result {
        Ok(snapshot) => {
            metrics.updates_applied.get_or_create(&kind).inc();
            tracing::debug!(kind = %kind.kind, resources = n_res, removed = n_rem, generation = snapshot.generation, "config: applied");
            None
        }
        Err(problems) => {
            metrics.updates_rejected.get_or_create(&kind).inc();
            let reasons: Vec<String> = problems.iter().map(ToString::to_string).collect();
            tracing::warn!(kind = %kind.kind, nonce = %nonce, "config: rejected update, keeping the last good config: {}", reasons.join("; "));
            Some(ErrorDetail {
                code: CODE_INVALID_ARGUMENT,
                message: format!("{} problem(s) in {} update; nothing applied", reasons.len(), kind.kind),
                reasons,
            })
        }
    };
    writer.update(|s| {
        let t = s.types.entry(kind.kind.clone()).or_default();
        t.responses += 1;
        t.resources_received += n_res;
        t.removals_received += n_rem;
        t.last_nonce = nonce.clone();
        t.last_system_version = system_version;
        match &error_detail {
            None => {
                t.acks += 1;
                t.last_nack = None;
            }
            Some(e) => {
                t.nacks += 1;
                t.last_nack = Some(e.reasons.clone());
            }
        }
    });
    DiscoveryRequest { type_url: type_url_s, response_nonce: nonce, error_detail, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_grows_exponentially_caps_and_jitters() {
        let (min, max) = (100 * MS, 5000 * MS);
        assert_eq!(backoff(0, min, max, 1.0), 100 * MS);
        assert_eq!(backoff(0, min, max, 0.0), 50 * MS);
        assert_eq!(backoff(3, min, max, 1.0), 800 * MS);
        assert_eq!(backoff(10, min, max, 1.0), max);
        assert_eq!(backoff(u32::MAX, min, max, 0.0), max / 2);
    }

    #[test]
    fn several_control_planes_are_listed_in_order() {
        assert_eq!(addresses("a:1, b:2,,"), vec!["a:1".to_string(), "b:2".to_string()]);
        assert_eq!(addresses("a:1"), vec!["a:1".to_string()]);
    }

    #[test]
    fn addresses_get_the_scheme_tls_says() {
        let e = crate::identity::control_plane_endpoint("cp:15010", None).expect("valid");
        assert_eq!(e.uri().to_string(), "http://cp:15010/");
        let e = crate::identity::control_plane_endpoint("http://cp:15012", Some(&[])).expect("valid");
        assert_eq!(e.uri().to_string(), "https://cp:15012/");
    }
}
