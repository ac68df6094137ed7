//! One upstream exchange: turn a downstream request into the request for a chosen
//! address (hop-by-hop headers off, origin-form URI, the upstream's HTTP version), send
//! it over the pool with a deadline, and classify what came back. Upgrades (WebSocket)
//! are spliced once both sides agree. It must not choose the address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::Upstreams;
use super::body::UpBody;
use super::pool::{self, EndpointConns};

/// The body sent upstream: the client's (first attempt) or none (a retry).
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Why an exchange produced no response.
#[derive(Debug)]
pub enum Failure {
    /// The request could not be sent or the connection broke: nothing was answered.
    Connection(String),
    Timeout(Duration),
    /// The target is not a usable authority.
    BadTarget(String),
    /// The client's own request body was malformed or cut short while being sent on
    /// (a bad chunk size, a body shorter than its Content-Length).
    BadRequestBody(String),
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
const HOP_COUNT: usize = 7;
static HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The lengths of those names and of `upgrade`, as bits: most names in a message have
/// none of these lengths, and a length is cheaper to test than seven names.
/// `hop_by_hop_lengths_cover_every_name` keeps the two lists in step.
const HOP_LENGTHS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 19;

fn may_be_hop_by_hop(n: &HeaderName) -> bool {
    let len = n.as_str().len();
    len < 32 && HOP_LENGTHS & (1 << len) != 0
}

/// Connection tokens that name no header.
fn names_no_header(token: &str) -> bool {
    token.eq_ignore_ascii_case("keep-alive")
        || token.eq_ignore_ascii_case("close")
        || token.eq_ignore_ascii_case("upgrade")
}

fn connection_tokens(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str().ok().into_iter().flat_map(|v| v.split(',')).map(str::trim)
}

/// Removes hop-by-hop headers, keeping `Upgrade`/`Connection: upgrade` when an
/// upgrade is being negotiated and `TE: trailers` (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // Which of them are here, in one pass over the headers: a hashed removal of each
    // name costs more than the whole pass, and most messages carry one at most
    // (`Connection: keep-alive`). What Connection names and whether TE is `trailers`
    // are read in the same pass rather than looked up again.
    let mut present = [false; HOP_COUNT];
    let mut has_upgrade = false;
    let mut names_others = false;
    let mut te_trailers = false;
    for (n, v) in headers.iter() {
        if !may_be_hop_by_hop(n) {
            continue;
        }
        match HOP_BY_HOP.iter().position(|h| h == n) {
            Some(i) => {
                if n == header::CONNECTION {
                    names_others |= connection_tokens(v).any(|t| !names_no_header(t));
                } else if n == header::TE && !present[i] {
                    te_trailers = v.as_bytes().eq_ignore_ascii_case(b"trailers");
                }
                present[i] = true;
            }
            None => has_upgrade |= n == header::UPGRADE,
        }
    }
    if !upgrading && !has_upgrade && !present.contains(&true) {
        return;
    }
    // Headers the Connection header names (besides its usual tokens) are hop-by-hop too.
    let named: Vec<HeaderName> = if names_others {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .filter(|t| !names_no_header(t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    for (h, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(h);
    }
    for h in &named {
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if has_upgrade {
        headers.remove(header::UPGRADE);
    }
}

pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// The request head to send upstream, from the client's: hop-by-hop headers off, the
/// upstream's HTTP version, `uri` as the target. `keep`: the client's head is needed
/// again (a retry may follow), so its headers are copied rather than moved.
pub fn prepare(parts: &mut Parts, uri: Uri, h2: bool, upgrading: bool, keep: bool) -> Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.headers = if keep { parts.headers.clone() } else { std::mem::take(&mut parts.headers) };
    if parts.version == Version::HTTP_2 && !head.headers.contains_key(header::HOST) {
        // HTTP/1 upstreams need Host; HTTP/2 carried it as :authority.
        if let Some(a) = parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            head.headers.insert(header::HOST, a);
        }
    }
    head.uri = uri;
    head.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    strip_hop_by_hop(&mut head.headers, upgrading);
    head
}

/// The request target in origin form (`/path?query`), as an endpoint's own pool sends
/// it: no authority to parse or format per request.
pub fn origin_form(parts: &Parts) -> Uri {
    match parts.uri.path_and_query() {
        Some(p) => Uri::from(p.clone()),
        None => Uri::from_static("/"),
    }
}

/// The request target in absolute form for hyper-util's clients, whose pools are keyed
/// by scheme and authority. `mtls`: the connector sees `https` and speaks mesh mTLS.
pub fn absolute_form(parts: &Parts, target: &str, mtls: bool) -> Result<Uri, Failure> {
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme(if mtls { "https" } else { "http" })
        .authority(target)
        .path_and_query(path)
        .build()
        .map_err(|e| Failure::BadTarget(format!("cannot forward to {target}: {e}")))
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub enum Via<'a> {
    /// HTTP/1 to a mesh endpoint (or the app), over that endpoint's own pool.
    /// `upgrading`: the request asks for an upgrade (WebSocket), which takes its
    /// connection over.
    Endpoint { conns: &'a Arc<EndpointConns>, addr: SocketAddr, mtls: bool, upgrading: bool },
    /// HTTP/2 to a mesh endpoint (or the app), over its shared connection.
    EndpointH2 { conns: &'a EndpointConns, addr: SocketAddr, mtls: bool },
    /// hyper-util's client for HTTP/2 (or HTTP/1 for passthrough); the head's URI is
    /// in absolute form.
    Client { h2: bool, upgrading: bool },
}

/// Sends one request; the deadline covers the time to the response head. `parts` is
/// the client's head, with the headers for this hop already set (cost, trace). Over an
/// endpoint's HTTP/1 pool it is sent from where it is, its hop-by-hop headers taken
/// off in place (the same edit on a retry): nothing is copied. The hyper paths get
/// `prepare`'s head with `uri` as its target, copied when `keep` (a retry may follow).
/// `extra`, a header for this hop, replaces any of its name the client sent, without
/// touching the client's head. The response comes back without hop-by-hop headers, but for a 101's (the caller
/// splices the upgrade and keeps `Upgrade`).
#[allow(clippy::too_many_arguments)] // three call sites; a struct would only rename them
pub async fn send(
    upstreams: &Upstreams,
    via: Via<'_>,
    parts: &mut Parts,
    extra: super::h1::wire::Extra<'_>,
    uri: Uri,
    body: UpstreamBody,
    timeout: Duration,
    keep: bool,
) -> Result<Response<UpBody>, Failure> {
    let head = |parts: &mut Parts, uri| {
        let mut head = prepare(parts, uri, h2_of(via), upgrading_of(via), keep);
        if let Some((n, v)) = extra {
            head.headers.insert(n.clone(), v.clone());
        }
        head
    };
    let mut resp = match via {
        Via::Endpoint { conns, addr, mtls, upgrading: false } => {
            strip_hop_by_hop(&mut parts.headers, false);
            // An HTTP/2 client's authority, or the address: HTTP/1 needs a Host (an
            // HTTP/1.0 client may send none).
            if !parts.headers.contains_key(header::HOST) {
                let host = parts.uri.authority().map(|a| HeaderValue::from_str(a.as_str()));
                if let Some(Ok(v)) = host.or_else(|| Some(HeaderValue::try_from(addr.to_string()))) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let sent =
                pool::send(&upstreams.connector, &upstreams.pool, conns, addr, mtls, deadline, parts, extra, body)
                    .await;
            // Our HTTP/1 client leaves hop-by-hop headers out as it reads the head.
            return pool_result(sent, addr, timeout);
        }
        Via::Endpoint { addr, mtls, upgrading: true, .. } => {
            let mut req = Request::from_parts(head(parts, uri), body);
            if !req.headers().contains_key(header::HOST)
                && let Ok(v) = HeaderValue::try_from(addr.to_string())
            {
                req.headers_mut().insert(header::HOST, v);
            }
            let deadline = tokio::time::Instant::now() + timeout;
            // Boxed: rare, and its state would make every request's future larger.
            let sent = Box::pin(pool::upgrade(&upstreams.connector, addr, mtls, deadline, req)).await;
            pool_result(sent, addr, timeout)
        }
        Via::EndpointH2 { conns, addr, mtls } => {
            let req = Request::from_parts(head(parts, uri), body);
            let sent = pool::send_h2(&upstreams.connector_h2, conns, addr, mtls, req);
            match tokio::time::timeout(timeout, sent).await {
                Ok(sent) => pool_result(sent.map(|r| r.map(UpBody::Hyper)), addr, timeout),
                Err(_) => Err(Failure::Timeout(timeout)),
            }
        }
        Via::Client { h2, .. } => {
            let req = Request::from_parts(head(parts, uri), body);
            let client = if h2 { &upstreams.http2 } else { &upstreams.http1 };
            // For error messages only: a cheap clone (shared bytes), formatted only on failure.
            let uri = req.uri().clone();
            match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(r)) => Ok(r.map(UpBody::Hyper)),
                Ok(Err(e)) => Err(exchange_failed(&e, &uri.authority().map(|a| a.as_str()).unwrap_or_default())),
                Err(_) => Err(Failure::Timeout(timeout)),
            }
        }
    }?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    Ok(resp)
}

fn h2_of(via: Via<'_>) -> bool {
    matches!(via, Via::EndpointH2 { .. } | Via::Client { h2: true, .. })
}

fn upgrading_of(via: Via<'_>) -> bool {
    matches!(via, Via::Endpoint { upgrading: true, .. } | Via::Client { upgrading: true, .. })
}

fn pool_result(
    sent: Result<Response<UpBody>, pool::SendError>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Response<UpBody>, Failure> {
    match sent {
        Ok(resp) => Ok(resp),
        Err(pool::SendError::Connect(e)) => {
            Err(Failure::Connection(format!("upstream {addr} failed: connect: {}", crate::error_chain(&e))))
        }
        Err(pool::SendError::Http(e)) => Err(exchange_failed(&e, &addr)),
        Err(pool::SendError::H1(super::h1::Error::RequestBody(e))) => {
            Err(Failure::BadRequestBody(format!("request body could not be read: {}", crate::error_chain(&*e))))
        }
        Err(pool::SendError::H1(e)) => {
            Err(Failure::Connection(format!("upstream {addr} failed: {}", crate::error_chain(&e))))
        }
        Err(pool::SendError::Timeout) => Err(Failure::Timeout(timeout)),
    }
}

fn exchange_failed(e: &(dyn std::error::Error + 'static), target: &dyn std::fmt::Display) -> Failure {
    if caused_by_request_body(e) {
        Failure::BadRequestBody(format!("request body could not be read: {}", crate::error_chain(e)))
    } else {
        Failure::Connection(format!("upstream {target} failed: {}", crate::error_chain(e)))
    }
}

/// Splices an agreed upgrade (101) between the two sides in the background.
pub fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, resp: &mut Response<UpBody>, hold: impl Send + 'static) {
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        let _hold = hold;
        match (downstream.await, upstream.await) {
            (Ok(d), Ok(u)) => {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
            }
            (d, u) => tracing::debug!("forward: upgrade failed: {:?} {:?}", d.err(), u.err()),
        }
    });
}

/// A response the upstream's own proxy or runtime produced for being unable to serve:
/// counts against the endpoint, and may be retried.
pub fn is_gateway_failure(status: StatusCode) -> bool {
    matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

/// True when hyper failed because the body we were streaming (the client's) failed.
fn caused_by_request_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_user() || h.is_parse() || h.is_incomplete_message())
        {
            return true;
        }
        cur = err.source();
    }
    false
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

        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-app"], "Upgrade without Connection");

