//! HTTP forwarding: one request in, its service, route and endpoint decided, the
//! request sent upstream over a pooled connection, and the response streamed back.
//!
//! Resilience lives here: a bounded wait for room (then 503 with the reason), the
//! route's timeout, retries of idempotent or retryable bodiless requests on another
//! endpoint under the retry budget, and passive outlier ejection fed by failures.
//! Errors become small local answers that say what failed (`x-neutrino-reason`). It
//! must not buffer bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use neutrino_proto::Protocol as PortProtocol;

use super::Shared;
use super::body::{Held, ProxyBody, local};
use super::upstream::{self, Failure, Via};
use crate::route::{PortEntry, ServiceEntry, strip_port};
use crate::select::endpoints::{FAST_FAILURE, InFlight, now_ms};
use crate::telemetry::trace::HopSpan;

/// What the accepting side knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Where the client was going before interception (None: explicit proxy use).
    pub original_dst: Option<SocketAddr>,
    /// The service behind `original_dst`, when it is a virtual IP.
    pub service: Option<Arc<ServiceEntry>>,
    pub port: Option<PortEntry>,
}

pub const REASON: HeaderName = HeaderName::from_static("x-neutrino-reason");

/// Attempts per request, the first included.
const MAX_ATTEMPTS: u32 = 3;

fn answer(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let mut r = Response::new(local(format!("{reason}\n")));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(reason) {
        r.headers_mut().insert(REASON, v);
    }
    r
}

