//! HTTP forwarding: one request in, its route and endpoint decided, the request sent
//! upstream over a pooled connection, and the response streamed back.
//!
//! Hop-by-hop headers stay on their hop; upgrades (WebSocket) and CONNECT tunnels are
//! spliced once both sides agree. Errors become small local answers that say what
//! failed (`x-neutrino-reason`). It must not buffer bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use neutrino_proto::Protocol as PortProtocol;

use super::Shared;
use super::body::{Held, ProxyBody, local};
use crate::route::{PortEntry, ServiceEntry, strip_port};
use crate::select::endpoints::InFlight;

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

fn answer(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let mut r = Response::new(local(format!("{reason}\n")));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(reason) {
        r.headers_mut().insert(REASON, v);
    }
    r
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, keeping `Upgrade`/`Connection: upgrade` when an
/// upgrade is being negotiated and `TE: trailers` (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrading && *n == header::UPGRADE))
        .collect();
    let te_trailers = headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for h in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
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
    let service = match &conn.service {
        Some(s) => Some(Arc::clone(s)),
        None => {
            let mesh = shared.mesh.load();
            authority(&req).and_then(|a| mesh.by_host(&a.to_ascii_lowercase(), &shared.settings.namespace).cloned())
        }
    };
    match service {
        Some(svc) => to_service(&shared, &conn, svc, req).await,
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

async fn to_service(
    shared: &Shared,
    conn: &ConnInfo,
    svc: Arc<ServiceEntry>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let Some(port) = service_port(&svc, conn, authority(&req)) else {
        return answer(StatusCode::BAD_GATEWAY, &format!("service {} has no such port", svc.key));
    };
    let op = svc.routes.lookup(req.method(), req.uri().path());
    let cost = op.cost.as_array();
    let timeout = op.timeout.unwrap_or(shared.settings.request_timeout);
    // Queue briefly for room; then refuse with the reason.
    let started = Instant::now();
    let choice = loop {
        match svc.endpoints.pick(&cost) {
            Ok(c) => break c,
            Err(nofit)
                if started.elapsed() >= shared.settings.queue_timeout || nofit.too_big || nofit.eligible == 0 =>
            {
                let why = match (nofit.eligible, nofit.least_over) {
                    (0, _) => format!("no ready endpoints for {}", svc.key),
                    (n, _) if nofit.too_big => format!(
                        "none of the {n} endpoints of {} has the resources operation {:?} needs",
                        svc.key, &*op.operation_id
                    ),
                    (n, None) => format!("no capacity on the {n} endpoints of {}", svc.key),
                    (n, Some(u)) => format!(
                        "no capacity: the least loaded of {n} endpoints of {} would be at {:.0}% with this request",
                        svc.key,
                        u * 100.0
                    ),
                };
                let mut r = answer(StatusCode::SERVICE_UNAVAILABLE, &why);
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    let endpoint = &svc.endpoints.endpoints[choice.index];
    let target = svc.target(endpoint, &port);
    let hold = InFlight::new(Arc::clone(&endpoint.load), cost);
    let h2 = match port.protocol {
        PortProtocol::Http2 | PortProtocol::Grpc => true,
        PortProtocol::Http1 => false,
        _ => req.version() == Version::HTTP_2,
    };
    send(shared, target, h2, timeout, req, Some(hold)).await
}

/// A request for somewhere the mesh does not know: sent on unchanged.
async fn passthrough(shared: &Shared, conn: &ConnInfo, req: Request<Incoming>) -> Response<ProxyBody> {
    let target = match conn.original_dst {
        Some(dst) => dst.to_string(),
        None => match authority(&req) {
            Some(a) if a.contains(':') && !a.ends_with(']') => a.to_string(),
            Some(a) => format!("{a}:80"),
            None => return answer(StatusCode::BAD_REQUEST, "request names no host; set Host or use an absolute URI"),
        },
    };
    let h2 = req.version() == Version::HTTP_2;
    send_to(shared, &target, h2, shared.settings.request_timeout, req, None).await
}

async fn send(
    shared: &Shared,
    target: SocketAddr,
    h2: bool,
    timeout: Duration,
    req: Request<Incoming>,
    hold: Option<InFlight>,
) -> Response<ProxyBody> {
    send_to(shared, &target.to_string(), h2, timeout, req, hold).await
}

async fn send_to(
    shared: &Shared,
    target: &str,
    h2: bool,
    timeout: Duration,
    mut req: Request<Incoming>,
    hold: Option<InFlight>,
) -> Response<ProxyBody> {
    let upgrading = !h2 && is_upgrade(&req);
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let uri = match Uri::builder().scheme("http").authority(target).path_and_query(path).build() {
        Ok(u) => u,
        Err(e) => return answer(StatusCode::BAD_REQUEST, &format!("cannot forward to {target}: {e}")),
    };
    let downstream_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if parts.version == Version::HTTP_2 && !parts.headers.contains_key(header::HOST) {
        // HTTP/1 upstreams need Host; HTTP/2 carried it as :authority.
        if let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(header::HOST, a);
        }
    }
    parts.uri = uri;
    parts.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    strip_hop_by_hop(&mut parts.headers, upgrading);
    let upstream_req = Request::from_parts(parts, body);
    let client = if h2 { &shared.upstreams.http2 } else { &shared.upstreams.http1 };
    let mut resp = match tokio::time::timeout(timeout, client.request(upstream_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let why = format!("upstream {target} failed: {}", error_chain(&e));
            tracing::debug!("forward: {why}");
            return answer(StatusCode::BAD_GATEWAY, &why);
        }
        Err(_) => {
            return answer(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("upstream {target} did not answer within {timeout:?}"),
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(down) = downstream_upgrade
    {
        let up = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _hold = hold;
            match (down.await, up.await) {
                (Ok(d), Ok(u)) => {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
                }
                (d, u) => tracing::debug!("forward: upgrade failed: {:?} {:?}", d.err(), u.err()),
            }
        });
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, local(bytes::Bytes::new()));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, Either::Left(Held::new(body, hold)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
                match (port, svc.endpoints.pick(&cost)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-app", "te"]);
    }

    #[test]
    fn upgrades_keep_their_negotiation() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).map(|v| v.as_bytes()), Some(&b"websocket"[..]));
        assert_eq!(h.get(header::CONNECTION).map(|v| v.as_bytes()), Some(&b"upgrade"[..]));
    }
}
