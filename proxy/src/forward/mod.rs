//! Forward: moves a request (or a raw connection) to its destination and the answer
//! back, streaming, never buffering a body whole.
//!
//! `http` forwards HTTP/1.1 and HTTP/2 requests chosen by route and select; `tcp`
//! splices opaque connections with half-close. This module holds what both share:
//! the upstream connection pools (their HTTP/1 exchanges in `h1`) and the data
//! path's settings. It must not decide
//! where a request goes: route and select do.

pub mod body;
pub mod connect;
pub mod h1;
pub mod http;
pub mod inbound;
pub mod pool;
pub mod retry;
pub mod tcp;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::identity::{Alpn, MeshTls};
use crate::route::Mesh;

/// How far hyper may grow an HTTP/1 connection's read buffer (and queue writes), both
/// sides. Its default, about 400 KiB, is reached by one large body and then kept for the
/// connection's life: by every pooled upstream connection that once carried one (up to
/// 256 per endpoint). 64 KiB still moves a 1 MiB body in 16 reads.
pub const HTTP1_MAX_BUF: usize = 64 * 1024;

/// Tunables of the data path.
#[derive(Debug, Clone)]
pub struct DataSettings {
    /// The proxy's namespace, to resolve bare service names in Host headers.
    pub namespace: Arc<str>,
    /// Who this proxy speaks for (its node id), as the request log's source.
    pub source: Arc<str>,
    /// This proxy's pod: its endpoint entry gives the capacity inbound load is
    /// measured against.
    pub pod: Arc<str>,
    /// Time to a response's head when the route sets no timeout.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a request may wait for an endpoint with room before a 503.
    pub queue_timeout: Duration,
    /// How long protocol detection waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// An HTTP/1 client connection quiet for this long (up to twice this long) is
    /// parked without its HTTP buffers (`accept::idle`); zero never parks.
    pub park_idle_after: Duration,
    /// A parked client connection quiet this long is closed; zero never closes one.
    pub client_idle_timeout: Duration,
    /// This proxy's outbound listeners (filled in once bound): a passthrough request
    /// for one of them would loop, and is refused.
    pub outbound_listeners: Vec<std::net::SocketAddr>,
    /// Ports where the server speaks first: never sniffed.
    pub server_first_ports: Vec<u16>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_endpoint: usize,
}

impl Default for DataSettings {
    fn default() -> Self {
        DataSettings {
            namespace: Arc::from("default"),
            source: Arc::from(""),
            pod: Arc::from(""),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            queue_timeout: Duration::from_millis(500),
            detect_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            park_idle_after: Duration::from_secs(2),
            // Envoy's default for HTTP connections: long enough for any client that means
            // to come back, short of holding a descriptor for ever.
            client_idle_timeout: Duration::from_secs(3600),
            outbound_listeners: Vec::new(),
            server_first_ports: crate::detect::DEFAULT_SERVER_FIRST_PORTS.to_vec(),
            pool_idle_timeout: Duration::from_secs(60),
            // Above the concurrency one caller commonly reaches (100 h2 streams): a pool
            // that keeps fewer idle than were just in use closes the rest, and with mTLS
            // every one of them is a new handshake (the h2c benchmark paid 2.5x CPU).
            pool_max_idle_per_endpoint: 256,
        }
    }
}

/// How requests reach upstreams. A mesh endpoint (or the local app) is reached
/// through its own connections (`pool`, held by the compiled mesh): idle HTTP/1 ones,
/// or one shared HTTP/2 connection. Passthrough goes through hyper-util's clients,
/// pooled by scheme and address.
#[derive(Debug, Clone)]
pub struct Upstreams {
    pub http1: Client<connect::MeshConnector, upstream::UpstreamBody>,
    pub http2: Client<connect::MeshConnector, upstream::UpstreamBody>,
    /// Opens the endpoint pools' HTTP/1 and HTTP/2 connections (ALPN differs with mTLS).
    pub connector: connect::MeshConnector,
    pub connector_h2: connect::MeshConnector,
    pub pool: pool::PoolSettings,
}

impl Upstreams {
    pub fn new(
        s: &DataSettings,
        tls: Option<Arc<MeshTls>>,
        mesh: Arc<ArcSwap<Mesh>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        // Targets are always addresses we chose, never URLs from a client.
        let connector = |alpn| connect::MeshConnector {
            tls: tls.clone(),
            mesh: Arc::clone(&mesh),
            alpn,
            connect_timeout: s.connect_timeout,
            metrics: Arc::clone(&metrics),
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(s.pool_idle_timeout)
            .pool_max_idle_per_host(s.pool_max_idle_per_endpoint)
            .build(connector(Alpn::Http1));
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(s.pool_idle_timeout)
            .http2_only(true)
            .build(connector(Alpn::H2));
        let pool = pool::PoolSettings {
            idle_timeout: s.pool_idle_timeout,
            max_idle_per_endpoint: s.pool_max_idle_per_endpoint,
        };
        Upstreams { http1, http2, connector: connector(Alpn::Http1), connector_h2: connector(Alpn::H2), pool }
    }
}

/// Everything a connection handler needs, shared by all connections.
#[derive(Debug)]
pub struct Shared {
    pub mesh: Arc<ArcSwap<Mesh>>,
    pub upstreams: Upstreams,
    pub settings: DataSettings,
    pub retry_budget: retry::RetryBudget,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The cost in flight on this pod from all callers (inbound).
    pub pod_load: Arc<inbound::PodLoad>,
    /// Idle connections to this pod's app (inbound), by address.
    pub app_conns: pool::ByAddress,
    /// One record per request to a Redis Stream, when configured.
    pub request_log: Option<crate::telemetry::request_log::RequestLog>,
    /// Spans per request, when tracing is on (`telemetry::trace`).
    pub tracing: Option<Arc<crate::telemetry::trace::Tracing>>,
    /// This proxy's mesh identity and TLS, when identity is configured.
    pub tls: Option<Arc<MeshTls>>,
}

impl Shared {
    /// The mesh TLS to use now: configured and holding a certificate.
    pub fn mesh_tls(&self) -> Option<&Arc<MeshTls>> {
        self.tls.as_ref().filter(|t| t.has_certificate())
    }
}
