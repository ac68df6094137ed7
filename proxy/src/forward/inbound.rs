//! Inbound HTTP: requests for this pod, from other pods' proxies (or unmeshed
//! clients), forwarded to the app, and the pod's true load reported back in band.
//!
//! This proxy sees every caller's requests to its pod, so it alone knows the pod's real
//! load: the cost in flight from all callers (each caller's proxy sends the request's
//! cost in `x-neutrino-cost`), against the pod's capacity vector. Every response gets a
//! compact `x-neutrino-load` header with it (an idea from ORCA); callers' proxies read
//! it and strip it. Neither header reaches an app. It must not choose endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::Either;
use hyper::body::Incoming;

use super::Shared;
use super::body::ProxyBody;
use super::upstream;
use crate::select::DIMS;

pub const COST: HeaderName = HeaderName::from_static("x-neutrino-cost");
pub const LOAD: HeaderName = HeaderName::from_static("x-neutrino-load");

/// The cost in flight on this pod, from all callers.
#[derive(Debug, Default)]
pub struct PodLoad {
    in_flight: [AtomicU64; DIMS],
}

/// Holds one request's cost on the pod until dropped.
struct Held<'a> {
    load: &'a PodLoad,
    cost: [u64; DIMS],
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for (slot, c) in self.load.in_flight.iter().zip(self.cost) {
            slot.fetch_sub(c, Ordering::Relaxed);
        }
    }
}

impl PodLoad {
    fn hold(&self, cost: [u64; DIMS]) -> Held<'_> {
        for (slot, c) in self.in_flight.iter().zip(cost) {
            slot.fetch_add(c, Ordering::Relaxed);
        }
        Held { load: self, cost }
    }

    pub fn in_flight(&self) -> [u64; DIMS] {
        std::array::from_fn(|d| self.in_flight[d].load(Ordering::Relaxed))
    }
}

/// "cpu,memory,gpu" in capacity units, as `x-neutrino-cost` carries it.
pub fn format_cost(c: &[u64; DIMS]) -> HeaderValue {
    crate::route::Cost { cpu_millis: c[0], memory_bytes: c[1], gpu: c[2] }.header_value()
}

fn parse_triplet(v: &HeaderValue) -> Option<[u64; DIMS]> {
    let mut it = v.to_str().ok()?.split(',').map(|p| p.trim().parse::<u64>());
    let out = [it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?];
    it.next().is_none().then_some(out)
}

pub fn parse_cost(v: &HeaderValue) -> Option<[u64; DIMS]> {
    parse_triplet(v)
}

/// `x-neutrino-load`: the pod's load as parts per million of its capacity, per
/// dimension ("cpu,memory,gpu"; 0 where the pod has none of a resource).
pub fn format_load(in_flight: &[u64; DIMS], capacity: &[u64; DIMS]) -> HeaderValue {
    let ppm: [u64; DIMS] = std::array::from_fn(|d| {
        if capacity[d] == 0 { 0 } else { (u128::from(in_flight[d]) * 1_000_000 / u128::from(capacity[d])) as u64 }
    });
    format_cost(&ppm)
}

pub fn parse_load(v: &HeaderValue) -> Option<[u64; DIMS]> {
    parse_triplet(v)
}

/// Handles one request for this pod: forwards it to the app at `app` if policy lets
/// `peer` (the caller's identity, verified by mesh mTLS; None without) make it.
pub async fn handle(
    shared: Arc<Shared>,
    app: SocketAddr,
    req: Request<Incoming>,
    peer: Option<Arc<str>>,
) -> Response<ProxyBody> {
    // The request's SERVER span, when tracing is on: ended at the response head.
    let mut span = None;
    let resp = to_app(&shared, app, req, &mut span, peer).await;
    if let Some(s) = span {
        s.end(resp.status(), resp.headers().get(super::http::REASON));
    }
    resp
}

