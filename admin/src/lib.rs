//! Admin HTTP: the tiny plaintext server behind `/live`, `/ready`, `/metrics` and the
//! dumps of every Neutrino binary.
//!
//! It only serves what a handler returns for a path; it must not reach into the data
//! path or hold state of its own, and it must never be exposed as a mesh listener.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What a handler answers for one path.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Reply { status, content_type: "text/plain; charset=utf-8", body: Bytes::from(body.into()) }
    }

    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Reply { status, content_type: "application/json", body: Bytes::from(body.into()) }
    }

    /// Prometheus text exposition (OpenMetrics text is what prometheus-client encodes).
    pub fn metrics(body: String) -> Self {
        Reply {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: Bytes::from(body),
        }
    }

    pub fn not_found(path: &str) -> Self {
        Reply::text(404, format!("no admin endpoint at {path}\n"))
    }
}

/// Serves GET requests on `listener` until the task is dropped. Each request's path
/// (without the query) goes to `handler`.
pub async fn serve<H>(listener: TcpListener, handler: H)
where
    H: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Usually EMFILE; back off briefly instead of spinning.
                tracing::warn!(error = %e, "admin: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = Arc::clone(&handler);
                async move { Ok::<_, Infallible>(respond(&req, handler.as_ref())) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "admin: connection ended with an error");
            }
        });
    }
}

fn respond<H: Fn(&str) -> Reply>(req: &Request<hyper::body::Incoming>, handler: &H) -> Response<Full<Bytes>> {
    let reply = if req.method() == Method::GET || req.method() == Method::HEAD {
        handler(req.uri().path())
    } else {
        Reply::text(405, "admin endpoints are read-only: use GET\n")
    };
    let mut resp = Response::new(Full::new(reply.body));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(reply.content_type));
    resp
}