pub(super) fn failure_answer(f: Failure) -> Response<ProxyBody> {
    match f {
        Failure::Connection(why) => answer(StatusCode::BAD_GATEWAY, &why),
        Failure::Timeout(t) => answer(StatusCode::GATEWAY_TIMEOUT, &format!("upstream did not answer within {t:?}")),
        Failure::BadTarget(why) => answer(StatusCode::BAD_REQUEST, &why),
        Failure::BadRequestBody(why) => {
            tracing::warn!("forward: rejected a request: {why}");
            let mut r = answer(StatusCode::BAD_REQUEST, &why);
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// The authority a request names: absolute-form URI first, then Host / :authority.
fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// Handles one request from a client on this pod.
pub async fn handle(shared: Arc<Shared>, conn: Arc<ConnInfo>, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return connect(shared, req).await;
    }
    if req.headers().contains_key(header::TRANSFER_ENCODING) && req.headers().contains_key(header::CONTENT_LENGTH) {
        // Two framings for one body: the classic request-smuggling set-up. Refuse it
        // and close the connection rather than guess which one the next hop believes.
        tracing::warn!(uri = %req.uri(), "forward: rejected a request with both Content-Length and Transfer-Encoding");
        let mut r = answer(StatusCode::BAD_REQUEST, "both Content-Length and Transfer-Encoding: refused");
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let service = match &conn.service {
        Some(s) => Some(Arc::clone(s)),
        None => {
            let mesh = shared.mesh.load();
            // Hosts are lower-case in the mesh; most requests' are already.
            authority(&req).and_then(|a| {
                let a = match a.bytes().any(|b| b.is_ascii_uppercase()) {
                    true => std::borrow::Cow::Owned(a.to_ascii_lowercase()),
                    false => std::borrow::Cow::Borrowed(a),
                };
                mesh.by_host(&a, &shared.settings.namespace).cloned()
            })
        }
    };
    match service {
        Some(svc) => {
            shared.metrics.data.outbound_http_requests.inc();
            to_service(&shared, &conn, svc, req).await
        }
        None => passthrough(&shared, &conn, req).await,
    }
}

/// The port of `svc` a request is for: the intercepted one, the Host's, or the first.
fn service_port(svc: &ServiceEntry, conn: &ConnInfo, authority: Option<&str>) -> Option<PortEntry> {
    if let Some(p) = conn.port {
        return Some(p);
    }
    let named = authority.and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| p.parse::<u16>().ok());
    match named {
        Some(p) => svc.port(p).copied(),
        None => svc.port(80).or_else(|| svc.ports.first()).copied(),
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

async fn to_service(
    shared: &Shared,
    conn: &ConnInfo,
    svc: Arc<ServiceEntry>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    // The request's CLIENT span, when tracing is on: ended at the response head.
    let mut span = None;
    let resp = forward_to_service(shared, conn, svc, req, &mut span).await;
    if let Some(s) = span {
        s.end(resp.status(), resp.headers().get(REASON));
    }
    resp
}

async fn forward_to_service(
    shared: &Shared,
    conn: &ConnInfo,
    svc: Arc<ServiceEntry>,
    mut req: Request<Incoming>,
    span: &mut Option<HopSpan>,
) -> Response<ProxyBody> {
    let Some(port) = service_port(&svc, conn, authority(&req)) else {
        return answer(StatusCode::BAD_GATEWAY, &format!("service {} has no such port", svc.key));
    };
    let started = std::time::Instant::now();
    let op = svc.routes.lookup(req.method(), req.uri().path());
    let cost = op.cost.as_array();
    if let Some(t) = &shared.tracing {
        *span = Some(t.client_span(&req, authority(&req), &svc, op, port.port));
    }
    // What the request log will say; only gathered when there is a log.
    let mut log = shared.request_log.as_ref().map(|_| Outcome {
        started: std::time::Instant::now(),
        trace_id: match span {
            Some(s) => s.ids().0,
            None => crate::telemetry::trace_id(req.headers().get("traceparent")).to_string(),
        },
        ..Outcome::default()
    });
    let timeout = op.timeout.unwrap_or(shared.settings.request_timeout);
    let h2 = match port.protocol {
        PortProtocol::Http2 | PortProtocol::Grpc => true,
        PortProtocol::Http1 => false,
        _ => req.version() == Version::HTTP_2,
    };
    let upgrading = !h2 && upstream::is_upgrade(&req);
    // Only a request whose body is already complete (none) can be sent again.
    let retryable = (op.retryable || idempotent(req.method())) && req.body().is_end_stream() && !upgrading;
    shared.retry_budget.deposit();

    let mut downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let mut body = Some(body);
    let mut avoid = None;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let choice = match wait_for_room(shared, &svc, &cost, avoid, op).await {
            Ok(c) => {
                op.stats.chose(c.reason);
                c
            }
            Err(refusal) => return logged(shared, &svc, op, started, log, refusal),
        };
        let endpoint = &svc.endpoints.endpoints[choice.index];
        let target = svc.target(endpoint, &port);
        if let Some(s) = span.as_mut() {
            s.chose(endpoint, target, &choice, attempt);
        }
        if let Some(l) = log.as_mut() {
            l.endpoint = target.to_string();
            l.endpoint_pod = Some(Arc::clone(&endpoint.pod));
            l.endpoint_identity = endpoint.identity.clone().filter(|_| shared.mesh_tls().is_some());
            l.reason = format!("{} at {:.0}%", choice.reason.as_str(), choice.utilization * 100.0);
            l.attempts = attempt;
        }
        let hold = InFlight::new(Arc::clone(&endpoint.load), cost);
        let mtls = endpoint.identity.is_some() && shared.mesh_tls().is_some();
        if endpoint.identity.is_some() && !mtls {
            shared.metrics.security.outbound_plaintext_to_meshed.inc();
        }
        let may_retry = retryable && attempt < MAX_ATTEMPTS;
        // Over the endpoint's own connections: HTTP/2 needs the absolute form (its
        // :scheme and :authority), HTTP/1 sends the origin form.
        let (via, uri) = if h2 {
            match upstream::absolute_form(&parts, &target.to_string(), mtls) {
                Ok(u) => (Via::EndpointH2 { conns: &endpoint.conns, addr: target, mtls }, u),
                Err(f) => return logged(shared, &svc, op, started, log, failure_answer(f)),
            }
        } else {
            (Via::Endpoint { conns: &endpoint.conns, addr: target, mtls, upgrading }, upstream::origin_form(&parts))
        };
        // On the client's head itself: the same on every attempt.
        if let Some(s) = span.as_ref() {
            s.inject(&mut parts.headers);
        }
        let upstream_body = match body.take() {
            Some(b) => Either::Left(b),
            None => Either::Right(Empty::new()),
        };
        let sent = std::time::Instant::now();
        // The endpoint's proxy counts the cost against the pod (and strips it).
        let hop = Some((&super::inbound::COST, &op.cost_header));
        let result =
            upstream::send(&shared.upstreams, via, &mut parts, hop, uri, upstream_body, timeout, may_retry).await;
        let fast = sent.elapsed() < FAST_FAILURE;
        match result {
            Ok(mut resp) => {
                if let Some(load) = resp.headers_mut().remove(super::inbound::LOAD) {
                    learn_load(endpoint, &load, &cost);
                }
                let status = resp.status();
                // A quick "no" must not make the endpoint look idle and attract more.
                if fast && matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
                    endpoint.load.record_fast_failure(now_ms());
                }
                if upstream::is_gateway_failure(status) {
                    if endpoint.load.record_failure(now_ms()) {
                        shared.metrics.data.ejections.inc();
                    }
                    if may_retry && shared.retry_budget.withdraw() {
                        shared.metrics.data.retries.inc();
                        tracing::debug!(endpoint = %target, %status, "forward: retrying on another endpoint");
                        avoid = Some(choice.index);
                        continue;
                    }
                } else {
                    endpoint.load.record_success();
                }
                if status == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(down) = downstream_upgrade.take()
                {
                    upstream::splice_upgrade(down, &mut resp, hold);
                    let (mut parts, _) = resp.into_parts();
                    upstream::strip_hop_by_hop(&mut parts.headers, true);
                    return logged(
                        shared,
                        &svc,
                        op,
                        started,
                        log,
                        Response::from_parts(parts, local(bytes::Bytes::new())),
                    );
                }
                let resp = resp.map(|rbody| Either::Left(Held::new(rbody, Some(hold))));
                return logged(shared, &svc, op, started, log, resp);
            }
            Err(f) => {
                if fast {
                    endpoint.load.record_fast_failure(now_ms());
                }
                if endpoint.load.record_failure(now_ms()) {
                    shared.metrics.data.ejections.inc();
                }
                let timed_out = matches!(f, Failure::Timeout(_));
                // A timed-out request may be running upstream: never send it twice.
                if may_retry && !timed_out && shared.retry_budget.withdraw() {
                    shared.metrics.data.retries.inc();
                    tracing::debug!(endpoint = %target, "forward: {f:?}; retrying on another endpoint");
                    avoid = Some(choice.index);
                    continue;
                }
                return logged(shared, &svc, op, started, log, failure_answer(f));
            }
        }
    }
}

/// Takes in an endpoint's in-band load report: the load all callers put on it, less
/// what this proxy still has in flight there (counted separately and live), is what
/// others put on it. That replaces the pushed view until the next one arrives.
fn learn_load(endpoint: &crate::select::endpoints::Endpoint, header: &HeaderValue, cost: &[u64; 3]) {
    let Some(ppm) = super::inbound::parse_load(header) else { return };
    let ours = endpoint.load.in_flight();
    let others: [u64; 3] = std::array::from_fn(|d| {
        let total = (u128::from(endpoint.capacity[d]) * u128::from(ppm[d]) / 1_000_000) as u64;
        // This request's own cost was already released on the other side.
        total.saturating_sub(ours[d].saturating_sub(cost[d]))
    });
    endpoint.load.set_reported(others, now_ms());
}

/// What the request log says about a request besides its service and operation.
#[derive(Debug)]
struct Outcome {
    started: std::time::Instant,
    trace_id: String,
    endpoint: String,
    endpoint_pod: Option<Arc<str>>,
    /// The identity the endpoint proved, when the request went over mTLS.
    endpoint_identity: Option<Arc<str>>,
    reason: String,
    attempts: u32,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            started: std::time::Instant::now(),
            trace_id: String::new(),
            endpoint: String::new(),
            endpoint_pod: None,
            endpoint_identity: None,
            reason: String::new(),
            attempts: 0,
        }
    }
}