        let mut h = HeaderMap::new();
        h.insert("x-app", HeaderValue::from_static("kept"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "nothing hop-by-hop: nothing removed");
    }

    #[test]
    fn hop_by_hop_lengths_cover_every_name() {
        for n in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            assert!(may_be_hop_by_hop(n), "{n} is screened out by HOP_LENGTHS");
        }
        assert!(!may_be_hop_by_hop(&header::CONTENT_TYPE));
    }

    #[test]
    fn connection_names_are_read_in_the_same_pass() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("Close, X-Later"));
        h.insert("x-later", HeaderValue::from_static("1"));
        h.append(header::TE, HeaderValue::from_static("gzip"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-app"], "the first TE decides, as before");
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

    #[test]
    fn prepare_targets_the_chosen_address() {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.uri = "http://orders.shop/a/b?c=1".parse().expect("uri");
        parts.headers.insert(header::HOST, HeaderValue::from_static("orders.shop"));
        let uri = absolute_form(&parts, "10.1.0.7:8080", false).expect("ok");
        let head = prepare(&mut parts, uri, false, false, true);
        assert_eq!(head.uri.to_string(), "http://10.1.0.7:8080/a/b?c=1");
        assert_eq!(parts.headers[header::HOST], "orders.shop", "kept for a retry");
        let uri = origin_form(&parts);
        let head = prepare(&mut parts, uri, false, false, false);
        assert_eq!(head.uri.to_string(), "/a/b?c=1", "an endpoint's pool sends origin form");
        assert!(parts.headers.is_empty(), "moved, not copied, when no retry can follow");
        assert_eq!(head.headers[header::HOST], "orders.shop", "Host is kept for the app");
        assert_eq!(head.version, Version::HTTP_11);
    }
}
