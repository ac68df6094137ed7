//! The proxy's Prometheus metrics: process-wide counters declared here and updated where
//! things happen; per-operation and per-endpoint families come from
//! `telemetry::route_metrics` at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

impl KindLabel {
    pub fn of(type_url: &str) -> Self {
        KindLabel { kind: neutrino_proto::type_url::short(type_url).to_string() }
    }
}

/// Data-path counters: plain atomics, so counting never takes a lock on the request
/// path (labelled families come with the observability work).
#[derive(Debug, Default)]
pub struct DataMetrics {
    pub outbound_http_requests: Counter,
    pub outbound_tcp_connections: Counter,
    pub passthrough_connections: Counter,
    /// Idle HTTP/1 client connections held as bare sockets (`accept::idle`).
    pub parked_connections: Gauge,
    /// Times a connection was parked (`_total`); drives giving memory back.
    pub connection_parks: Counter,
    pub inbound_connections: Counter,
    pub no_capacity: Counter,
    pub retries: Counter,
    pub ejections: Counter,
    pub request_log_written: Counter,
    pub request_log_dropped: Counter,
    /// Trace spans: see `telemetry::trace`.
    pub trace_spans_exported: Counter,
    pub trace_spans_dropped: Counter,
    pub trace_export_failures: Counter,
}

/// `direction` (inbound/outbound) and `result` (ok, or why it failed).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

/// A verified caller's SPIFFE id.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabel {
    pub caller: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Mesh TLS, policy and this proxy's certificate.
#[derive(Debug, Default)]
pub struct SecurityMetrics {
    pub handshakes: Family<HandshakeLabel, Counter>,
    /// Inbound connections that were not mesh mTLS, accepted because the service is
    /// permissive.
    pub plaintext_accepted: Family<ServiceLabel, Counter>,
    /// ... and refused because it is strict.
    pub plaintext_refused: Family<ServiceLabel, Counter>,
    pub policy_denials: Family<ServiceLabel, Counter>,
    /// Inbound mesh mTLS connections by the caller's verified identity (counted once per
    /// connection, at the handshake: never per request).
    pub inbound_by_caller: Family<CallerLabel, Counter>,
    /// Outbound requests to meshed endpoints sent in plaintext because this proxy has
    /// no certificate (identity not configured or not issued yet).
    pub outbound_plaintext_to_meshed: Counter,
    pub certificate_renewals: Family<ResultLabel, Counter>,
    /// Unix seconds when this proxy's certificate expires (0: none).
    pub certificate_expiry: Gauge,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub security: SecurityMetrics,
    pub data: DataMetrics,
    pub updates_applied: Family<KindLabel, Counter>,
    pub updates_rejected: Family<KindLabel, Counter>,
    pub stream_connects: Counter,
    pub stream_connected: Gauge,
    pub load_reports_sent: Counter,
}

impl Metrics {
    /// The exposition; with `routes`, the per-operation and per-endpoint families too.
    pub fn encode(
        &self,
        generation: u64,
        ready: bool,
        routes: Option<crate::telemetry::route_metrics::RouteCollector>,
    ) -> String {
        let mut r = Registry::with_prefix("neutrino_proxy");
        if let Some(c) = routes {
            r.register_collector(Box::new(c));
        }
        r.register(
            "config_updates_applied",
            "Config updates validated and published (ACKed)",
            self.updates_applied.clone(),
        );
        r.register(
            "config_updates_rejected",
            "Config updates rejected by validation (NACKed)",
            self.updates_rejected.clone(),
        );
        r.register("control_plane_connects", "Discovery streams established", self.stream_connects.clone());
        r.register("control_plane_connected", "1 while the discovery stream is open", self.stream_connected.clone());
        r.register(
            "load_reports_sent",
            "Reports of this pod's load sent to the control plane",
            self.load_reports_sent.clone(),
        );
        let d = &self.data;
        r.register("outbound_http_requests", "HTTP requests to mesh services", d.outbound_http_requests.clone());
        r.register(
            "outbound_tcp_connections",
            "Opaque TCP connections to mesh services",
            d.outbound_tcp_connections.clone(),
        );
        r.register(
            "passthrough_connections",
            "Connections to destinations outside the mesh",
            d.passthrough_connections.clone(),
        );
        r.register(
            "parked_connections",
            "Idle HTTP/1 client connections parked without HTTP buffers until the client sends again",
            d.parked_connections.clone(),
        );
        r.register("connection_parks", "Idle HTTP/1 client connections parked", d.connection_parks.clone());
        r.register("inbound_connections", "Connections accepted for this pod", d.inbound_connections.clone());
        r.register("no_capacity", "Requests refused with 503 because no endpoint had room", d.no_capacity.clone());
        r.register("retries", "Requests sent again to another endpoint", d.retries.clone());
        r.register("ejections", "Endpoints ejected after consecutive failures", d.ejections.clone());
        r.register("request_log_written", "Request records written to Redis", d.request_log_written.clone());
        r.register(
            "request_log_dropped",
            "Request records dropped because Redis was slow or down",
            d.request_log_dropped.clone(),
        );
        r.register(
            "trace_spans_exported",
            "Trace spans accepted by the OTLP collector",
            d.trace_spans_exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Trace spans dropped: the export queue was full, or their export failed or timed out",
            d.trace_spans_dropped.clone(),
        );
        r.register(
            "trace_export_failures",
            "OTLP trace exports that failed or missed their deadline",
            d.trace_export_failures.clone(),
        );
        let sec = &self.security;
        r.register("tls_handshakes", "Mesh TLS handshakes by direction and result", sec.handshakes.clone());
        r.register(
            "plaintext_accepted",
            "Inbound connections without mesh mTLS accepted because the service is permissive",
            sec.plaintext_accepted.clone(),
        );
        r.register(
            "plaintext_refused",
            "Inbound connections without mesh mTLS refused because the service is strict",
            sec.plaintext_refused.clone(),
        );
        r.register(
            "inbound_mtls_connections",
            "Inbound mesh mTLS connections by the caller's verified SPIFFE id",
            sec.inbound_by_caller.clone(),
        );
        r.register(
            "policy_denials",
            "Requests and connections denied by authorization policy",
            sec.policy_denials.clone(),
        );
        r.register(
            "outbound_plaintext_to_meshed",
            "Requests to meshed endpoints sent without mTLS because this proxy has no certificate",
            sec.outbound_plaintext_to_meshed.clone(),
        );
        r.register(
            "certificate_renewals",
            "Certificate requests to the control plane by result",
            sec.certificate_renewals.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When this proxy's certificate expires (Unix seconds; 0: none)",
            sec.certificate_expiry.clone(),
        );
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(generation).unwrap_or(i64::MAX));
        r.register("config_generation", "Generation of the published config snapshot", g);
        let rd: Gauge = Gauge::default();
        rd.set(i64::from(ready));
        r.register("ready", "1 once a first valid config has been applied", rd);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}