/// Counts the request on its operation, hands its record to the request log (if any)
/// and returns `resp`.
fn logged(
    shared: &Shared,
    svc: &ServiceEntry,
    op: &crate::route::Operation,
    started: std::time::Instant,
    outcome: Option<Outcome>,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    op.stats.outbound.record(Some(resp.status().as_u16()), started.elapsed());
    if let (Some(log), Some(o)) = (&shared.request_log, outcome) {
        let reason = match resp.headers().get(REASON).and_then(|v| v.to_str().ok()) {
            Some(refused) if o.reason.is_empty() => refused.to_string(),
            _ => o.reason,
        };
        log.record(crate::telemetry::request_log::Record {
            time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            trace_id: o.trace_id,
            source: Arc::clone(&shared.settings.source),
            source_identity: shared.tls.as_ref().map(|t| Arc::clone(&t.id_str)).unwrap_or_else(|| Arc::from("")),
            service: Arc::clone(&svc.key),
            operation: Arc::clone(&op.operation_id),
            endpoint: o.endpoint,
            endpoint_pod: o.endpoint_pod.unwrap_or_else(|| Arc::from("")),
            endpoint_identity: o.endpoint_identity.unwrap_or_else(|| Arc::from("")),
            status: resp.status().as_u16(),
            latency_us: o.started.elapsed().as_micros() as u64,
            cost: op.cost.as_array(),
            reason,
            attempts: o.attempts,
        });
    }
    resp
}

