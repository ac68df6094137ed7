//! Conn: one HTTP/1.1 connection to an upstream, and the exchange of one request on
//! it, run by the task of that request: the head and body written (the body streamed
//! as the client sends it), the response head read by a deadline, then the response
//! body read by whoever reads `ResponseBody`, which hands the connection back to its
//! pool once the response has ended cleanly. It must not retry, choose, or pool
//! connections itself (the pool does, through `GiveBack`).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{Method, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::Error;
use super::wire::{self, BodyShape, Decoded, Decoder, Sending};
use crate::forward::connect::UpstreamIo;
use crate::forward::upstream::UpstreamBody;

/// The first read's size; doubled while reads fill it, up to `HTTP1_MAX_BUF`.
const FIRST_READ: usize = 8 * 1024;
/// A request body frame up to this size is copied next to the head (one write); a
/// larger one is written from its own buffer.
const COPY_UP_TO: usize = 8 * 1024;

/// One upstream HTTP/1.1 connection.
pub struct Conn {
    io: UpstreamIo,
    rbuf: BytesMut,
    /// Bytes to write after those in `out` (small ones are gathered here).
    wbuf: BytesMut,
    /// Large buffers to write before `wbuf`, in order.
    out: VecDeque<Bytes>,
    next_read: usize,
    /// The deadline of the request it carries: one timer kept per connection and
    /// pushed later per request, which takes no timer-wheel lock; a new one would.
    timer: Pin<Box<Sleep>>,
    /// Which of its pool's sides it belongs to, and that side's cap.
    pub mtls: bool,
    pub max_idle: usize,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("buffered", &self.rbuf.len()).finish_non_exhaustive()
    }
}

/// Where a connection goes once its response has ended cleanly.
pub trait GiveBack: Send + Sync + std::fmt::Debug {
    fn give_back(&self, conn: Box<Conn>);
}

impl Conn {
    pub fn new(io: UpstreamIo, deadline: tokio::time::Instant, mtls: bool, max_idle: usize) -> Box<Self> {
        Box::new(Conn {
            io,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            out: VecDeque::new(),
            next_read: FIRST_READ,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            mtls,
            max_idle,
        })
    }

    /// Ready to be pooled: a read buffer grown by a large body is let go (an endpoint
    /// may keep hundreds of idle connections), the usual one kept.
    fn idle(mut self: Box<Self>) -> Box<Self> {
        if self.rbuf.capacity() > 2 * FIRST_READ {
            self.rbuf = BytesMut::new();
            self.next_read = FIRST_READ;
        }
        self
    }

    /// For a connection taken from the pool: the next request's deadline.
    pub fn set_deadline(&mut self, deadline: tokio::time::Instant) {
        self.timer.as_mut().reset(deadline);
    }

    /// True when an idle connection can no longer carry a request: the server closed
    /// it, or sent bytes nobody asked for. Costs no system call unless the socket
    /// became readable.
    pub fn poll_closed(&mut self, cx: &mut Context<'_>) -> bool {
        self.poll_fill(cx).is_ready()
    }

