//! Response bodies as the data path returns them: an upstream body that holds its
//! request's in-flight cost until it ends, or a small local answer (errors, 503s).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::pool::Reuse;
use crate::select::endpoints::InFlight;

/// An upstream body; the request's cost stays on its endpoint until this ends or is
/// dropped (client gone), whichever comes first. Its HTTP/1 connection is driven
/// from here while the body is read, and goes back to the endpoint's pool only once
/// the body has been read to its end: a connection with part of a response unread
/// cannot carry another.
#[derive(Debug)]
pub struct Held {
    inner: Incoming,
    hold: Option<InFlight>,
    reuse: Option<Reuse>,
}

impl Held {
    pub fn new(inner: Incoming, hold: Option<InFlight>, reuse: Option<Reuse>) -> Self {
        Held { inner, hold, reuse }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // A body with nothing to read (204, HEAD, Content-Length: 0) is never polled.
        if let Some(r) = self.reuse.take().filter(|_| self.inner.is_end_stream()) {
            r.give_back();
        }
    }
}

impl Body for Held {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The connection runs in this task: what it has not read yet, it reads now.
        // (Polled only when the body waits: a small body comes in with the head.)
        if polled.is_pending()
            && let Some(r) = self.reuse.as_mut()
        {
            r.poll_conn(cx);
            polled = Pin::new(&mut self.inner).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => {
                self.hold = None;
                if let Some(r) = self.reuse.take() {
                    r.give_back();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.hold = None;
                self.reuse = None;
            }
            _ => {}
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