/// Picks an endpoint with room, waiting up to the queue timeout; or the 503 to send.
async fn wait_for_room(
    shared: &Shared,
    svc: &ServiceEntry,
    cost: &[u64; 3],
    avoid: Option<usize>,
    op: &crate::route::Operation,
) -> Result<crate::select::Choice, Response<ProxyBody>> {
    let operation = &*op.operation_id;
    let deadline = tokio::time::Instant::now() + shared.settings.queue_timeout;
    let mut queued = false;
    loop {
        match svc.endpoints.pick(cost, avoid) {
            Ok(c) => return Ok(c),
            Err(nofit) if tokio::time::Instant::now() >= deadline || nofit.too_big || nofit.eligible == 0 => {
                let why = match (nofit.eligible, nofit.least_over) {
                    (0, _) => format!("no ready endpoints for {}", svc.key),
                    (_, _) if nofit.too_big => format!(
                        "none of the {} endpoints of {} has the resources operation {operation:?} needs",
                        svc.endpoints.endpoints.len(),
                        svc.key
                    ),
                    (n, None) => format!("no capacity on the {n} endpoints of {}", svc.key),
                    (n, Some(u)) => format!(
                        "no capacity: the least loaded of {n} endpoints of {} would be at {:.0}% with this request",
                        svc.key,
                        u * 100.0
                    ),
                };
                shared.metrics.data.no_capacity.inc();
                op.stats.shed();
                let mut r = answer(StatusCode::SERVICE_UNAVAILABLE, &why);
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Err(r);
            }
            // Room frees up as responses finish: wait for one to, then pick again. A
            // pushed load report can free room too, without a release: look again at
            // least every 50 ms.
            Err(_) => {
                if !queued {
                    queued = true;
                    op.stats.queued();
                }
                let slice = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
                crate::select::endpoints::released_or(slice).await;
            }
        }
    }
}

