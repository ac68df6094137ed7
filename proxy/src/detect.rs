//! Detect: what protocol a new connection speaks, from its first bytes.
//!
//! One bounded read (at most [`PEEK_MAX`] bytes, within a timeout) classifies the
//! connection as HTTP/1.x, HTTP/2 with prior knowledge, a TLS ClientHello, or opaque
//! TCP; the bytes read are replayed to whoever handles the connection next
//! ([`Rewind`]). Ports where the server speaks first are never sniffed: waiting for
//! the client there would stall the protocol. Classification is a pure function; it
//! must not interpret more than the first bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Enough for the HTTP/2 preface, the longest thing we recognise.
pub const PEEK_MAX: usize = 24;

/// Where the server talks first (SMTP, FTP, POP3, IMAP, MySQL, PostgreSQL, Redis,
/// Memcached, MongoDB, ...): never sniffed. Configurable with --no-sniff-ports.
pub const DEFAULT_SERVER_FIRST_PORTS: &[u16] =
    &[21, 22, 25, 110, 143, 465, 587, 993, 995, 3306, 5432, 6379, 11211, 27017];

const METHODS: &[&[u8]] =
    &[b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1",
            Protocol::Http2 => "h2c",
            Protocol::Tls => "tls",
            Protocol::Tcp => "tcp",
        }
    }
}

/// What the first bytes say: a protocol, or that more bytes are needed to tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Is(Protocol),
    NeedMore,
}

/// Classifies a connection by its first bytes. Pure.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf[0] == 0x16 {
        // TLS handshake record; the version's major byte is 3 for every TLS version.
        return match buf.get(1) {
            None => Verdict::NeedMore,
            Some(3) => Verdict::Is(Protocol::Tls),
            Some(_) => Verdict::Is(Protocol::Tcp),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Verdict::Is(Protocol::Http2) } else { Verdict::NeedMore };
    }
    let mut could_be_method = false;
    for m in METHODS {
        let k = buf.len().min(m.len());
        if buf[..k] == m[..k] {
            if buf.len() >= m.len() {
                return Verdict::Is(Protocol::Http1);
            }
            could_be_method = true;
        }
    }
    if could_be_method { Verdict::NeedMore } else { Verdict::Is(Protocol::Tcp) }
}

/// Reads the first bytes of `io` (at most [`PEEK_MAX`], for at most `timeout`) and
/// classifies them. Silence until the timeout, or EOF, means opaque TCP.
pub async fn detect<IO: AsyncRead + Unpin>(io: &mut IO, timeout: Duration) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(PEEK_MAX);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Verdict::Is(p) = classify(&buf) {
            return Ok((p, buf.freeze()));
        }
        if buf.len() >= PEEK_MAX {
            return Ok((Protocol::Tcp, buf.freeze()));
        }
        let mut chunk = [0u8; PEEK_MAX];
        let want = PEEK_MAX - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want])).await {
            Err(_elapsed) => return Ok((Protocol::Tcp, buf.freeze())),
            Ok(Ok(0)) => return Ok((Protocol::Tcp, buf.freeze())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Largest TLS record: 16 KiB of plaintext plus the 5-byte header and expansion.
const TLS_RECORD_MAX: usize = 5 + 16384 + 256;

/// Completes a TLS record whose first bytes are `prefix` (a classified ClientHello):
/// reads on until the whole first record is in hand, so its server name can be read.
/// Returns what it read, the prefix included; a short read (EOF, timeout) returns what
/// there is, and the caller treats that as not ours.
pub async fn read_tls_record<IO: AsyncRead + Unpin>(
    io: &mut IO,
    prefix: Bytes,
    timeout: Duration,
) -> io::Result<Bytes> {
    let mut buf = BytesMut::from(&prefix[..]);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let want = match buf.get(3..5) {
            Some(len) => (5 + usize::from(u16::from_be_bytes([len[0], len[1]]))).min(TLS_RECORD_MAX),
            None => 5,
        };
        if buf.len() >= want {
            return Ok(buf.freeze());
        }
        let mut chunk = vec![0u8; want - buf.len()];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) | Ok(Ok(0)) => return Ok(buf.freeze()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream that first replays bytes already read from it.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Rewind<IO> {
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Rewind { prefix, inner }
    }

    pub fn inner(&self) -> &IO {
        &self.inner
    }

    /// The bytes still to be replayed before the stream's own.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The bytes not replayed yet, and the stream.
    pub fn into_parts(self) -> (Bytes, IO) {
        (self.prefix, self.inner)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Verdict::Is(Protocol::Http1));
        assert_eq!(classify(b"DELETE /x"), Verdict::Is(Protocol::Http1));
        assert_eq!(classify(b"DEL"), Verdict::NeedMore);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(classify(H2_PREFACE), Verdict::Is(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n\r\n"), Verdict::Is(Protocol::Tcp));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Verdict::Is(Protocol::Tls));
        assert_eq!(classify(&[0x16]), Verdict::NeedMore);
        assert_eq!(classify(b"\x00\x00\x00\x01garbage"), Verdict::Is(Protocol::Tcp));
        assert_eq!(classify(b"get / HTTP/1.1"), Verdict::Is(Protocol::Tcp), "methods are case-sensitive");
        assert_eq!(classify(b"*2\r\n$4\r\nPING"), Verdict::Is(Protocol::Tcp));
    }

    #[tokio::test]
    async fn slow_or_silent_clients_fall_back_to_tcp_and_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GE").await.expect("write");
        let (p, prefix) = detect(&mut server, Duration::from_millis(50)).await.expect("detect");
        assert_eq!((p, &prefix[..]), (Protocol::Tcp, &b"GE"[..]));

        client.write_all(b"T / HTTP/1.1\r\n").await.expect("write");
        let mut rewound = Rewind::new(prefix, server);
        let mut got = vec![0u8; 16];
        rewound.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn detects_across_split_writes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in H2_PREFACE.chunks(5) {
                client.write_all(chunk).await.expect("write");
                tokio::task::yield_now().await;
            }
            client
        });
        let (p, prefix) = detect(&mut server, Duration::from_secs(5)).await.expect("detect");
        assert_eq!(p, Protocol::Http2);
        assert_eq!(&prefix[..], H2_PREFACE);
        drop(writer.await);
    }
}
