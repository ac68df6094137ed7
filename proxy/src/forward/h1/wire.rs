//! Wire: HTTP/1.1 bytes of an upstream exchange, as pure functions over buffers. The
//! request head is encoded from the prepared `Parts` with the framing its body needs;
//! a response head is parsed (httparse) into `http` types, hop-by-hop headers left
//! out, and its body's framing decided as RFC 9112 section 6.3 says; the body is then
//! decoded from the read buffer (lengths, chunks, trailers). No IO here.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Version};

use super::Error;

/// Headers a response head may carry (hyper's limit too).
pub const MAX_HEADERS: usize = 100;
/// The largest response head (or trailer section) read before giving up.
pub const MAX_HEAD: usize = 64 * 1024;
/// A chunk-size line longer than this is not one (extensions included).
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// How a request body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// No body (none, or an empty one).
    Nothing,
    /// `Content-Length` bytes still to send.
    Length(u64),
    Chunked,
}

/// What is known of the request body before it is read.
#[derive(Debug, Clone, Copy)]
pub struct BodyShape {
    pub empty: bool,
    /// Its exact length, when known (a client's Content-Length).
    pub exact: Option<u64>,
}

/// A header this hop adds, over any of that name the client sent.
pub type Extra<'a> = Option<(&'a HeaderName, &'a HeaderValue)>;

/// Writes the request head for `parts` (origin-form target, hop-by-hop headers already
/// off) and `extra` into `out`, with the framing the body needs; any Content-Length of
/// the client's is replaced by ours, so the head cannot disagree with the body sent.
pub fn encode_head(parts: &Parts, extra: Extra<'_>, body: BodyShape, out: &mut BytesMut) -> Sending {
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    out.reserve(64 + target.len() + parts.headers.len() * 32);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || extra.is_some_and(|(n, _)| n == name)
        {
            continue;
        }
        line(name, value);
    }
    if let Some((name, value)) = extra {
        line(name, value);
    }
    let sending = match (body.empty, body.exact) {
        (true, _) | (false, Some(0)) => {
            // A body-carrying method says "none" explicitly, as a client would.
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
                || parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            Sending::Nothing
        }
        (false, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
            Sending::Length(n)
        }
        (false, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Sending::Chunked
        }
    };
    out.extend_from_slice(b"\r\n");
    sending
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The line that opens a chunk of `len` bytes.
pub fn chunk_size_line(len: usize, out: &mut BytesMut) {
    out.extend_from_slice(format!("{len:x}\r\n").as_bytes());
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD request's, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the connection closes: no length given, or a transfer coding other than
    /// chunked last.
    UntilClose,
}

/// A response head, parsed.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// Without hop-by-hop headers (nor those `Connection` names): they described the
    /// upstream connection only.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this response is read whole.
    pub reusable: bool,
    /// The reason phrase, when not the standard one for the status.
    pub reason: Option<Bytes>,
}

/// A trailer the client sent that may go upstream: not one describing the connection,
/// nor one that frames, routes or authorizes the message (RFC 9110 section 6.5.1).
pub fn may_trail(name: &[u8]) -> bool {
    const NOT: [&[u8]; 4] = [b"content-length", b"host", b"authorization", b"content-type"];
    !hop_by_hop(name) && !NOT.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Names that describe a connection, not a message (RFC 9110 section 7.6.1), and
/// `upgrade` (no upgrade is asked on this path).
fn hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    // Lengths first: most names match none of them, and a length is cheaper to test.
    matches!(name.len(), 2 | 7 | 10 | 16 | 17 | 19) && NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(|t| t.trim_ascii()).filter(|t| !t.is_empty())
}

/// A Content-Length value: digits, or a list of one repeated value (RFC 9110 8.6).
fn content_length(value: &[u8]) -> Option<u64> {
    let mut found = None;
    for t in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
        if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = t.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        match found {
            Some(m) if m != n => return None,
            _ => found = Some(n),
        }
    }
    found
}

