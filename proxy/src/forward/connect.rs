//! Connect: the upstream pools' connector. `http://` targets get a plain TCP
//! connection; `https://` targets (chosen by forward for meshed endpoints) get mesh
//! mTLS, verified against the identity the compiled mesh gives the endpoint's address
//! at connect time. It must not pick endpoints or look at requests.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::{Alpn, MeshTls};
use crate::metrics::Metrics;
use crate::route::Mesh;

/// An upstream connection: plain, or mesh mTLS.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(_) => Connected::new(),
            UpstreamIo::Tls(t) => {
                let h2 = t.inner().get_ref().1.alpn_protocol() == Some(b"h2");
                if h2 { Connected::new().negotiated_h2() } else { Connected::new() }
            }
        }
    }
}

impl Read for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connector of one upstream pool (one ALPN per pool: h2 or http/1.1).
#[derive(Debug, Clone)]
pub struct MeshConnector {
    pub tls: Option<Arc<MeshTls>>,
    pub mesh: Arc<ArcSwap<Mesh>>,
    pub alpn: Alpn,
    pub connect_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

impl MeshConnector {
    /// A connection to `target`: plain TCP, or mesh mTLS verified against the identity
    /// the compiled mesh gives `target` now.
    pub async fn open(&self, target: SocketAddr, mtls: bool) -> std::io::Result<UpstreamIo> {
        if !mtls {
            return Ok(UpstreamIo::Plain(TokioIo::new(super::tcp::connect(target, self.connect_timeout).await?)));
        }
        let Some(tls) = &self.tls else {
            return Err(std::io::Error::other("mTLS requested but this proxy has no identity"));
        };
        let peer = self.mesh.load().identity_of(target.ip()).cloned().ok_or_else(|| {
            std::io::Error::other(format!("{target} is no longer a meshed endpoint; its identity is unknown"))
        })?;
        let s = super::tcp::connect_mesh(target, tls, &peer, self.alpn, self.connect_timeout, &self.metrics).await?;
        Ok(UpstreamIo::Tls(Box::new(TokioIo::new(s))))
    }

    async fn connect(self, uri: Uri) -> std::io::Result<UpstreamIo> {
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let target: SocketAddr = authority.parse().map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{authority:?} is not an address"))
        })?;
        self.open(target, uri.scheme_str() == Some("https")).await
    }
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = UpstreamIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<UpstreamIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}
