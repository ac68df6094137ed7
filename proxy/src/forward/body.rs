//! Response bodies as the data path returns them: an upstream body that holds its
//! request's in-flight cost until it ends, or a small local answer (errors, 503s).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1;
use crate::select::endpoints::InFlight;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body from upstream: read by our HTTP/1 client straight off its connection, or
/// by hyper (HTTP/2, upgrades, passthrough).
#[derive(Debug)]
pub enum UpBody {
    H1(h1::ResponseBody),
    Hyper(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::H1(b) => b.is_end_stream(),
            UpBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::H1(b) => b.size_hint(),
            UpBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// An upstream body; the request's cost stays on its endpoint until this ends or is
/// dropped (client gone), whichever comes first. (An HTTP/1 body gives its connection
/// back to the pool itself, once read to its end.)
#[derive(Debug)]
pub struct Held {
    inner: UpBody,
    hold: Option<InFlight>,
}

impl Held {
    pub fn new(inner: UpBody, hold: Option<InFlight>) -> Self {
        Held { inner, hold }
    }
}

impl Body for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.hold = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub type ProxyBody = Either<Held, Full<Bytes>>;

pub fn local(text: impl Into<Bytes>) -> ProxyBody {
    Either::Right(Full::new(text.into()))
}