/// True when `target` is one of this proxy's own outbound listeners: a request sent
/// there comes straight back, and again, until the descriptors run out.
fn loops_back(target: SocketAddr, listeners: &[SocketAddr]) -> bool {
    listeners.iter().any(|l| {
        l.port() == target.port()
            && (l.ip() == target.ip()
                || (l.ip().is_unspecified() && (target.ip().is_loopback() || target.ip().is_unspecified())))
    })
}

/// A request for somewhere the mesh does not know: sent on unchanged.
async fn passthrough(shared: &Shared, conn: &ConnInfo, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let target = match conn.original_dst {
        Some(dst) => dst.to_string(),
        None => match authority(&req) {
            Some(a) if a.contains(':') && !a.ends_with(']') => a.to_string(),
            Some(a) => format!("{a}:80"),
            None => return answer(StatusCode::BAD_REQUEST, "request names no host; set Host or use an absolute URI"),
        },
    };
    if target.parse().is_ok_and(|t| loops_back(t, &shared.settings.outbound_listeners)) {
        let why = format!(
            "forwarding loop: {target} is this proxy's own outbound listener; name a destination in Host \
             (a mesh service, or the address the request is for)"
        );
        return answer(StatusCode::LOOP_DETECTED, &why);
    }
    let h2 = req.version() == Version::HTTP_2;
    let upgrading = !h2 && upstream::is_upgrade(&req);
    let downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let uri = match upstream::absolute_form(&parts, &target, false) {
        Ok(u) => u,
        Err(f) => return failure_answer(f),
    };
    let via = Via::Client { h2, upgrading };
    let timeout = shared.settings.request_timeout;
    match upstream::send(&shared.upstreams, via, &mut parts, None, uri, Either::Left(body), timeout, false).await {
        Ok(mut resp) => {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(down) = downstream_upgrade
            {
                upstream::splice_upgrade(down, &mut resp, ());
                let (mut p, _) = resp.into_parts();
                upstream::strip_hop_by_hop(&mut p.headers, true);
                return Response::from_parts(p, local(bytes::Bytes::new()));
            }
            let (mut p, b) = resp.into_parts();
            p.headers.remove(super::inbound::LOAD);
            Response::from_parts(p, Either::Left(Held::new(b, None)))
        }
        Err(f) => failure_answer(f),
    }
}

/// CONNECT host:port (explicit proxy use): a tunnel to a mesh endpoint or to the host.
async fn connect(shared: Arc<Shared>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(authority) = req.uri().authority().map(|a| a.to_string()) else {
        return answer(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let target = {
        let mesh = shared.mesh.load();
        let svc = mesh.by_host(&authority.to_ascii_lowercase(), &shared.settings.namespace).cloned();
        match svc {
            Some(svc) => {
                let conn = ConnInfo { original_dst: None, service: None, port: None };
                let port = service_port(&svc, &conn, Some(&authority));
                let cost = svc.routes.default_op().cost.as_array();
                match (port, svc.endpoints.pick(&cost, None)) {
                    (Some(p), Ok(c)) => svc.target(&svc.endpoints.endpoints[c.index], &p).to_string(),
                    _ => return answer(StatusCode::SERVICE_UNAVAILABLE, &format!("no endpoint for {}", svc.key)),
                }
            }
            None => authority.clone(),
        }
    };
    let addr = match tokio::net::lookup_host(&target).await.ok().and_then(|mut a| a.next()) {
        Some(a) => a,
        None => return answer(StatusCode::BAD_GATEWAY, &format!("cannot resolve {}", strip_port(&target))),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let timeout = shared.settings.connect_timeout;
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await
            && let Err(e) = super::tcp::splice(TokioIo::new(up), addr, timeout).await
        {
            tracing::debug!("forward: CONNECT tunnel to {addr}: {e}");
        }
    });
    Response::new(local(bytes::Bytes::new()))
}
