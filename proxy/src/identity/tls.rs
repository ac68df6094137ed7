//! Mesh TLS: the rustls configs every meshed connection uses, and the checks that make
//! them mutual and SPIFFE-bound.
//!
//! A client (outbound) verifies that the peer's chain ends at a current trust anchor
//! and that its leaf names exactly the SPIFFE id discovery says the endpoint runs as.
//! A server (inbound) requires a client certificate chaining to a current anchor that
//! names a SPIFFE id of this trust domain; which ids may call is policy's business,
//! not this module's. Anchors and this proxy's own certificate rotate in place (both
//! behind `ArcSwap`), so configs are built once and never rebuilt. TLS 1.3 only.
//!
//! Mesh connections are told apart from an app's own TLS by their server name: a
//! mesh client sends [`server_name`] of the identity it expects.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use neutrino_proto::spiffe::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("trust anchors: {0}; check --ca-file and the control plane's trust bundle")]
    Anchors(String),
    #[error("the issued certificate: {0}; check the control plane's CA")]
    Certificate(String),
    #[error("setting up TLS: {0}")]
    Setup(#[from] rustls::Error),
}

/// The server name a mesh client sends to reach `id`: a DNS name made from it, so the
/// server can tell mesh TLS from an app's own without reading further.
pub fn server_name(id: &SpiffeId) -> String {
    format!("{}.{}.id.neutrino.mesh", id.service_account(), id.namespace())
}

/// The single URI SAN of a certificate, if it has exactly one.
pub fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    uris.next().is_none().then(|| first.to_string())
}

/// A certificate's notAfter.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Every certificate in a list of PEM texts.
pub fn parse_certs(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for pem in pems {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            out.push(c.map_err(|e| format!("not a PEM certificate: {e}"))?);
        }
    }
    if out.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(out)
}

/// The current trust anchors and the verifiers built from them.
#[derive(Debug)]
pub struct Trust {
    domain: String,
    roots: ArcSwap<RootCertStore>,
    clients: ArcSwap<Arc<dyn ClientCertVerifier>>,
    /// The PEM texts the current set came from, to skip identical updates.
    pems: ArcSwap<Vec<String>>,
    provider: Arc<CryptoProvider>,
}

impl Trust {
    pub fn new(domain: &str, anchors_pem: &[String], provider: Arc<CryptoProvider>) -> Result<Trust, TlsError> {
        let (roots, clients) = build_roots(anchors_pem, &provider)?;
        Ok(Trust {
            domain: domain.to_string(),
            roots: ArcSwap::from_pointee(roots),
            clients: ArcSwap::from_pointee(clients),
            pems: ArcSwap::from_pointee(anchors_pem.to_vec()),
            provider,
        })
    }

    /// Replaces the anchors (a rotation adds the new one before removing the old one, so
    /// both are trusted in between). Returns whether anything changed. A bad set
    /// changes nothing.
    pub fn replace(&self, anchors_pem: &[String]) -> Result<bool, TlsError> {
        if **self.pems.load() == anchors_pem {
            return Ok(false);
        }
        let (roots, clients) = build_roots(anchors_pem, &self.provider)?;
        self.roots.store(Arc::new(roots));
        self.clients.store(Arc::new(clients));
        self.pems.store(Arc::new(anchors_pem.to_vec()));
        Ok(true)
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The anchors as PEM texts (for the control-plane connection's verifier).
    pub fn anchors_pem(&self) -> Arc<Vec<String>> {
        self.pems.load_full()
    }

    fn algorithms(&self) -> WebPkiSupportedAlgorithms {
        self.provider.signature_verification_algorithms
    }

    /// The handshake signature check both verifiers make (TLS 1.3 only).
    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms())
    }
}

/// Mesh TLS never negotiates TLS 1.2 (both configs offer 1.3 only); a 1.2 signature is refused.
fn tls12_refused() -> rustls::Error {
    rustls::Error::General("mesh TLS is TLS 1.3 only".into())
}

