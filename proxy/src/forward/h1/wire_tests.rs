//! The wire format's pure parts: request heads as written, response heads as read
//! (framing and reuse decided per RFC 9112 6.3), bodies decoded whole and byte by byte.

use super::*;
use http::Request;

fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn encoded(p: &Parts, empty: bool, exact: Option<u64>) -> (String, Sending) {
    let mut out = BytesMut::new();
    let s = encode_head(p, None, BodyShape { empty, exact }, &mut out);
    (String::from_utf8(out.to_vec()).expect("ascii"), s)
}

#[test]
fn a_request_head_carries_the_framing_of_the_body_sent() {
    let get = parts("GET", "/a?b=1", &[("host", "svc"), ("x-id", "7")]);
    assert_eq!(
        encoded(&get, true, Some(0)),
        ("GET /a?b=1 HTTP/1.1\r\nhost: svc\r\nx-id: 7\r\n\r\n".into(), Sending::Nothing)
    );
    let post = parts("POST", "/p", &[("host", "svc"), ("content-length", "999")]);
    let (head, s) = encoded(&post, false, Some(12));
    assert_eq!(
        head, "POST /p HTTP/1.1\r\nhost: svc\r\ncontent-length: 12\r\n\r\n",
        "the body's length, not the header's"
    );
    assert_eq!(s, Sending::Length(12));
    let (head, s) = encoded(&post, false, None);
    assert!(head.ends_with("transfer-encoding: chunked\r\n\r\n") && !head.contains("999"), "{head}");
    assert_eq!(s, Sending::Chunked);
    let (head, s) = encoded(&parts("POST", "/p", &[]), true, Some(0));
    assert!(head.ends_with("content-length: 0\r\n\r\n"), "an empty POST says so: {head}");
    assert_eq!(s, Sending::Nothing);
    let (cost, ours) = (HeaderName::from_static("x-cost"), HeaderValue::from_static("1"));
    let mut out = BytesMut::new();
    let spoofed = parts("GET", "/", &[("x-cost", "999"), ("x-a", "b")]);
    encode_head(&spoofed, Some((&cost, &ours)), BodyShape { empty: true, exact: Some(0) }, &mut out);
    assert_eq!(&out[..], b"GET / HTTP/1.1\r\nx-a: b\r\nx-cost: 1\r\n\r\n", "this hop's header, not the client's");
    let smuggled = parts("GET", "/", &[("transfer-encoding", "chunked")]);
    assert_eq!(encoded(&smuggled, true, Some(0)).0, "GET / HTTP/1.1\r\n\r\n", "framing headers are ours alone");
}

fn head_of(raw: &str, head_request: bool) -> Result<Option<Head>, Error> {
    take_head(&mut BytesMut::from(raw), head_request)
}

fn head(raw: &str) -> Head {
    head_of(raw, false).expect("parses").expect("complete")
}

#[test]
fn a_response_head_becomes_http_types_without_its_hop_by_hop_headers() {
    let mut buf = BytesMut::from(
        "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\n\
         Keep-Alive: timeout=5\r\nX-Hop: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nokNEXT",
    );
    let h = take_head(&mut buf, false).expect("parses").expect("complete");
    assert_eq!(h.status, 200);
    assert_eq!(h.version, Version::HTTP_11);
    assert_eq!(h.framing, Framing::Length(2));
    assert!(h.reusable);
    let names: Vec<&str> = h.headers.keys().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        ["server", "content-length", "set-cookie"],
        "connection, keep-alive and what Connection names are gone"
    );
    assert_eq!(h.headers.get_all("set-cookie").iter().count(), 2, "repeated headers are all kept");
    assert_eq!(&buf[..], b"okNEXT", "only the head is taken");
}

#[test]
fn a_partial_head_waits_and_an_interim_response_is_skipped() {
    assert!(head_of("HTTP/1.1 200 OK\r\nContent-Le", false).expect("partial").is_none());
    let h = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(h.status, 201);
    assert!(matches!(head_of("HTTP/1.1 101 Switching Protocols\r\n\r\n", false), Err(Error::UnaskedUpgrade)));
}

