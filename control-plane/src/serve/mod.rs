//! Serve: the `Discovery` gRPC service. One task per proxy stream reads the published
//! snapshots and sends each subscription only what it lacks.
//!
//! Flow control: at most one response per type is in flight; changes that arrive
//! meanwhile mark it dirty and the next response is cut from the newest snapshot, so a
//! slow proxy gets the latest state, never a backlog. Must not mutate snapshots.

pub mod delta;
pub mod registry;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use neutrino_proto::discovery_server::{Discovery, DiscoveryServer};
use neutrino_proto::{DiscoveryRequest, DiscoveryResponse, Node, type_url};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::index::Published;
use crate::load::ReportSink;
use crate::metrics::{KindLabel, Metrics};
use crate::translate::Snapshot;
use delta::Subscription;
use registry::Registry;

#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Streams are closed after this age (with ±10 % jitter) so that proxies spread
    /// over replicas as replicas come and go.
    pub max_stream_age: Duration,
    /// A span per push until its ACK/NACK, when tracing is on (`crate::trace`).
    pub tracer: Option<Arc<crate::trace::PushTracer>>,
}

#[derive(Debug, Clone)]
pub struct DiscoveryService {
    published: Published,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    settings: ServeSettings,
    reports: ReportSink,
}

impl DiscoveryService {
    pub fn new(
        published: Published,
        metrics: Arc<Metrics>,
        registry: Arc<Registry>,
        settings: ServeSettings,
        reports: ReportSink,
    ) -> Self {
        DiscoveryService { published, metrics, registry, settings, reports }
    }