async fn to_app(
    shared: &Shared,
    app: SocketAddr,
    mut req: Request<Incoming>,
    span: &mut Option<crate::telemetry::trace::HopSpan>,
    peer: Option<Arc<str>>,
) -> Response<ProxyBody> {
    let upgrading = req.version() != Version::HTTP_2 && upstream::is_upgrade(&req);
    let downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Reported by mesh callers only; a load header from outside means nothing here.
    parts.headers.remove(&LOAD);
    let cost = parts.headers.remove(&COST).as_ref().and_then(parse_cost).unwrap_or([0; DIMS]);
    let started = std::time::Instant::now();
    // The service this pod serves and the request's operation, looked up once: where the
    // request is counted, what its span says, and what policy decides on.
    let (stats, denied) = {
        let mesh = shared.mesh.load();
        let route =
            mesh.service_of_pod(&shared.settings.pod).map(|s| (&**s, s.routes.lookup(&parts.method, parts.uri.path())));
        if let Some(t) = &shared.tracing {
            let mut s = t.server_span(&parts.method, parts.uri.path(), &parts.headers, route, &shared.settings.pod);
            s.set_peer(peer.as_ref());
            *span = Some(s);
        }
        let stats = route.map(|(_, op)| Arc::clone(&op.stats));
        (stats, route.and_then(|(svc, op)| authorize(shared, svc, op, &parts, peer.as_deref())))
    };
    let count = |status: Option<u16>| {
        if let Some(s) = &stats {
            s.inbound.record(status, started.elapsed());
        }
    };
    if let Some(denied) = denied {
        count(Some(denied.status().as_u16()));
        return denied;
    }
    let held = shared.pod_load.hold(cost);
    let h2 = parts.version == Version::HTTP_2;
    // To the app over its own connections (HTTP/1 pooled, HTTP/2 shared); an app on
    // too many addresses over hyper-util's client.
    let conns = shared.app_conns.get(app);
    let (via, uri) = match &conns {
        Some(c) if !h2 => {
            (upstream::Via::Endpoint { conns: c, addr: app, mtls: false, upgrading }, upstream::origin_form(&parts))
        }
        _ => match upstream::absolute_form(&parts, &app.to_string(), false) {
            Ok(u) => match &conns {
                Some(c) => (upstream::Via::EndpointH2 { conns: c, addr: app, mtls: false }, u),
                None => (upstream::Via::Client { h2, upgrading }, u),
            },
            Err(f) => return super::http::failure_answer(f),
        },
    };
    // The app's own spans are children of this hop's.
    if let Some(s) = span.as_ref() {
        s.inject(&mut parts.headers);
    }
    let timeout = shared.settings.request_timeout;
    let result =
        upstream::send(&shared.upstreams, via, &mut parts, None, uri, Either::Left(body), timeout, false).await;
    // The load others put on the pod, now that this request's head is answered.
    drop(held);
    let capacity = shared.mesh.load().capacity_of_pod(&shared.settings.pod);
    match result {
        Ok(mut resp) => {
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
                && let Some(down) = downstream_upgrade
            {
                count(Some(101));
                upstream::splice_upgrade(down, &mut resp, ());
                let (mut p, _) = resp.into_parts();
                upstream::strip_hop_by_hop(&mut p.headers, true);
                return Response::from_parts(p, super::body::local(bytes::Bytes::new()));
            }
            let (mut p, b) = resp.into_parts();
            count(Some(p.status.as_u16()));
            if let Some(cap) = capacity {
                p.headers.insert(LOAD, format_load(&shared.pod_load.in_flight(), &cap));
            }
            Response::from_parts(p, Either::Left(super::body::Held::new(b, None)))
        }
        Err(f) => {
            let answer = super::http::failure_answer(f);
            count(Some(answer.status().as_u16()));
            answer
        }
    }
}

/// The 403 policy gives this request, if it denies it (counted and logged).
fn authorize(
    shared: &Shared,
    svc: &crate::route::ServiceEntry,
    op: &crate::route::Operation,
    parts: &http::request::Parts,
    peer: Option<&str>,
) -> Option<Response<ProxyBody>> {
    let op_id = (!op.operation_id.is_empty()).then_some(&*op.operation_id);
    match svc.policy.authorize(peer, Some((&parts.method, parts.uri.path(), op_id))) {
        crate::route::Decision::Allow => None,
        crate::route::Decision::Deny { reason } => {
            let label = crate::metrics::ServiceLabel { service: svc.key.to_string() };
            shared.metrics.security.policy_denials.get_or_create(&label).inc();
            tracing::info!(
                service = %svc.key, peer = peer.unwrap_or("-"), method = %parts.method, path = parts.uri.path(),
                "inbound: policy denied a request: {reason}"
            );
            let mut r = Response::new(super::body::local(format!("{reason}\n")));
            *r.status_mut() = http::StatusCode::FORBIDDEN;
            r.headers_mut().insert(super::http::REASON, HeaderValue::from_static(reason));
            Some(r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_garbage() {
        let v = format_cost(&[500, 1 << 30, 1]);
        assert_eq!(parse_cost(&v), Some([500, 1 << 30, 1]));
        assert_eq!(parse_cost(&HeaderValue::from_static("1,2")), None);
        assert_eq!(parse_cost(&HeaderValue::from_static("1,2,3,4")), None);
        assert_eq!(parse_cost(&HeaderValue::from_static("a,b,c")), None);
        let load = format_load(&[3000, 0, 1], &[4000, 8 << 30, 0]);
        assert_eq!(load, "750000,0,0");
        assert_eq!(parse_load(&load), Some([750_000, 0, 0]));
    }

    #[test]
    fn pod_load_counts_what_is_held() {
        let l = PodLoad::default();
        let a = l.hold([100, 0, 0]);
        let b = l.hold([200, 5, 0]);
        assert_eq!(l.in_flight(), [300, 5, 0]);
        drop(a);
        assert_eq!(l.in_flight(), [200, 5, 0]);
        drop(b);
        assert_eq!(l.in_flight(), [0, 0, 0]);
    }
}