/// Takes a complete response head off the front of `buf`, skipping interim (1xx)
/// responses; `Ok(None)` while more bytes are needed. `head_request`: the request was
/// HEAD, so the response has no body whatever it says.
pub fn take_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Error> {
    loop {
        // Where each header sits in the head, kept past the parser's borrow of `buf`.
        let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let (len, code, minor, count, reason) = {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut r = httparse::Response::new(&mut headers);
            let len = match r.parse(buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(Error::HeadTooLarge),
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
                Err(e) => return Err(Error::MalformedHead(e)),
            };
            let base = buf.as_ptr() as usize;
            let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
            for (i, h) in r.headers.iter().enumerate() {
                at[i] = (offset(h.name.as_bytes()), h.name.len() as u32, offset(h.value), h.value.len() as u32);
            }
            let reason = r.reason.map_or((0, 0), |s| (offset(s.as_bytes()), s.len() as u32));
            (len, r.code.unwrap_or(0), r.version.unwrap_or(1), r.headers.len(), reason)
        };
        if len > MAX_HEAD {
            return Err(Error::HeadTooLarge);
        }
        let status = StatusCode::from_u16(code).map_err(|_| Error::Framing("status code out of range"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::UnaskedUpgrade);
            }
            // 100 Continue and the like: the final response follows.
            buf.advance(len);
            continue;
        }
        let head = buf.split_to(len).freeze();
        let mut parsed = build(&head, &at[..count], status, minor, head_request)?;
        // A reason other than the standard one is passed on, as hyper's client did.
        let reason = &head[reason.0 as usize..(reason.0 + reason.1) as usize];
        if !reason.is_empty() && status.canonical_reason().is_none_or(|c| c.as_bytes() != reason) {
            parsed.reason = Some(head.slice_ref(reason));
        }
        return Ok(Some(parsed));
    }
}

