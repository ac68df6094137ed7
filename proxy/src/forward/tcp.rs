//! Opaque TCP: splices two connections until both directions end, passing half-close
//! through (a client that shuts down its write side still gets the server's answer).
//! Also the one place that opens connections to endpoints: plain, or mesh mTLS to a
//! meshed endpoint, verified against the identity discovery gives it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::{Alpn, MeshTls};
use crate::metrics::{HandshakeLabel, Metrics};

/// A TCP connection to `target`, within `connect_timeout`.
pub async fn connect(target: SocketAddr, connect_timeout: Duration) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {target} timed out"))
    })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A mesh mTLS connection to `target`, whose proxy must prove it is `peer`.
pub async fn connect_mesh(
    target: SocketAddr,
    tls: &MeshTls,
    peer: &str,
    alpn: Alpn,
    connect_timeout: Duration,
    metrics: &Metrics,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = connect(target, connect_timeout).await?;
    let name = MeshTls::peer_server_name(peer).map_err(std::io::Error::other)?;
    let connector = tokio_rustls::TlsConnector::from(tls.client_config(peer, alpn));
    let result = tokio::time::timeout(connect_timeout, connector.connect(name, tcp)).await;
    let label = |result| HandshakeLabel { direction: "outbound", result };
    match result {
        Ok(Ok(s)) => {
            metrics.security.handshakes.get_or_create(&label("ok")).inc();
            Ok(s)
        }
        Ok(Err(e)) => {
            metrics.security.handshakes.get_or_create(&label("error")).inc();
            Err(std::io::Error::other(format!("mTLS to {target} (expecting {peer}): {e}")))
        }
        Err(_) => {
            metrics.security.handshakes.get_or_create(&label("timeout")).inc();
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("mTLS handshake with {target} timed out")))
        }
    }
}

/// Connects to `target` and splices `downstream` with it. Returns bytes moved each way.
pub async fn splice<IO>(downstream: IO, target: SocketAddr, connect_timeout: Duration) -> std::io::Result<(u64, u64)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = connect(target, connect_timeout).await?;
    splice_with(downstream, upstream).await
}

/// Splices `downstream` with an open `upstream`.
pub async fn splice_with<A, B>(mut downstream: A, mut upstream: B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
}

/// Where an opaque outbound connection goes: plain, or mesh mTLS to `peer`.
pub async fn splice_to_endpoint<IO>(
    downstream: IO,
    target: SocketAddr,
    mesh_peer: Option<(&Arc<MeshTls>, &str)>,
    connect_timeout: Duration,
    metrics: &Metrics,
) -> std::io::Result<(u64, u64)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match mesh_peer {
        Some((tls, peer)) => {
            let up = connect_mesh(target, tls, peer, Alpn::None, connect_timeout, metrics).await?;
            splice_with(downstream, up).await
        }
        None => splice(downstream, target, connect_timeout).await,
    }
}
