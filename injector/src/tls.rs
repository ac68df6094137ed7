//! Step 8a, TLS for the webhook (feature `server`): the serving certificate from PEM files
//! (re-read when they change, as cert-manager rotates them) or generated at start.
//!
//! Generated mode (`--self-signed-dns`): a fresh CA signs one leaf certificate for the
//! given DNS names; the CA certificate (PEM) is what goes into the webhook
//! configuration's `caBundle`. The CA's private key is dropped right after signing, so it
//! can never sign anything else; a restart makes a new CA (and needs a new caBundle).
//!
//! rustls with the ring provider, TLS 1.2 and 1.3, ALPN h2 and http/1.1. This module must
//! not answer requests: that is `serve`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("loading the TLS certificate {path}: {reason}; give a PEM certificate chain with --tls-cert")]
    Cert { path: PathBuf, reason: String },
    #[error("loading the TLS key {path}: {reason}; give the PEM private key (PKCS#8, PKCS#1 or SEC1) with --tls-key")]
    Key { path: PathBuf, reason: String },
    #[error("loading the TLS key pair: {0}; the key must be the certificate's (--tls-cert, --tls-key)")]
    Mismatch(String),
    #[error("generating the self-signed certificate: {0}; check --self-signed-dns (DNS names such as svc.ns.svc)")]
    Generate(String),
    #[error("writing the CA bundle to {path}: {source}")]
    WriteCa { path: PathBuf, source: std::io::Error },
    #[error("setting up TLS: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate and key from PEM bytes.
fn certified(cert_pem: &[u8], key_pem: &[u8], cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert { path: cert_path.into(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::Cert { path: cert_path.into(), reason: "no CERTIFICATE block".into() });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Key { path: key_path.into(), reason: e.to_string() })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Mismatch(e.to_string()))
}

/// Reads a certificate chain and key from PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError::Cert { path: cert.into(), reason: e.to_string() })?;
    let key_pem = std::fs::read(key).map_err(|e| TlsError::Key { path: key.into(), reason: e.to_string() })?;
    certified(&cert_pem, &key_pem, cert, key)
}

/// A generated serving certificate and the CA that signed it.
#[derive(Debug)]
pub struct Generated {
    pub key: CertifiedKey,
    /// The CA certificate, PEM: the webhook's caBundle.
    pub ca_pem: String,
    /// The serving certificate and its key, PEM (for writing to files, e.g. in tests).
    pub cert_pem: String,
    pub key_pem: String,
}

/// Makes a CA and a leaf certificate for `dns_names` signed by it.
pub fn generate(dns_names: &[String]) -> Result<Generated, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    if dns_names.is_empty() {
        return Err(TlsError::Generate("no DNS names".into()));
    }
    let ca_key = KeyPair::generate().map_err(generate)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "neutrino-injector CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(generate)?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate().map_err(generate)?;
    let mut leaf = CertificateParams::new(dns_names.to_vec()).map_err(generate)?;
    leaf.distinguished_name.push(DnType::CommonName, dns_names[0].clone());
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(generate)?;

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let chain = vec![leaf_cert.der().clone()];
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(Generated { key, ca_pem: ca_cert.pem(), cert_pem: leaf_cert.pem(), key_pem: leaf_key.serialize_pem() })
}

/// Writes the CA bundle (PEM) for the webhook configuration's caBundle.
pub fn write_ca(path: &Path, pem: &str) -> Result<(), TlsError> {
    std::fs::write(path, pem).map_err(|source| TlsError::WriteCa { path: path.into(), source })
}

/// Hands out the current certificate; a reload swaps it without touching connections.
#[derive(Debug)]
pub struct Resolver(ArcSwap<CertifiedKey>);

impl Resolver {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Resolver(ArcSwap::from_pointee(key)))
    }

    pub fn set(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The rustls server config: ring, safe defaults, no client auth, ALPN h2 and http/1.1.
pub fn server_config(resolver: Arc<Resolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Re-reads the PEM files every `every` and swaps the certificate in when their bytes
/// changed and load; a bad pair is logged and the last good one kept.
pub async fn watch_files(resolver: Arc<Resolver>, cert: PathBuf, key: PathBuf, every: Duration) {
    let read = || (std::fs::read(&cert).ok(), std::fs::read(&key).ok());
    let mut last = read();
    loop {
        tokio::time::sleep(every).await;
        let now = read();
        if now == last {
            continue;
        }
        if let (Some(c), Some(k)) = &now {
            match certified(c, k, &cert, &key) {
                Ok(new) => {
                    resolver.set(new);
                    tracing::info!(cert = %cert.display(), "reloaded the TLS certificate");
                }
                Err(e) => tracing::warn!("{e}; keeping the previous certificate"),
            }
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_and_files_round_trip() {
        let g = generate(&["neutrino-injector.neutrino-system.svc".into()]).expect("generate");
        assert!(g.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(g.key.cert.len(), 1);
        assert!(matches!(generate(&[]), Err(TlsError::Generate(_))));
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, &g.cert_pem).expect("write");
        std::fs::write(&key, &g.key_pem).expect("write");
        assert_eq!(load(&cert, &key).expect("load").cert, g.key.cert);
        assert!(server_config(Resolver::new(g.key)).is_ok());
    }

    #[test]
    fn bad_files_say_which_and_what_to_give() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        std::fs::write(&cert, "not pem").expect("write");
        std::fs::write(&key, "not pem").expect("write");
        let e = load(&cert, &key).expect_err("bad cert");
        assert!(e.to_string().contains("--tls-cert"), "{e}");
        let e = load(&dir.path().join("missing"), &key).expect_err("missing");
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