fn build_roots(
    anchors_pem: &[String],
    provider: &Arc<CryptoProvider>,
) -> Result<(RootCertStore, Arc<dyn ClientCertVerifier>), TlsError> {
    let certs = parse_certs(anchors_pem).map_err(TlsError::Anchors)?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| TlsError::Anchors(format!("unusable anchor: {e}")))?;
    }
    let clients = WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), Arc::clone(provider))
        .build()
        .map_err(|e| TlsError::Anchors(e.to_string()))?;
    Ok((roots, clients))
}

/// This proxy's current certificate and key.
#[derive(Debug, Default)]
pub struct Credentials {
    current: ArcSwapOption<Leaf>,
}

#[derive(Debug)]
pub struct Leaf {
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
}

impl Credentials {
    /// Installs a newly issued chain (leaf first) for `key_der` (PKCS#8), after checking
    /// that the leaf names `id` and matches the key.
    pub fn install(
        &self,
        id: &SpiffeId,
        chain_pem: &str,
        key_der: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<SystemTime, TlsError> {
        let chain = parse_certs(&[chain_pem.to_string()]).map_err(TlsError::Certificate)?;
        let leaf = &chain[0];
        let named = uri_san(leaf);
        if named.as_deref() != Some(id.to_string().as_str()) {
            return Err(TlsError::Certificate(format!("it names {named:?}, not {id}")));
        }
        let not_after = not_after(leaf).ok_or_else(|| TlsError::Certificate("unreadable validity".into()))?;
        let signer = provider.key_provider.load_private_key(key_der)?;
        let key = CertifiedKey::new(chain, signer);
        key.keys_match().map_err(|e| TlsError::Certificate(format!("does not match our key: {e}")))?;
        self.current.store(Some(Arc::new(Leaf { key: Arc::new(key), not_after })));
        Ok(not_after)
    }

    pub fn current(&self) -> Option<Arc<Leaf>> {
        self.current.load_full()
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|l| Arc::clone(&l.key))
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|l| Arc::clone(&l.key))
    }
}

