//! The control plane's Prometheus metrics. Counters are updated where things happen;
//! this module only declares and encodes them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Short resource type name: Service, Endpoints, Capacity.
    pub kind: String,
}

impl KindLabel {
    pub fn of(type_url: &str) -> Self {
        KindLabel { kind: neutrino_proto::type_url::short(type_url).to_string() }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabel {
    /// Where a load report came from: "stream" (a proxy on this replica) or "redis".
    pub origin: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why a Certify call was refused: unauthenticated, identity_mismatch, malformed_csr, ...
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connected_proxies: Gauge,
    pub streams_total: Counter,
    pub responses_sent: Family<KindLabel, Counter>,
    pub resources_sent: Family<KindLabel, Counter>,
    pub removals_sent: Family<KindLabel, Counter>,
    pub acks: Family<KindLabel, Counter>,
    pub nacks: Family<KindLabel, Counter>,
    pub snapshot_generation: Gauge,
    pub snapshots_published: Counter,
    pub source_errors: Counter,
    pub openapi_errors: Counter,
    pub load_reports: Family<OriginLabel, Counter>,
    pub load_reports_dropped: Counter,
    pub capacity_published: Counter,
    pub redis_connected: Gauge,
    pub redis_writes: Counter,
    pub redis_writes_dropped: Counter,
    pub redis_malformed: Counter,
    /// Identity (issue 7): leaves signed, refusals, CA expiry and reloads.
    pub trace_spans_exported: Counter,
    pub trace_spans_dropped: Counter,
    pub trace_export_failures: Counter,
    pub certificates_issued: Counter,
    pub certify_failures: Family<ReasonLabel, Counter>,
    pub issuer_expiry: Gauge,
    pub anchor_expiry: Gauge,
    pub ca_reloads: Counter,
    pub ca_reload_errors: Counter,
    pub serving_cert_renewals: Counter,
    pub tls_handshake_failures: Counter,
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut r = Registry::with_prefix("neutrino_cp");
        r.register("connected_proxies", "Proxies with an open discovery stream", self.connected_proxies.clone());
        r.register(
            "trace_spans_exported",
            "Push spans accepted by the OTLP collector",
            self.trace_spans_exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Push spans dropped: the export queue was full, or their export failed",
            self.trace_spans_dropped.clone(),
        );
        r.register(
            "trace_export_failures",
            "OTLP exports that failed or missed their deadline",
            self.trace_export_failures.clone(),
        );
        r.register("streams", "Discovery streams opened", self.streams_total.clone());
        r.register("responses_sent", "Discovery responses sent, by resource kind", self.responses_sent.clone());
        r.register("resources_sent", "Resources sent in discovery responses", self.resources_sent.clone());
        r.register("removals_sent", "Resource removals sent in discovery responses", self.removals_sent.clone());
        r.register("acks", "Responses acknowledged by proxies", self.acks.clone());
        r.register("nacks", "Responses rejected by proxies", self.nacks.clone());
        r.register("snapshot_generation", "Generation of the published snapshot", self.snapshot_generation.clone());
        r.register("snapshots_published", "Snapshots published after debouncing", self.snapshots_published.clone());
        r.register("source_errors", "Discovery source reads that failed", self.source_errors.clone());
        r.register("openapi_errors", "OpenAPI documents that failed to read or parse", self.openapi_errors.clone());
        r.register("load_reports", "Load reports taken in, by origin", self.load_reports.clone());
        r.register(
            "load_reports_dropped",
            "Load reports dropped because the aggregator lagged",
            self.load_reports_dropped.clone(),
        );
        r.register("capacity_published", "Capacity-lane snapshots published", self.capacity_published.clone());
        r.register(
            "redis_connected",
            "1 while load sharing through Redis works; 0 when degraded (serving this replica's own reports)",
            self.redis_connected.clone(),
        );
        r.register("redis_writes", "Load reports written to Redis", self.redis_writes.clone());
        r.register(
            "redis_writes_dropped",
            "Load reports not written to Redis (down or slow)",
            self.redis_writes_dropped.clone(),
        );
        r.register("redis_malformed", "Messages from Redis that were not load reports", self.redis_malformed.clone());
        r.register("certificates_issued", "Workload certificates signed by the CA", self.certificates_issued.clone());
        r.register("certify_failures", "Certify calls refused, by reason", self.certify_failures.clone());
        r.register(
            "issuer_expiry_timestamp_seconds",
            "notAfter of the CA's issuer certificate (unix seconds); 0 without a CA",
            self.issuer_expiry.clone(),
        );
        r.register(
            "anchor_expiry_timestamp_seconds",
            "Earliest notAfter among the trust anchors (unix seconds); 0 without a CA",
            self.anchor_expiry.clone(),
        );
        r.register("ca_reloads", "CA material sets loaded after a change of the files", self.ca_reloads.clone());
        r.register(
            "ca_reload_errors",
            "Changed CA material refused as invalid (the last good set is kept)",
            self.ca_reload_errors.clone(),
        );
        r.register(
            "serving_cert_renewals",
            "Certificates the control plane issued itself for TLS on 15012",
            self.serving_cert_renewals.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes on 15012 that failed or timed out",
            self.tls_handshake_failures.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}
