//! H1: the HTTP/1.1 client side of an upstream exchange, on the pool's own connections
//! (to mesh endpoints and to the local app). `wire` turns the prepared request into
//! bytes and the response's bytes into `http` types and body frames, as pure functions;
//! `conn` moves those bytes over one connection, in the task of the request it carries.
//!
//! Why not hyper's client here: a proxy's upstream exchange needs a fraction of it
//! (no upgrades: those keep hyper; no pipelining; the head already validated by
//! hyper's server), and under callgrind hyper's client was 18,000 of the 38,600
//! instructions a proxied request cost (`benches/README.md`). Parsing stays with
//! httparse, hyper's own parser. It must not choose endpoints or change a message
//! beyond its framing and hop-by-hop headers.

pub mod conn;
pub mod wire;

pub use conn::{Conn, ResponseBody};

/// Why an HTTP/1 exchange with an upstream failed. Each says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the request: {0}")]
    Write(#[source] std::io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] std::io::Error),
    #[error("the upstream closed the connection before sending a response head")]
    ClosedBeforeResponse,
    #[error("the upstream closed the connection mid-body (response framing promised more)")]
    ClosedMidBody,
    #[error("malformed response head from the upstream: {0}")]
    MalformedHead(httparse::Error),
    #[error("the upstream's response head is over {} KiB; check the app's headers", wire::MAX_HEAD / 1024)]
    HeadTooLarge,
    #[error("the upstream's response has more than {} headers", wire::MAX_HEADERS)]
    TooManyHeaders,
    #[error("bad response framing from the upstream: {0}")]
    Framing(&'static str),
    #[error("the upstream switched protocols (101) though no upgrade was asked")]
    UnaskedUpgrade,
    /// The client's own body, being sent on, failed or broke its framing.
    #[error("request body: {0}")]
    RequestBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("no response head by the deadline")]
    Timeout,
}

impl Error {
    fn body(why: &'static str) -> Self {
        Error::RequestBody(why.into())
    }
}

impl Error {
    /// The request may not have reached the upstream: the connection was found closed
    /// as the request went out, before any answer. On a connection taken from the
    /// pool that is the keep-alive race (the server closed it as idle), and a request
    /// without a body can go out again, on another connection.
    pub fn before_response(&self) -> bool {
        match self {
            Error::ClosedBeforeResponse | Error::Write(_) => true,
            Error::Read(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            _ => false,
        }
    }
}