    /// Reads what is there into `rbuf`: `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < self.next_read / 2 {
            self.rbuf.reserve(self.next_read);
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf))?;
        if n == room && self.next_read < crate::forward::HTTP1_MAX_BUF {
            self.next_read *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes what is queued; `Ready` once all of it is written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while !self.out.is_empty() || !self.wbuf.is_empty() {
            let mut slices = [IoSlice::new(&[]); 8];
            let mut count = 0;
            for b in self.out.iter().take(slices.len() - 1) {
                slices[count] = IoSlice::new(b);
                count += 1;
            }
            // `wbuf` goes after all of `out`, so only when all of `out` fits.
            if self.out.len() < slices.len() && !self.wbuf.is_empty() {
                slices[count] = IoSlice::new(&self.wbuf);
                count += 1;
            }
            let mut n =
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count])).map_err(Error::Write)?;
            if n == 0 {
                return Poll::Ready(Err(Error::Write(std::io::ErrorKind::WriteZero.into())));
            }
            while n > 0 {
                match self.out.front_mut() {
                    Some(b) if b.len() <= n => {
                        n -= b.len();
                        self.out.pop_front();
                    }
                    Some(b) => {
                        b.advance(n);
                        n = 0;
                    }
                    None => {
                        self.wbuf.advance(n);
                        n = 0;
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn queue(&mut self, data: Bytes) {
        if data.len() <= COPY_UP_TO {
            self.wbuf.extend_from_slice(&data);
        } else {
            if !self.wbuf.is_empty() {
                let small = self.wbuf.split().freeze();
                self.out.push_back(small);
            }
            self.out.push_back(data);
        }
    }

    fn queued(&self) -> usize {
        self.wbuf.len() + self.out.iter().map(Bytes::len).sum::<usize>()
    }

    /// Starts an exchange: encodes the head of `parts` (its target in origin form,
    /// hop-by-hop headers off) and `extra`, and returns what will send the body.
    pub fn start(&mut self, parts: &Parts, extra: wire::Extra<'_>, body: UpstreamBody) -> Writer {
        let shape = BodyShape { empty: body.is_end_stream(), exact: body.size_hint().exact() };
        let sending = wire::encode_head(parts, extra, shape, &mut self.wbuf);
        let body = (sending != Sending::Nothing).then_some(body);
        Writer { body, sending, head_request: parts.method == Method::HEAD, flushed: false, broken: false }
    }
}

/// The request body's way out: the client's body, re-framed as it is read.
#[derive(Debug)]
pub struct Writer {
    body: Option<UpstreamBody>,
    sending: Sending,
    head_request: bool,
    flushed: bool,
    /// Writing failed: what was sent is not the whole request.
    broken: bool,
}

/// How much request body is gathered before it is written.
const GATHER: usize = 64 * 1024;

impl Writer {
    fn done(&self) -> bool {
        self.flushed || self.broken
    }

    /// Sends what it can of the request; `Ready(Ok)` once all of it is out.
    fn poll_send(&mut self, conn: &mut Conn, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if self.flushed {
                return Poll::Ready(Ok(()));
            }
            let mut waiting = false;
            while let Some(body) = self.body.as_mut().filter(|_| conn.queued() < GATHER) {
                let polled = Pin::new(body).poll_frame(cx);
                match polled {
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                    Poll::Ready(Some(Ok(frame))) => self.frame(conn, frame)?,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e))),
                    Poll::Ready(None) => {
                        self.body = None;
                        match self.sending {
                            Sending::Length(left) if left > 0 => {
                                return Poll::Ready(Err(Error::body("the body ended short of its Content-Length")));
                            }
                            Sending::Chunked => conn.wbuf.extend_from_slice(b"0\r\n\r\n"),
                            _ => {}
                        }
                    }
                }
            }
            ready!(conn.poll_write_out(cx))?;
            if self.body.is_none() {
                ready!(Pin::new(&mut conn.io).poll_flush(cx)).map_err(Error::Write)?;
                self.flushed = true;
            } else if waiting {
                // What was written must reach the upstream while the client pauses: TLS
                // may hold it until flushed (a no-op for plain TCP).
                ready!(Pin::new(&mut conn.io).poll_flush(cx)).map_err(Error::Write)?;
                return Poll::Pending;
            }
        }
    }

    fn frame(&mut self, conn: &mut Conn, frame: Frame<Bytes>) -> Result<(), Error> {
        let frame = match frame.into_data() {
            Ok(data) if data.is_empty() => return Ok(()),
            Ok(data) => {
                match &mut self.sending {
                    Sending::Length(left) => {
                        *left = left
                            .checked_sub(data.len() as u64)
                            .ok_or(Error::body("the body is longer than its Content-Length"))?;
                        conn.queue(data);
                        if *left == 0 {
                            // All of it: done, without waiting for the client's body to
                            // say so (a response may come first, and then the
                            // connection could not be pooled).
                            self.body = None;
                        }
                    }
                    Sending::Chunked => {
                        wire::chunk_size_line(data.len(), &mut conn.wbuf);
                        conn.queue(data);
                        conn.wbuf.extend_from_slice(b"\r\n");
                    }
                    Sending::Nothing => return Err(Error::body("a body where none was announced")),
                }
                return Ok(());
            }
            Err(f) => f,
        };
        // Trailers end a chunked body; a body with a length has no room for them.
        if let (Ok(trailers), Sending::Chunked) = (frame.into_trailers(), self.sending) {
            conn.wbuf.extend_from_slice(b"0\r\n");
            for (n, v) in trailers.iter().filter(|(n, _)| wire::may_trail(n.as_str().as_bytes())) {
                conn.wbuf.extend_from_slice(n.as_str().as_bytes());
                conn.wbuf.extend_from_slice(b": ");
                conn.wbuf.extend_from_slice(v.as_bytes());
                conn.wbuf.extend_from_slice(b"\r\n");
            }
            conn.wbuf.extend_from_slice(b"\r\n");
            self.sending = Sending::Nothing;
            self.body = None;
        }
        Ok(())
    }
}

