//! The gRPC unary backend of the data-path benchmark (`benches/dataplane`).
//!
//! Serves `bench.Echo/Unary` (`bench.proto` next to this file) with tonic over h2c
//! (plaintext HTTP/2, prior knowledge) on `--addr`: every call gets the same reply, a
//! `--reply-bytes` payload (1 KiB by default) built once at start-up. It runs on a
//! current-thread tokio runtime, one thread serving everything, so that it is comparable
//! to the one-worker nginx backend of the HTTP workloads. It prints one `listening on`
//! line when ready and exits on SIGTERM or Ctrl-C.
//!
//! It must not do any work per call beyond decoding the request and encoding the reply
//! (no logging, no allocation of the payload), and must not accept HTTP/1: it is the
//! fixed point the proxies are measured against, not a test of anything itself.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use prost::bytes::Bytes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

mod pb {
    tonic::include_proto!("bench");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

#[derive(Debug, Parser)]
#[command(about = "gRPC unary backend for the data-path benchmark (bench.Echo/Unary over h2c)")]
struct Args {
    /// Address to listen on (h2c, prior knowledge).
    #[arg(long, default_value = "127.0.0.1:18084")]
    addr: SocketAddr,
    /// Size of every reply's payload, in bytes.
    #[arg(long, default_value_t = 1024)]
    reply_bytes: usize,
}

#[derive(Debug)]
struct Backend {
    reply: Bytes,
}

#[tonic::async_trait]
impl Echo for Backend {
    async fn unary(&self, _request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply { payload: self.reply.clone() }))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("building the runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let backend = Backend { reply: Bytes::from(vec![b'x'; args.reply_bytes]) };
    println!("grpc-backend: listening on {} (h2c), bench.Echo/Unary, {} byte replies", args.addr, args.reply_bytes);
    let stop = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("grpc-backend: cannot watch SIGTERM ({e}); Ctrl-C only");
                return drop(tokio::signal::ctrl_c().await);
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let server = Server::builder().add_service(EchoServer::new(backend)).serve_with_incoming(incoming);
    // On a signal, stop at once: a graceful shutdown would wait for the proxies' pooled
    // upstream connections, which stay open.
    tokio::select! {
        r = server => r.context("serving")?,
        () = stop => {}
    }
    Ok(())
}
