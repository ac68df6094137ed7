//! Step 8b, the webhook server (feature `server`): HTTPS (HTTP/1.1 and HTTP/2) around
//! [`crate::review::review`].
//!
//! Routes: `POST /mutate` (and its alias `POST /inject`) answer an AdmissionReview;
//! `GET /ready` and `GET /live` answer 200. Bodies over the limit (4 MiB by default) get
//! 413 and are never buffered; a body that is not an AdmissionReview gets 400 with the
//! reason; wrong methods 405, other paths 404. TLS handshakes and request heads each have
//! 10 s, bodies 30 s. On shutdown the listener closes and open connections are drained
//! gracefully for up to the drain timeout.
//!
//! The Event an answer carries (a skipped or denied pod) is handed to the recorder, which
//! queues it without waiting: the answer never waits for the Kubernetes API.
//!
//! This module must not decide anything about pods: it moves bytes to and from `review`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::InjectConfig;
use crate::recorder::Recorder;
use crate::review::{self, Decision};

/// The default request body limit: 4 MiB (the API server's own limit is 3 MiB per object).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server needs besides the listener and TLS.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What is injected; swapped whole when the trust anchors file changes
    /// ([`crate::anchors::watch`]), so each review sees one consistent config.
    pub inject: Arc<ArcSwap<InjectConfig>>,
    pub max_body_bytes: usize,
    pub drain_timeout: Duration,
    /// Where the answers' Events go (disabled: nowhere).
    pub recorder: Recorder,
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn text(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

fn too_large(limit: usize) -> Response<Full<Bytes>> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is over the limit of {limit} bytes (--max-body-bytes)"),
    )
}

/// Answers one request.
pub async fn handle(req: Request<Incoming>, settings: Arc<Settings>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let response = match (req.method(), path.as_str()) {
        (&Method::GET | &Method::HEAD, "/ready" | "/live") => text(StatusCode::OK, "ok"),
        (&Method::POST, "/mutate" | "/inject") => mutate(req, &settings).await,
        (_, "/mutate" | "/inject") => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST with an AdmissionReview body");
            r.headers_mut().insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
            r
        }
        (_, "/ready" | "/live") => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET");
            r.headers_mut().insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: the webhook is POST /mutate; health is GET /ready"),
    };
    Ok(response)
}

/// Why a body was not read whole.
enum BodyError {
    TooLarge,
    TimedOut,
    Read(hyper::Error),
}

/// Reads a body of at most `limit` bytes. Past the limit the rest is read and dropped
/// (up to four times the limit), so the client, still sending, gets to read the 413
/// instead of a connection reset.
async fn read_body(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let drain_cap = limit.saturating_mul(4);
    let read = async {
        let mut buf = BytesMut::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else { continue };
            seen = seen.saturating_add(data.len());
            if seen > drain_cap {
                break;
            }
            if seen <= limit {
                buf.extend_from_slice(&data);
            }
        }
        if seen > limit { Err(BodyError::TooLarge) } else { Ok(buf.freeze()) }
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read).await.unwrap_or(Err(BodyError::TimedOut))
}

async fn mutate(req: Request<Incoming>, settings: &Settings) -> Response<Full<Bytes>> {
    let limit = settings.max_body_bytes;
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.saturating_mul(4) as u64) {
        return too_large(limit);
    }
    let body = match read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(limit),
        Err(BodyError::TimedOut) => {
            return text(StatusCode::REQUEST_TIMEOUT, format!("the request body took over {BODY_READ_TIMEOUT:?}"));
        }
        Err(BodyError::Read(e)) => return text(StatusCode::BAD_REQUEST, format!("reading the request body: {e}")),
    };
    match review::review(&body, &settings.inject.load()) {
        Ok(mut answer) => {
            match &answer.decision {
                Decision::Denied(why) => tracing::warn!(uid = %answer.uid, "denied: {why}"),
                d => tracing::info!(uid = %answer.uid, decision = ?d, "reviewed"),
            }
            if let Some(event) = answer.event.take() {
                settings.recorder.record(event);
            }
            match serde_json::to_vec(&answer.body) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the response: {e}")),
            }
        }
        Err(e) => {
            tracing::warn!("bad request: {e}");
            text(StatusCode::BAD_REQUEST, e)
        }
    }
}

/// Serves HTTPS on `listener` until `shutdown` completes, then drains open connections
/// for up to `settings.drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: Arc<Settings>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let settings = settings.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| handle(req, settings.clone()));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining open connections");
    if tokio::time::timeout(settings.drain_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timeout: closing the remaining connections");
    }
}