/// Verifies a server (outbound peer) against one expected SPIFFE id.
#[derive(Debug)]
struct PeerVerifier {
    trust: Arc<Trust>,
    expected: String,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let roots = self.trust.roots.load();
        verify_server_cert_signed_by_trust_anchor(&cert, &roots, intermediates, now, self.trust.algorithms().all)?;
        match uri_san(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            presented => Err(rustls::Error::General(format!(
                "peer presented identity {}, expected {}",
                presented.as_deref().unwrap_or("(none)"),
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms().supported_schemes()
    }
}

/// Verifies a client (inbound peer): a chain to a current anchor, naming a SPIFFE id
/// of our trust domain.
#[derive(Debug)]
struct CallerVerifier {
    trust: Arc<Trust>,
}

impl ClientCertVerifier for CallerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verifier = self.trust.clients.load_full();
        verifier.verify_client_cert(end_entity, intermediates, now)?;
        let id = uri_san(end_entity).and_then(|u| u.parse::<SpiffeId>().ok());
        match id {
            Some(id) if id.trust_domain() == self.trust.domain => Ok(ClientCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!("caller {id} is from another trust domain"))),
            None => Err(rustls::Error::General("caller certificate names no SPIFFE id".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms().supported_schemes()
    }
}

/// What an outbound mesh connection carries, as ALPN says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http1,
    /// Opaque bytes: no ALPN; the server detects what they are.
    None,
}

/// The configs of one proxy identity.
#[derive(Debug)]
pub struct MeshTls {
    pub id: SpiffeId,
    /// `id` as text, for policy and logs.
    pub id_str: Arc<str>,
    /// The server name mesh clients send to reach this proxy.
    pub own_server_name: String,
    pub trust: Arc<Trust>,
    pub credentials: Arc<Credentials>,
    pub provider: Arc<CryptoProvider>,
    clients: [Arc<ClientConfig>; 3],
    server: Arc<ServerConfig>,
}

impl MeshTls {
    pub fn new(id: SpiffeId, trust: Arc<Trust>, credentials: Arc<Credentials>) -> Result<MeshTls, TlsError> {
        let provider = Arc::clone(&trust.provider);
        let client = |alpn: Alpn| -> Result<Arc<ClientConfig>, TlsError> {
            let mut c = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PeerVerifier {
                    trust: Arc::clone(&trust),
                    expected: String::new(),
                }))
                .with_client_cert_resolver(Arc::clone(&credentials) as Arc<dyn ResolvesClientCert>);
            c.alpn_protocols = match alpn {
                Alpn::H2 => vec![b"h2".to_vec()],
                Alpn::Http1 => vec![b"http/1.1".to_vec()],
                Alpn::None => vec![],
            };
            Ok(Arc::new(c))
        };
        let clients = [client(Alpn::H2)?, client(Alpn::Http1)?, client(Alpn::None)?];
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(CallerVerifier { trust: Arc::clone(&trust) }))
            .with_cert_resolver(Arc::clone(&credentials) as Arc<dyn ResolvesServerCert>);
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(MeshTls {
            own_server_name: server_name(&id),
            id_str: Arc::from(id.to_string()),
            id,
            trust,
            credentials,
            provider,
            clients,
            server: Arc::new(server),
        })
    }

    /// The client config for one connection to a peer expected to be `peer`.
    pub fn client_config(&self, peer: &str, alpn: Alpn) -> Arc<ClientConfig> {
        let base = match alpn {
            Alpn::H2 => &self.clients[0],
            Alpn::Http1 => &self.clients[1],
            Alpn::None => &self.clients[2],
        };
        let mut c = ClientConfig::clone(base);
        c.dangerous()
            .set_certificate_verifier(Arc::new(PeerVerifier { trust: Arc::clone(&self.trust), expected: peer.into() }));
        Arc::new(c)
    }

    /// The server name to send to a peer expected to be `peer` (a SPIFFE id).
    pub fn peer_server_name(peer: &str) -> Result<ServerName<'static>, String> {
        let id: SpiffeId = peer.parse().map_err(|e: neutrino_proto::spiffe::ParseError| e.to_string())?;
        ServerName::try_from(server_name(&id)).map_err(|e| format!("{peer}: {e}"))
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// True once a certificate is installed.
    pub fn has_certificate(&self) -> bool {
        self.credentials.current().is_some()
    }

    /// What `/config_dump` shows: who this proxy is, its certificate, what it trusts.
    pub fn status(&self) -> IdentityStatus {
        let leaf = self.credentials.current();
        let cert = leaf.as_ref().and_then(|l| l.key.cert.first());
        let issuer = cert.and_then(|c| {
            let (_, parsed) = x509_parser::parse_x509_certificate(c).ok()?;
            Some(parsed.issuer().to_string())
        });
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        IdentityStatus {
            id: self.id_str.to_string(),
            certificate_expires_unix: leaf.as_ref().map(|l| secs(l.not_after)),
            certificate_issuer: issuer,
            trust_anchors: parse_certs(&self.trust.anchors_pem()).map(|c| c.len()).unwrap_or(0),
        }
    }
}

/// This proxy's identity, for `/config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentityStatus {
    pub id: String,
    pub certificate_expires_unix: Option<u64>,
    /// The issuer's distinguished name, e.g. "CN=Neutrino issuer".
    pub certificate_issuer: Option<String>,
    /// Certificates in the trust bundle in use.
    pub trust_anchors: usize,
}

/// The verified SPIFFE id of a TLS peer, from its leaf.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Arc<str>> {
    certs.and_then(|c| c.first()).and_then(|leaf| uri_san(leaf)).map(Arc::from)
}

/// The server name of a ClientHello at the start of `prefix`; None when it names none,
/// or `prefix` does not hold a whole ClientHello (or is not one).
pub fn hello_server_name(prefix: &[u8]) -> Option<String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = prefix;
    while !rd.is_empty() {
        acceptor.read_tls(&mut rd).ok()?;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted.client_hello().server_name().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