    pub fn into_server(self) -> DiscoveryServer<Self> {
        // Large meshes make large initial responses.
        DiscoveryServer::new(self).max_decoding_message_size(16 << 20).max_encoding_message_size(256 << 20)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(&self, request: Request<Streaming<DiscoveryRequest>>) -> Result<Response<ResponseStream>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let conn = Connection {
            inbound,
            out: tx,
            published: self.published.clone(),
            metrics: Arc::clone(&self.metrics),
            registry: Arc::clone(&self.registry),
            subs: HashMap::new(),
            nonce: 0,
            stream_id: 0,
            peer,
            reports: self.reports.clone(),
            pod_key: None,
            tracer: self.settings.tracer.clone(),
            spans: HashMap::new(),
            node_id: String::new(),
        };
        let age = jittered(self.settings.max_stream_age);
        tokio::spawn(conn.run(age));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// Which lane a type's snapshot comes from.
fn lane(type_url: &str) -> Lane {
    match type_url {
        type_url::CAPACITY => Lane::Capacity,
        type_url::TRUST_BUNDLE => Lane::Identity,
        _ => Lane::Config,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Config,
    Capacity,
    /// The TrustBundle, written by the CA task.
    Identity,
}

struct Connection {
    inbound: Streaming<DiscoveryRequest>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    published: Published,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    subs: HashMap<String, Subscription>,
    nonce: u64,
    stream_id: u64,
    peer: String,
    reports: ReportSink,
    /// "<namespace>/<pod>" of the proxy, when it names its pod: whose load it reports.
    pod_key: Option<String>,
    tracer: Option<Arc<crate::trace::PushTracer>>,
    /// The span of each type's response in flight, ended by the proxy's answer.
    spans: HashMap<String, crate::trace::PushSpan>,
    node_id: String,
}

/// Why a stream ended; for the log.
enum End {
    ProxyClosed,
    ProxyGone,
    Error(Status),
}

impl Connection {
    async fn run(mut self, max_age: Duration) {
        let end = self.serve(max_age).await;
        for (_, span) in self.spans.drain() {
            span.abandoned("the stream ended before the proxy answered");
        }
        if self.stream_id != 0 {
            self.registry.remove(self.stream_id);
            self.metrics.connected_proxies.dec();
        }
        match end {
            End::ProxyClosed | End::ProxyGone => tracing::debug!(peer = %self.peer, "serve: stream ended"),
            End::Error(status) => {
                tracing::info!(peer = %self.peer, "serve: closing stream: {}", status.message());
                let _ = self.out.send(Err(status)).await;
            }
        }
    }

    async fn serve(&mut self, max_age: Duration) -> End {
        // The first request must say who the proxy is.
        let first = match self.inbound.message().await {
            Ok(Some(req)) => req,
            Ok(None) => return End::ProxyClosed,
            Err(_) => return End::ProxyGone,
        };
        let node = match first.node.clone() {
            Some(n) if !n.id.is_empty() => n,
            _ => {
                return End::Error(Status::invalid_argument(
                    "the first DiscoveryRequest must carry node.id (the proxy's identity); check the proxy version",
                ));
            }
        };
        self.register(&node);
        let mut config_rx = self.published.config.clone();
        let mut capacity_rx = self.published.capacity.clone();
        let mut identity_rx = self.published.identity.clone();
        config_rx.mark_unchanged();
        capacity_rx.mark_unchanged();
        identity_rx.mark_unchanged();
        if let Err(end) = self.on_request(first).await {
            return end;
        }
        let deadline = tokio::time::sleep(max_age);
        tokio::pin!(deadline);
        loop {
            let step = tokio::select! {
                msg = self.inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) => Err(End::ProxyClosed),
                    Err(_) => Err(End::ProxyGone),
                },
                changed = config_rx.changed() => match changed {
                    Ok(()) => self.push_lane(Lane::Config).await,
                    Err(_) => Err(End::Error(Status::unavailable("control plane is shutting down"))),
                },
                changed = capacity_rx.changed() => match changed {
                    Ok(()) => self.push_lane(Lane::Capacity).await,
                    Err(_) => Err(End::Error(Status::unavailable("control plane is shutting down"))),
                },
                changed = identity_rx.changed() => match changed {
                    Ok(()) => self.push_lane(Lane::Identity).await,
                    Err(_) => Err(End::Error(Status::unavailable("control plane is shutting down"))),
                },
                () = &mut deadline => Err(End::Error(Status::unavailable(
                    "stream reached its maximum age; reconnect (to any replica) and resume",
                ))),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    fn register(&mut self, node: &Node) {
        self.stream_id = self.registry.add(node.clone(), self.peer.clone());
        self.node_id.clone_from(&node.id);
        self.pod_key = (!node.pod.is_empty()).then(|| crate::model::pod_key(&node.namespace, &node.pod));
        self.metrics.connected_proxies.inc();
        self.metrics.streams_total.inc();
        tracing::info!(node = %node.id, peer = %self.peer, "serve: proxy connected");
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), End> {
        if let Some(report) = req.load_report {
            self.take_report(report);
            return Ok(());
        }
        if req.type_url.is_empty() {
            return Err(End::Error(Status::invalid_argument("DiscoveryRequest.type_url is empty")));
        }
        let kind = KindLabel::of(&req.type_url);
        let type_url = req.type_url.clone();
        let is_new = !self.subs.contains_key(&type_url);
        let sub = self.subs.entry(type_url.clone()).or_default();
        if !req.response_nonce.is_empty() {
            // An answer to a response. Answers to stale nonces are ignored (xDS rules).
            if sub.in_flight.as_deref() != Some(req.response_nonce.as_str()) {
                return Ok(());
            }
            sub.in_flight = None;
            match &req.error_detail {
                None => {
                    self.metrics.acks.get_or_create(&kind).inc();
                    self.registry.ack(self.stream_id, &type_url, &req.response_nonce);
                    if let Some(span) = self.spans.remove(&type_url) {
                        span.acked();
                    }
                }
                Some(err) => {
                    self.metrics.nacks.get_or_create(&kind).inc();
                    tracing::warn!(
                        peer = %self.peer, kind = %kind.kind, nonce = %req.response_nonce,
                        "serve: proxy rejected update: {} {:?}", err.message, err.reasons
                    );
                    self.registry.nack(self.stream_id, &type_url, &req.response_nonce, err);
                    if let Some(span) = self.spans.remove(&type_url) {
                        span.nacked(&err.message, &err.reasons);
                    }
                }
            }
            let dirty = std::mem::take(&mut sub.dirty);
            if dirty || !req.subscribe.is_empty() || !req.unsubscribe.is_empty() {
                sub.update(&req, false);
                return self.push(&type_url).await;
            }
            return Ok(());
        }
        sub.update(&req, is_new);
        self.push(&type_url).await
    }

    /// A proxy's report of its own pod's load. Reports from proxies that did not name
    /// their pod cannot be matched to endpoints and are ignored.
    fn take_report(&mut self, r: neutrino_proto::LoadReport) {
        let Some(pod) = &self.pod_key else { return };
        let v = r.in_flight.unwrap_or_default();
        let report = crate::model::LoadReport {
            in_flight: [v.cpu_millis, v.memory_bytes, v.gpu],
            measured_at_ms: r.measured_at_ms,
        };
        self.reports.report(pod.clone(), report);
    }

    async fn push_lane(&mut self, which: Lane) -> Result<(), End> {
        let types: Vec<String> = self.subs.keys().filter(|t| lane(t) == which).cloned().collect();
        for t in types {
            self.push(&t).await?;
        }
        Ok(())
    }

    /// Sends what subscription `type_url` lacks, unless a response is in flight.
    async fn push(&mut self, type_url: &str) -> Result<(), End> {
        let snapshot: Arc<Snapshot> = match lane(type_url) {
            Lane::Config => Arc::clone(&self.published.config.borrow()),
            Lane::Capacity => Arc::clone(&self.published.capacity.borrow()),
            Lane::Identity => Arc::clone(&self.published.identity.borrow()),
        };
        let Some(sub) = self.subs.get_mut(type_url) else { return Ok(()) };
        if sub.in_flight.is_some() {
            sub.dirty = true;
            return Ok(());
        }
        // Before the first snapshot there is nothing true to say: wait for it.
        if snapshot.generation == 0 {
            return Ok(());
        }
        let map = snapshot.by_type.get(type_url).cloned();
        let last = sub.last_diffed.as_ref().filter(|_| sub.initial_sent);
        let delta = match (&map, last, snapshot.changes.get(type_url)) {
            // The same map as last time: nothing to look at.
            (Some(m), Some((seen, _)), _) if Arc::ptr_eq(m, seen) => return Ok(()),
            // One publish later: only the names that changed can differ.
            (Some(m), Some((_, generation)), Some(changes)) if changes.since == *generation => {
                sub.diff_names(m, &changes.names)
            }
            _ => sub.diff(map.as_deref()),
        };
        sub.last_diffed = map.map(|m| (m, snapshot.generation));
        if delta.is_empty() && sub.initial_sent {
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let kind = KindLabel::of(type_url);
        self.metrics.responses_sent.get_or_create(&kind).inc();
        self.metrics.resources_sent.get_or_create(&kind).inc_by(delta.resources.len() as u64);
        self.metrics.removals_sent.get_or_create(&kind).inc_by(delta.removed.len() as u64);
        let response = DiscoveryResponse {
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            resources: delta.resources.iter().map(|r| Resource::clone(r)).collect(),
            removed_resources: delta.removed.clone(),
            system_version: snapshot.generation.to_string(),
        };
        sub.sent(&delta);
        sub.in_flight = Some(nonce.clone());
        let held = sub.held_count();
        self.registry.sent(self.stream_id, type_url, &nonce, snapshot.generation, held);
        if let Some(t) = &self.tracer {
            let push = crate::trace::Push {
                node: &self.node_id,
                type_url,
                nonce: &nonce,
                generation: snapshot.generation,
                resources: response.resources.len(),
                removed: response.removed_resources.len(),
            };
            self.spans.insert(type_url.to_string(), t.push(push));
        }
        self.out.send(Ok(response)).await.map_err(|_| End::ProxyGone)
    }
}

use neutrino_proto::Resource;
