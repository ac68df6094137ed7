//! Identity: who this proxy is in the mesh, and the TLS that proves it.
//!
//! `certify` keeps a certificate for the pod's SPIFFE id: it makes a key (which never
//! leaves the process), sends a CSR with the pod's token to the control plane's
//! `Identity` service, installs the answer, and renews at 70 % of its life. `tls` holds
//! the rustls configs built on it. This module also builds the connection to the
//! control plane, which is TLS verified against the trust anchors when they are
//! configured. It must not decide who may call whom: that is policy's job.

pub mod certify;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use neutrino_proto::spiffe::SpiffeId;
use thiserror::Error;

pub use tls::{Alpn, MeshTls};

/// Where the first trust anchors come from.
#[derive(Debug, Clone)]
pub enum Anchors {
    File(PathBuf),
    /// PEM text (the injector puts it in the proxy's environment).
    Pem(String),
}

/// How the proxy gets and proves its identity.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub id: SpiffeId,
    /// Trust anchors to verify the control plane and, until the control plane pushes
    /// its bundle, mesh peers.
    pub anchors: Anchors,
    /// The token proving the pod's service account (read anew for every request,
    /// since Kubernetes rotates projected tokens).
    pub token_file: PathBuf,
}

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("reading {what} {path}: {source}; check the flag or the mounted volume")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The crypto everything here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the anchors file and builds this proxy's mesh TLS (no certificate yet).
pub fn load(settings: &IdentitySettings) -> Result<Arc<MeshTls>, IdentityError> {
    let pem = match &settings.anchors {
        Anchors::File(path) => std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            what: "trust anchors",
            path: path.clone(),
            source,
        })?,
        Anchors::Pem(pem) => pem.clone(),
    };
    let trust = Arc::new(tls::Trust::new(settings.id.trust_domain(), &[pem], provider())?);
    Ok(Arc::new(MeshTls::new(settings.id.clone(), trust, Arc::default())?))
}

/// A gRPC endpoint for the control plane at `addr`: TLS verified against `anchors`
/// (PEM) when given, with the host of `addr` as the name to verify; plaintext otherwise.
pub fn control_plane_endpoint(
    addr: &str,
    anchors: Option<&[String]>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let bare = addr.split_once("://").map(|(_, rest)| rest).unwrap_or(addr);
    let scheme = if anchors.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{bare}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(anchors) = anchors {
        let host = bare.rsplit_once(':').map(|(h, _)| h).unwrap_or(bare).trim_start_matches('[').trim_end_matches(']');
        let certs = anchors.iter().map(tonic::transport::Certificate::from_pem);
        endpoint =
            endpoint.tls_config(tonic::transport::ClientTlsConfig::new().ca_certificates(certs).domain_name(host))?;
    }
    Ok(endpoint)
}
