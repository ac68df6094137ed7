//! Accept, idle HTTP/1 connections: a keep-alive client connection that has been quiet
//! for a while is taken out of hyper and parked as a bare socket, then handed to a new
//! hyper connection when the client sends again.
//!
//! Why: hyper keeps a read buffer (8-16 KiB) and a write buffer (8 KiB) per connection
//! for as long as it lives, plus the boxed service future; with 10,000 idle keep-alive
//! connections that was about 230 MiB. A parked connection keeps its socket and an entry
//! in its listener's parking lot (`park.rs`), no task.
//!
//! When it is safe: hyper may only be taken apart (`into_parts`) while it holds nothing
//! but the socket and unread request bytes: no request in flight (from the service call
//! until the response body is dropped), no write that the socket refused, and no byte
//! read or written for a whole idle period. Unread bytes (a request head that was still
//! arriving) are handed to the next connection in front of the socket, so nothing is lost.
//! This module only decides and counts; it must not read or write the socket itself.
//!
//! Freed is not returned: glibc keeps freed chunks that sit between live ones, so the
//! process's RSS would not come down. [`give_back_memory`] asks it to (`malloc_trim`)
//! after connections were parked, off the request path.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the serving task reads to decide whether its connection is idle. The socket
/// side is written by [`Watched`], the request side by [`Busy`]; all on the connection's
/// own task, so the atomics are never contended (they are atomics only because the
/// response body may be dropped elsewhere).
#[derive(Debug, Default)]
pub struct Activity {
    /// Reads and writes that moved bytes.
    io: AtomicU64,
    /// A write or flush the socket could not take yet (hyper holds unsent bytes).
    write_blocked: AtomicBool,
    /// Requests from the service call until their response body is dropped.
    in_flight: AtomicU32,
}

impl Activity {
    /// A mark to compare with later: [`Activity::quiet_since`].
    pub fn mark(&self) -> u64 {
        self.io.load(Ordering::Relaxed)
    }

    /// True when nothing moved since `mark` and nothing is pending: hyper then holds no
    /// request, no response and no unsent bytes.
    pub fn quiet_since(&self, mark: u64) -> bool {
        self.io.load(Ordering::Relaxed) == mark
            && !self.write_blocked.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
    }
}

/// The socket as hyper sees it, counting what moves through it.
#[derive(Debug)]
pub struct Watched<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO> Watched<IO> {
    pub fn new(inner: IO, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }

    pub fn into_inner(self) -> IO {
        self.inner
    }

    fn moved(&self) {
        self.activity.io.fetch_add(1, Ordering::Relaxed);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        // EOF (Ready with nothing read) counts too: hyper then moves to closing.
        if let Poll::Ready(read) = &r
            && (read.is_err() || buf.filled().len() > before || buf.remaining() > 0)
        {
            self.moved();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.track(&r);
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.track(&r);
        r
    }
}

impl<IO> Watched<IO> {
    /// A write: activity when it moved bytes; blocked when the socket refused it.
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) || matches!(r, Poll::Ready(Err(_))) {
            self.moved();
        }
        self.track(r);
    }

    /// A flush or shutdown is not activity (hyper flushes on every poll), but a socket
    /// that refused one leaves bytes in hyper's buffer.
    fn track<T>(&self, r: &Poll<T>) {
        self.activity.write_blocked.store(r.is_pending(), Ordering::Relaxed);
    }
}

/// Held from the service call until the response body is dropped.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Busy {
    pub fn new(activity: &Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
#[derive(Debug)]
pub struct Counted<B> {
    body: B,
    _busy: Busy,
}

impl<B> Counted<B> {
    pub fn new(body: B, busy: Busy) -> Self {
        Counted { body, _busy: busy }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How often [`give_back_memory`] looks whether connections were parked.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Every [`TRIM_EVERY`], if any connection was parked since the last look, returns the
/// allocator's free pages to the OS. A trim walks the heap (milliseconds for hundreds of
/// MiB) on a blocking thread, so it runs only after parking freed something.
pub async fn give_back_memory(parks: prometheus_client::metrics::counter::Counter) {
    let mut seen = parks.get();
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let now = parks.get();
        if now == seen {
            continue;
        }
        seen = now;
        let started = std::time::Instant::now();
        let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
        tracing::debug!("gave freed memory back to the OS ({released}) in {:?}", started.elapsed());
    }
}

/// glibc's `malloc_trim(0)`: free pages inside the heap back to the OS. True if any was.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() -> bool {
    // SAFETY: malloc_trim takes a padding size, touches only the allocator's own free
    // lists under its locks, and is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other C libraries (musl) keep no such cache worth trimming.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn quiet_only_without_io_requests_or_unsent_bytes() {
        let activity = Arc::new(Activity::default());
        let (a, mut b) = tokio::io::duplex(8);
        let mut w = Watched::new(a, Arc::clone(&activity));
        let mark = activity.mark();
        assert!(activity.quiet_since(mark));
        b.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 3];
        w.read_exact(&mut buf).await.unwrap();
        assert!(!activity.quiet_since(mark), "a read is activity");
        let mark = activity.mark();
        let busy = Busy::new(&activity);
        assert!(!activity.quiet_since(mark), "a request in flight");
        let body = Counted::new(http_body_util::Empty::<bytes::Bytes>::new(), busy);
        assert!(!activity.quiet_since(mark), "until its response body is dropped");
        drop(body);
        assert!(activity.quiet_since(mark));
        // The duplex holds 8 bytes: the rest of a 64-byte write is refused (pending).
        let n = futures_poll_write(&mut w, &[0u8; 64]).await;
        assert_eq!(n, Some(8));
        assert_eq!(futures_poll_write(&mut w, &[0u8; 64]).await, None);
        let mark = activity.mark();
        assert!(!activity.quiet_since(mark), "hyper holds unsent bytes");
    }

    /// One poll of `poll_write`: Some(n) when it wrote, None when the socket refused.
    async fn futures_poll_write<IO: AsyncWrite + Unpin>(w: &mut IO, buf: &[u8]) -> Option<usize> {
        std::future::poll_fn(|cx| match Pin::new(&mut *w).poll_write(cx, buf) {
            Poll::Ready(r) => Poll::Ready(Some(r.unwrap())),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}
