//! Certify: keeps this proxy's certificate current. It is the only writer of the
//! proxy's [`Credentials`](super::tls::Credentials).
//!
//! Each round makes a fresh P-256 key, sends a CSR naming the pod's SPIFFE id with the
//! pod's token to the control plane's `Identity` service (over TLS verified against the
//! trust anchors), checks and installs the chain, and sleeps until 70 % of the leaf's
//! life. Failures retry with backoff while the current certificate keeps serving. It
//! must not touch connections: new handshakes simply pick up the new certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use neutrino_proto::identity_client::IdentityClient;
use neutrino_proto::{CertifyRequest, CertifyResponse};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

use super::{IdentitySettings, MeshTls};
use crate::metrics::{Metrics, ResultLabel};

#[derive(Debug, Error)]
pub enum CertifyError {
    #[error("making a key and CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("reading the token {path}: {source}; check --token-file and the projected token volume")]
    Token { path: String, source: std::io::Error },
    #[error(
        "connecting to the control plane at {addr}: {cause}; check --control-plane (its TLS port, 15012) and --ca-file"
    )]
    Connect { addr: String, cause: String },
    #[error("the control plane refused the certificate request ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error(transparent)]
    Install(#[from] super::tls::TlsError),
}

/// A fresh key and a CSR for `id`: PEM, and the key in PKCS#8.
pub fn csr_for(id: &str) -> Result<(String, PrivateKeyDer<'static>), CertifyError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(id)?)];
    let pem = params.serialize_request(&key)?.pem()?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((pem, der))
}

/// When to renew a leaf issued at `issued` that expires at `not_after`: at 70 % of its
/// life, but not sooner than a second from `now`.
pub fn renew_at(issued: SystemTime, not_after: SystemTime, now: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    (issued + life.mul_f64(0.7)).max(now + Duration::from_secs(1))
}

/// One round against the control plane at `addr`.
async fn certify_once(tls: &MeshTls, settings: &IdentitySettings, addr: &str) -> Result<SystemTime, CertifyError> {
    let (csr_pem, key) = csr_for(&tls.id_str)?;
    let token = tokio::fs::read_to_string(&settings.token_file)
        .await
        .map_err(|source| CertifyError::Token { path: settings.token_file.display().to_string(), source })?;
    let anchors = tls.trust.anchors_pem();
    let failed =
        |e: tonic::transport::Error| CertifyError::Connect { addr: addr.to_string(), cause: crate::error_chain(&e) };
    let endpoint = super::control_plane_endpoint(addr, Some(&anchors)).map_err(failed)?;
    let channel = endpoint.connect().await.map_err(failed)?;
    let resp: CertifyResponse = IdentityClient::new(channel)
        .certify(CertifyRequest { token: token.trim().to_string(), csr_pem })
        .await
        .map_err(|s| CertifyError::Refused { code: s.code(), message: s.message().to_string() })?
        .into_inner();
    if !resp.trust_anchors_pem.is_empty() {
        tls.trust.replace(&resp.trust_anchors_pem)?;
    }
    Ok(tls.credentials.install(&tls.id, &resp.certificate_chain_pem, key, &tls.provider)?)
}

/// Runs forever: certify, sleep until renewal, repeat. `addrs` are the control-plane
/// replicas (their TLS port), tried in turn.
pub async fn run(tls: Arc<MeshTls>, settings: IdentitySettings, addrs: Vec<String>, metrics: Arc<Metrics>) {
    let mut backoff = Duration::from_millis(200);
    let mut next = 0usize;
    loop {
        let addr = addrs.get(next % addrs.len().max(1)).cloned().unwrap_or_default();
        let issued = SystemTime::now();
        match certify_once(&tls, &settings, &addr).await {
            Ok(not_after) => {
                backoff = Duration::from_millis(200);
                metrics.security.certificate_renewals.get_or_create(&ResultLabel { result: "ok" }).inc();
                let expiry = not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
                metrics.security.certificate_expiry.set(i64::try_from(expiry).unwrap_or(i64::MAX));
                let at = renew_at(issued, not_after, SystemTime::now());
                tracing::info!(identity = %tls.id_str, expires_in = ?not_after.duration_since(SystemTime::now()).unwrap_or_default(), "identity: certificate installed");
                tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await;
            }
            Err(e) => {
                metrics.security.certificate_renewals.get_or_create(&ResultLabel { result: "error" }).inc();
                let left = tls.credentials.current().and_then(|l| l.not_after.duration_since(SystemTime::now()).ok());
                tracing::warn!(identity = %tls.id_str, valid_for = ?left, "identity: {e}; retrying in {backoff:?}");
                next += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_seventy_percent_of_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_at(t0, t0 + day, t0), t0 + day.mul_f64(0.7));
        // A very short life still waits a second, so a broken CA cannot spin us.
        assert_eq!(renew_at(t0, t0 + Duration::from_millis(500), t0), t0 + Duration::from_secs(1));
    }

    #[test]
    fn the_csr_names_only_the_spiffe_id() {
        let id = "spiffe://cluster.local/ns/shop/sa/orders";
        let (pem, _key) = csr_for(id).expect("csr");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|d: rustls::pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
            .expect("pem");
        use x509_parser::prelude::FromDer;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der).expect("der");
        csr.verify_signature().expect("self-signed by its key");
        let sans: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.general_names.iter().map(|n| n.to_string()))
            .collect();
        assert_eq!(sans, [format!("URI({id})")]);
    }
}
