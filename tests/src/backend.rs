//! A real HTTP/1.1 + h2c backend for the end-to-end tests, served from the test
//! process on a loopback port. It answers every request with JSON saying who it is
//! and what it received, so tests can see which endpoint a request reached.
//!
//! `GET /delay/<ms>` waits before answering; `/status/<code>` answers with that code.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub struct Backend {
    pub name: String,
    pub port: u16,
    pub served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// How a backend behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Every request gets a 503, as from an overloaded app.
    Failing,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_with(name, Mode::Normal).await
    }

    pub async fn start_with(name: &str, mode: Mode) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let port = listener.local_addr().expect("addr").port();
        let served = Arc::new(AtomicU64::new(0));
        let (n, count) = (name.to_string(), Arc::clone(&served));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (n, count) = (n.clone(), Arc::clone(&count));
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(n.clone(), Arc::clone(&count), mode, req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { name: name.to_string(), port, served, task }
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

async fn answer(
    name: String,
    count: Arc<AtomicU64>,
    mode: Mode,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    count.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or_default().to_string();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_str().unwrap_or_default())))
        .collect();
    // Read the body frame by frame: the length proves it arrived whole.
    let mut body = req.into_body();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => len += f.data_ref().map(|d| d.len()).unwrap_or(0),
            Err(_) => break,
        }
    }
    let mut status = if mode == Mode::Failing { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    }
    let json = serde_json::json!({
        "backend": name, "method": method, "path": path, "host": host,
        "version": version, "body_len": len, "headers": headers,
    });
    let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(resp)
}
