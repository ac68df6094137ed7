//! Route metrics: the labelled side of `/metrics`, read at scrape time.
//!
//! Walks the current `route::Mesh` and encodes, with prometheus-client's encoder, each
//! operation's counters (`telemetry::stats`) and each endpoint's live load, labelled by
//! direction, service, operation, status class, reason and endpoint. All of it is read
//! from atomics the request path already keeps; nothing is registered per request. It
//! must not write to any counter or hold the mesh beyond one scrape.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::stats::{CLASSES, Direction, REASONS, RouteStats};
use crate::route::{Mesh, ServiceEntry};
use crate::select::endpoints::{Endpoint, now_ms};

/// Encodes the mesh's per-operation and per-endpoint metrics on every scrape.
#[derive(Debug)]
pub struct RouteCollector {
    pub mesh: Arc<ArcSwap<Mesh>>,
}

/// Each service's operations with distinct counters (routes may share an id).
fn distinct_ops(svc: &ServiceEntry) -> Vec<(&str, &Arc<RouteStats>)> {
    let mut out: Vec<(&str, &Arc<RouteStats>)> = Vec::new();
    for op in svc.routes.operations() {
        if !out.iter().any(|(_, s)| Arc::ptr_eq(s, &op.stats)) {
            out.push((&op.operation_id, &op.stats));
        }
    }
    out
}

/// One gauge per endpoint of every service, labelled service, endpoint and pod.
fn endpoint_gauge(
    enc: &mut DescriptorEncoder,
    mesh: &Mesh,
    name: &str,
    help: &str,
    value: impl Fn(&Endpoint) -> f64,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for svc in mesh.services() {
        for e in &svc.endpoints.endpoints {
            let addr = e.addr.to_string();
            let labels = [("service", &*svc.key), ("endpoint", addr.as_str()), ("pod", &*e.pod)];
            ConstGauge::new(value(e)).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

const DIRECTIONS: [Direction; 2] = [Direction::Outbound, Direction::Inbound];
const RESOURCES: [&str; 3] = ["cpu_millis", "memory_bytes", "gpu"];

impl Collector for RouteCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let mesh = self.mesh.load();
        let services = mesh.services();

        let mut m = enc.encode_descriptor(
            "requests",
            "HTTP requests answered, by direction, service, OpenAPI operation and status class (error: no response)",
            None,
            MetricType::Counter,
        )?;
        for svc in services {
            for (op, stats) in distinct_ops(svc) {
                for d in DIRECTIONS {
                    let snap = stats.traffic(d).snapshot();
                    for (class, n) in CLASSES.iter().zip(snap.by_class) {
                        if n > 0 {
                            let labels = [
                                ("direction", d.as_str()),
                                ("service", &*svc.key),
                                ("operation", op),
                                ("status_class", class),
                            ];
                            ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                        }
                    }
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "request_duration_seconds",
            "Time to the response head (outbound: including queueing and retries), by direction, service and operation",
            None,
            MetricType::Histogram,
        )?;
        for svc in services {
            for (op, stats) in distinct_ops(svc) {
                for d in DIRECTIONS {
                    let snap = stats.traffic(d).snapshot();
                    if snap.count == 0 {
                        continue;
                    }
                    let labels = [("direction", d.as_str()), ("service", &*svc.key), ("operation", op)];
                    m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                        snap.sum_seconds,
                        snap.count,
                        &snap.buckets,
                        None,
                    )?;
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "selections",
            "Endpoints chosen, by service, operation and why (p2c, only-fit, scan, single)",
            None,
            MetricType::Counter,
        )?;
        for svc in services {
            for (op, stats) in distinct_ops(svc) {
                for (reason, n) in REASONS.iter().zip(stats.reasons()) {
                    if n > 0 {
                        let labels = [("service", &*svc.key), ("operation", op), ("reason", reason.as_str())];
                        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }

        for (name, help, read) in [
            (
                "requests_queued",
                "Requests that waited for an endpoint with room",
                RouteStats::queued_count as fn(&RouteStats) -> u64,
            ),
            ("requests_shed", "Requests refused with 503: no endpoint had room in time", RouteStats::shed_count),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for svc in services {
                for (op, stats) in distinct_ops(svc) {
                    let n = read(stats);
                    if n > 0 {
                        let labels = [("service", &*svc.key), ("operation", op)];
                        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }

        let now = now_ms();
        endpoint_gauge(
            &mut enc,
            &mesh,
            "endpoint_utilization",
            "Each endpoint's utilization as this proxy estimates it (dominant resource; 0..1, above 1 when over)",
            |e| crate::select::utilization_after(&e.load.candidate(e.capacity, now), &[0; 3]).unwrap_or(0.0),
        )?;
        endpoint_gauge(
            &mut enc,
            &mesh,
            "endpoint_load_known",
            "1 while a fresh load report (pushed or in band) covers the endpoint; 0: only this proxy's own load is known",
            |e| f64::from(u8::from(e.load.candidate(e.capacity, now).known)),
        )?;
        endpoint_gauge(
            &mut enc,
            &mesh,
            "endpoint_requests_in_flight",
            "This proxy's requests in flight on each endpoint",
            |e| e.load.requests_in_flight() as f64,
        )?;
        let mut m = enc.encode_descriptor(
            "endpoint_capacity",
            "Each endpoint's capacity, by resource (cpu_millis, memory_bytes, gpu)",
            None,
            MetricType::Gauge,
        )?;
        for svc in services {
            for e in &svc.endpoints.endpoints {
                let addr = e.addr.to_string();
                for (res, v) in RESOURCES.iter().zip(e.capacity) {
                    let labels =
                        [("service", &*svc.key), ("endpoint", addr.as_str()), ("pod", &*e.pod), ("resource", res)];
                    ConstGauge::new(v as f64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
