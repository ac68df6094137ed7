//! `neutrino-sample-app`: a small real application for the demo mesh and the
//! end-to-end tests, and the clients that talk to it.
//!
//! `serve` answers HTTP/1.1 and h2c (JSON saying who answered and what arrived; `/ws`
//! is a WebSocket echo; `/delay/<ms>` waits; a `work-ms` query burns that much time to
//! stand in for real work) and runs a TCP echo that honours half-close. `ws-client`
//! and `tcp-client` are the matching clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

#[derive(Debug, Parser)]
#[command(name = "neutrino-sample-app", version, about = "Sample app and clients for Neutrino demos and tests")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1 + h2c (and WebSocket at /ws), and optionally a TCP echo.
    Serve {
        #[arg(long, default_value = "0.0.0.0:8080")]
        http: SocketAddr,
        #[arg(long)]
        tcp: Option<SocketAddr>,
        /// Reported in every answer, to show which backend served a request.
        #[arg(long, default_value = "app")]
        name: String,
    },
    /// Send one WebSocket text message and print the echo.
    WsClient { url: String, message: String },
    /// Send bytes, half-close, and print everything the server sends back.
    TcpClient { addr: String, message: String },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Serve { http, tcp, name } => serve(http, tcp, name).await,
        Cmd::WsClient { url, message } => {
            let (mut ws, _) =
                tokio_tungstenite::connect_async(&url).await.with_context(|| format!("connecting to {url}"))?;
            ws.send(Message::text(message)).await?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) => println!("{t}"),
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
            ws.close(None).await?;
            Ok(())
        }
        Cmd::TcpClient { addr, message } => {
            let mut s = TcpStream::connect(&addr).await.with_context(|| format!("connecting to {addr}"))?;
            s.write_all(message.as_bytes()).await?;
            s.shutdown().await?;
            let mut back = String::new();
            s.read_to_string(&mut back).await?;
            println!("{back}");
            Ok(())
        }
    }
}

async fn serve(http: SocketAddr, tcp: Option<SocketAddr>, name: String) -> anyhow::Result<()> {
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding TCP echo on {addr}"))?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    // Echo until the client half-closes, then close our side too.
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    }
    let listener = TcpListener::bind(http).await.with_context(|| format!("binding HTTP on {http}"))?;
    println!("{name}: serving HTTP on {http}");
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(name.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(name: String, mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/ws" {
        return Ok(websocket(&mut req));
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let method = req.method().to_string();
    let version = format!("{:?}", req.version());
    let mut body = req.into_body();
    let mut len = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        len += frame.data_ref().map(|d| d.len()).unwrap_or(0);
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(ms) = query.split('&').find_map(|kv| kv.strip_prefix("work-ms=")).and_then(|m| m.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let json =
        serde_json::json!({ "backend": name, "method": method, "path": path, "version": version, "body_len": len });
    let mut r = Response::new(Full::new(Bytes::from(json.to_string())));
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(r)
}

/// Accepts a WebSocket upgrade and echoes every message back.
fn websocket(req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get("sec-websocket-key").map(|k| derive_accept_key(k.as_bytes())) else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"expected a WebSocket upgrade\n")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                if ws.send(msg).await.is_err() {
                    return;
                }
            } else if msg.is_close() {
                return;
            }
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", hyper::header::HeaderValue::from_static("websocket"));
    h.insert("connection", hyper::header::HeaderValue::from_static("upgrade"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&key) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