fn build(
    head: &Bytes,
    at: &[(u32, u32, u32, u32)],
    status: StatusCode,
    minor: u8,
    head_request: bool,
) -> Result<Head, Error> {
    let name = |i: usize| &head[at[i].0 as usize..(at[i].0 + at[i].1) as usize];
    let value = |i: usize| &head[at[i].2 as usize..(at[i].2 + at[i].3) as usize];
    // Framing and connection first: they decide which headers are kept.
    let (mut length, mut chunked, mut coded, mut close, mut keep_alive, mut names_others) =
        (None, false, false, false, false, false);
    for i in 0..at.len() {
        let n = name(i);
        if n.eq_ignore_ascii_case(b"content-length") {
            match (content_length(value(i)), length) {
                (Some(v), None) => length = Some(v),
                (Some(v), Some(l)) if v == l => {}
                _ => return Err(Error::Framing("invalid or conflicting Content-Length")),
            }
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
            // The last coding of the last header is what delimits the body.
            if let Some(last) = tokens(value(i)).last() {
                chunked = last.eq_ignore_ascii_case(b"chunked");
            }
        } else if n.eq_ignore_ascii_case(b"connection") {
            for t in tokens(value(i)) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !t.eq_ignore_ascii_case(b"upgrade") {
                    names_others = true;
                }
            }
        }
    }
    if coded && minor == 0 {
        // HTTP/1.0 has no transfer codings: RFC 9112 6.1 says to treat the framing as
        // faulty.
        return Err(Error::Framing("Transfer-Encoding in an HTTP/1.0 response"));
    }
    let framing = if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Empty
    } else if coded {
        if chunked { Framing::Chunked } else { Framing::UntilClose }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    // Both framings at once is how responses get smuggled: believe Transfer-Encoding
    // (RFC 9112 6.3), drop the length, and never reuse the connection.
    let both = coded && length.is_some();
    let reusable = framing != Framing::UntilClose && !both && !close && (minor == 1 || keep_alive);
    let connection_names = |n: &[u8]| {
        (0..at.len())
            .filter(|&i| name(i).eq_ignore_ascii_case(b"connection"))
            .any(|i| tokens(value(i)).any(|t| t.eq_ignore_ascii_case(n)))
    };
    let mut headers = HeaderMap::with_capacity(at.len());
    for (i, &(_, _, start, len)) in at.iter().enumerate() {
        let n = name(i);
        if hop_by_hop(n) || (both && n.eq_ignore_ascii_case(b"content-length")) || (names_others && connection_names(n))
        {
            continue;
        }
        let (start, len) = (start as usize, len as usize);
        let name = HeaderName::from_bytes(n).map_err(|_| Error::Framing("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(start..start + len))
            .map_err(|_| Error::Framing("invalid header value"))?;
        headers.append(name, value);
    }
    let version = if minor == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
    Ok(Head { status, version, headers, framing, reusable, reason: None })
}

/// One step of decoding a response body from the read buffer.
#[derive(Debug)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// More bytes are needed.
    NeedMore,
    /// The body has ended.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    /// At a chunk-size line.
    Size,
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    Trailers,
    Done,
}

/// Decodes one response body from the connection's read buffer.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size,
            Framing::UntilClose => State::UntilClose,
        };
        Decoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// What is left, when it is known exactly.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next frame from `buf`, taking the bytes it used.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) | State::Data(left) if buf.is_empty() => {
                    let _ = left;
                    return Ok(Decoded::NeedMore);
                }
                State::Length(left) => {
                    let n = left.min(buf.len() as u64);
                    self.state = if n == left { State::Done } else { State::Length(left - n) };
                    return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
                }
                State::Data(left) => {
                    let n = left.min(buf.len() as u64);
                    self.state = if n == left { State::DataEnd } else { State::Data(left - n) };
                    return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
                }
                State::UntilClose if buf.is_empty() => return Ok(Decoded::NeedMore),
                State::UntilClose => return Ok(Decoded::Data(buf.split().freeze())),
                // httparse takes a line with no digit as size 0, the last chunk, and a
                // bare LF in an extension: both are how a desync starts.
                State::Size if buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) => {
                    return Err(Error::Framing("chunk-size line without a size"));
                }
                State::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, _))) if buf[..used - 2].contains(&b'\n') => {
                        return Err(Error::Framing("bare LF in a chunk-size line"));
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 { State::Trailers } else { State::Data(size) };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(Error::Framing("chunk-size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(_) => return Err(Error::Framing("invalid chunk-size line")),
                },
                State::DataEnd if buf.len() < 2 => return Ok(Decoded::NeedMore),
                State::DataEnd if &buf[..2] == b"\r\n" => {
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::DataEnd => return Err(Error::Framing("chunk data longer than its size")),
                State::Trailers => return self.trailers(buf),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((used, fields))) => {
                let mut map = HeaderMap::new();
                for f in fields.iter().filter(|f| !hop_by_hop(f.name.as_bytes())) {
                    let name = HeaderName::from_bytes(f.name.as_bytes());
                    let value = HeaderValue::from_bytes(f.value);
                    if let (Ok(n), Ok(v)) = (name, value) {
                        map.append(n, v);
                    }
                }
                buf.advance(used);
                self.state = State::Done;
                Ok(if map.is_empty() { Decoded::End } else { Decoded::Trailers(map) })
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err(Error::HeadTooLarge),
            Ok(httparse::Status::Partial) => Ok(Decoded::NeedMore),
            Err(_) => Err(Error::Framing("malformed trailer section")),
        }
    }

    /// The connection reached its end: the body's end for `UntilClose`, an error for
    /// every framing still expecting bytes.
    pub fn eof(&mut self) -> Result<(), Error> {
        match self.state {
            State::UntilClose | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(Error::ClosedMidBody),
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