/// Runs an exchange started on `conn` up to the response head: the request goes out
/// (its body as far as the upstream takes it before answering) while the answer is
/// read. `Error::Timeout` when the connection's deadline passes first.
pub async fn response_head(conn: &mut Conn, writer: &mut Writer) -> Result<wire::Head, Error> {
    // A server may answer and close before taking the whole request (a 413, say): its
    // answer, when there is one to read, says more than the failed write.
    let mut write_failed = None;
    poll_fn(|cx| {
        if !writer.done() {
            match writer.poll_send(conn, cx) {
                Poll::Ready(Err(Error::Write(e))) => {
                    writer.broken = true;
                    write_failed = Some(e);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                _ => {}
            }
        }
        loop {
            if let Some(head) = wire::take_head(&mut conn.rbuf, writer.head_request)? {
                return Poll::Ready(Ok(head));
            }
            let ended = match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) if conn.rbuf.is_empty() => Error::ClosedBeforeResponse,
                Poll::Ready(Ok(0)) => Error::Read(std::io::ErrorKind::UnexpectedEof.into()),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => Error::Read(e),
                Poll::Pending => break,
            };
            return Poll::Ready(Err(write_failed.take().map_or(ended, Error::Write)));
        }
        // Polled each time, not once: a poll refused for the task's exhausted budget
        // (tokio's coop) registers nothing.
        match conn.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Error::Timeout)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A response body read straight from its connection. Whatever of the request body
/// the upstream had not taken when it answered is sent on while this is read.
#[derive(Debug)]
pub struct ResponseBody {
    conn: Option<Box<Conn>>,
    writer: Option<Writer>,
    decoder: Decoder,
    reusable: bool,
    home: Option<std::sync::Arc<dyn GiveBack>>,
}

impl ResponseBody {
    pub fn new(conn: Box<Conn>, writer: Writer, head: &wire::Head, home: Option<std::sync::Arc<dyn GiveBack>>) -> Self {
        let mut body = ResponseBody {
            conn: Some(conn),
            reusable: head.reusable && !writer.broken,
            writer: Some(writer).filter(|w| !w.done()),
            decoder: Decoder::new(head.framing),
            home,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// The response has ended: its connection goes back to the pool if it is clean (the
    /// whole request sent, nothing unasked for read), else it is closed.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let clean = self.reusable && self.writer.is_none() && conn.rbuf.is_empty() && conn.queued() == 0;
        if let (true, Some(home)) = (clean, self.home.take()) {
            home.give_back(conn.idle());
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        self.writer = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
        if let Some(w) = this.writer.as_mut() {
            match w.poll_send(conn, cx) {
                Poll::Ready(Ok(())) => this.writer = None,
                // The answer is in: the rest of the request is not wanted any more.
                Poll::Ready(Err(_)) => {
                    this.writer = None;
                    this.reusable = false;
                }
                Poll::Pending => {}
            }
        }
        loop {
            let conn = this.conn.as_mut().expect("checked above");
            let frame = match this.decoder.decode(&mut conn.rbuf) {
                Ok(Decoded::Data(d)) => Frame::data(d),
                Ok(Decoded::Trailers(t)) => Frame::trailers(t),
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => match ready!(conn.poll_fill(cx)) {
                    Ok(0) => match this.decoder.eof() {
                        Ok(()) => {
                            this.reusable = false;
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Err(e) => return this.fail(e),
                    },
                    Ok(_) => continue,
                    Err(e) => return this.fail(Error::Read(e)),
                },
                Err(e) => return this.fail(e),
            };
            if this.decoder.is_done() {
                this.finish();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The response to an exchange, its body read from `conn`.
pub fn response(
    conn: Box<Conn>,
    writer: Writer,
    head: wire::Head,
    home: Option<std::sync::Arc<dyn GiveBack>>,
) -> Response<ResponseBody> {
    let body = ResponseBody::new(conn, writer, &head, home);
    let mut r = Response::new(body);
    *r.status_mut() = head.status;
    *r.version_mut() = head.version;
    *r.headers_mut() = head.headers;
    if let Some(reason) = head.reason.and_then(|b| hyper::ext::ReasonPhrase::try_from(b).ok()) {
        r.extensions_mut().insert(reason);
    }
    r
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s.inner_mut()).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.inner_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s.inner_mut()).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.inner_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s.inner_mut()).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.inner_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s.inner_mut()).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.inner_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s.inner_mut()).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.inner_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
