//! Opaque TCP: splices two connections until both directions end, passing half-close
//! through (a client that shuts down its write side still gets the server's answer).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Connects to `target` and splices `downstream` with it. Returns bytes moved each way.
pub async fn splice<IO>(
    mut downstream: IO,
    target: SocketAddr,
    connect_timeout: Duration,
) -> std::io::Result<(u64, u64)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {target} timed out"))
    })??;
    upstream.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
}