#[test]
fn framing_follows_rfc_9112_section_6_3() {
    let cases = [
        // (response, HEAD request?, framing, reusable)
        ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true, Framing::Empty, true),
        ("HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n", false, Framing::Empty, true),
        ("HTTP/1.1 304 Not Modified\r\n\r\n", false, Framing::Empty, true),
        ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", false, Framing::Chunked, true),
        ("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", false, Framing::Chunked, true),
        ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n", false, Framing::UntilClose, false),
        ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n", false, Framing::Chunked, false),
        ("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n", false, Framing::Length(5), true),
        ("HTTP/1.1 200 OK\r\n\r\n", false, Framing::UntilClose, false),
        ("HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n", false, Framing::Length(1), false),
        ("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false, Framing::Length(1), false),
        ("HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n", false, Framing::Length(1), true),
    ];
    for (raw, head_request, framing, reusable) in cases {
        let h = head_of(raw, head_request).expect(raw).expect(raw);
        assert_eq!((h.framing, h.reusable), (framing, reusable), "{raw:?}");
    }
    let both = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
    assert!(both.headers.get("content-length").is_none(), "a length beside chunked is not passed on");
    let head_resp = head_of("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true).expect("ok").expect("complete");
    assert_eq!(head_resp.headers["content-length"], "5", "a HEAD response keeps the length it describes");
}

#[test]
fn a_reason_phrase_is_kept_only_when_it_is_not_the_standard_one() {
    assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").reason, None);
    let custom = head("HTTP/1.1 499 Client Closed Request\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(custom.reason.as_deref(), Some(&b"Client Closed Request"[..]));
    assert_eq!(head("HTTP/1.1 200 Fine\r\ncontent-length: 0\r\n\r\n").reason.as_deref(), Some(&b"Fine"[..]));
}

#[test]
fn request_trailers_that_frame_route_or_authorize_stay_behind() {
    for name in ["content-length", "Host", "transfer-encoding", "connection", "authorization", "te"] {
        assert!(!may_trail(name.as_bytes()), "{name}");
    }
    assert!(may_trail(b"grpc-status") && may_trail(b"x-checksum"));
}

#[test]
fn bad_response_heads_are_errors_that_say_what_is_wrong() {
    for raw in [
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
    ] {
        assert!(matches!(head_of(raw, false), Err(Error::Framing(_))), "{raw:?}");
    }
    assert!(matches!(head_of("HTTP/1.1 2x0 OK\r\n\r\n", false), Err(Error::MalformedHead(_))));
    let old_chunked = "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n";
    assert!(matches!(head_of(old_chunked, false), Err(Error::Framing(_))), "HTTP/1.0 has no transfer codings");
    assert!(matches!(head_of("HTTP/1.1 200 OK\r\nbad header\r\n\r\n", false), Err(Error::MalformedHead(_))));
    let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
    assert!(matches!(head_of(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false), Err(Error::TooManyHeaders)));
    let huge = format!("HTTP/1.1 200 OK\r\nx-big: {}", "a".repeat(MAX_HEAD + 1));
    assert!(matches!(head_of(&huge, false), Err(Error::HeadTooLarge)));
    let e = head_of("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n", false).expect_err("bad");
    assert!(e.to_string().contains("Content-Length"), "{e}");
}

/// Decodes `raw` fed in pieces of `step` bytes: the data, the trailers, and whether
/// the body ended.
fn decode(framing: Framing, raw: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>, bool), Error> {
    let mut d = Decoder::new(framing);
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), None);
    for piece in raw.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => data.extend_from_slice(&b),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::NeedMore => break,
                Decoded::End => return Ok((data, trailers, true)),
            }
        }
    }
    Ok((data, trailers, d.is_done()))
}

#[test]
fn chunked_bodies_decode_whole_and_byte_by_byte() {
    let raw = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n";
    for step in [1, 2, 3, 7, raw.len()] {
        let (data, trailers, ended) = decode(Framing::Chunked, raw, step).expect("decodes");
        assert_eq!(data, b"Wikipedia in\r\n\r\nchunks.", "step {step}");
        assert!(trailers.is_none() && ended, "step {step}");
    }
    let with_trailers = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nConnection: x\r\n\r\n";
    for step in [1, with_trailers.len()] {
        let (data, trailers, ended) = decode(Framing::Chunked, with_trailers, step).expect("decodes");
        let t = trailers.expect("trailers");
        assert_eq!((data.as_slice(), ended), (&b"abc"[..], true));
        assert_eq!(t["grpc-status"], "0");
        assert!(t.get("connection").is_none(), "hop-by-hop names are not trailers to pass on");
    }
}

#[test]
fn bad_chunks_are_errors() {
    for raw in [
        &b"zz\r\nab\r\n0\r\n\r\n"[..],
        b"2\r\nabc\r\n0\r\n\r\n",
        b"2\nab\r\n0\r\n\r\n",
        // No digit: httparse alone would read these as the last chunk.
        b"5\r\nhello\r\n\r\n\r\nGET / HTTP/1.1\r\n",
        b"5\r\nhello\r\n;x\r\n\r\n",
        // A bare LF hidden in an extension.
        b"1;a\nb\r\nx\r\n0\r\n\r\n",
    ] {
        assert!(matches!(decode(Framing::Chunked, raw, raw.len()), Err(Error::Framing(_))), "{raw:?}");
    }
    let endless = format!("1;{}", "e".repeat(MAX_CHUNK_LINE + 1));
    assert!(decode(Framing::Chunked, endless.as_bytes(), 1024).is_err(), "a size line that never ends");
}

#[test]
fn lengths_end_where_they_say_and_leave_what_follows() {
    let mut d = Decoder::new(Framing::Length(5));
    let mut buf = BytesMut::from(&b"hel"[..]);
    assert!(matches!(d.decode(&mut buf), Ok(Decoded::Data(b)) if b == "hel"));
    assert_eq!(d.remaining(), Some(2));
    assert!(matches!(d.decode(&mut buf), Ok(Decoded::NeedMore)));
    buf.extend_from_slice(b"loEXTRA");
    assert!(matches!(d.decode(&mut buf), Ok(Decoded::Data(b)) if b == "lo"));
    assert!(d.is_done() && matches!(d.decode(&mut buf), Ok(Decoded::End)));
    assert_eq!(&buf[..], b"EXTRA", "bytes past the body are left for the connection to judge");
    assert!(matches!(Decoder::new(Framing::Length(3)).eof(), Err(Error::ClosedMidBody)));
    let mut until_close = Decoder::new(Framing::UntilClose);
    assert!(until_close.eof().is_ok() && until_close.is_done(), "the close is the end");
    assert!(Decoder::new(Framing::Empty).is_done() && Decoder::new(Framing::Length(0)).is_done());
}
