//! Identity step 2, the CA (pure but for key generation and randomness): trust anchors,
//! an issuer certificate chain and its key in; validated on load; leaf certificates out.
//!
//! [`Ca::load`] checks a set of PEM material as a whole (the issuer chains to one of the
//! anchors, is a CA, is within its validity, and the key is the certificate's), so a
//! half-rotated or mismatched set is refused before it can sign anything.
//! [`Ca::certify`] signs a CSR's public key into a leaf whose only identity is the URI
//! SAN the caller proved (the token's service account): everything else the CSR asks
//! for (other names, key usages, CA bits, extensions) is ignored, never copied.
//!
//! This module must not read files, read the clock (`now` is an argument) or know about
//! tokens or gRPC: `identity/mod.rs` does the IO, `service.rs` the authentication.

use std::net::IpAddr;
use std::time::Duration;

use neutrino_proto::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use thiserror::Error;
use x509_parser::prelude::*;

/// Leaves start this long before `now`, for peers whose clocks are a little behind.
pub const BACKDATE_SECS: i64 = 60;
/// The shortest life of the control plane's own serving certificate (renewed at 70 %,
/// and after every CA change).
pub const SERVING_MIN_TTL: Duration = Duration::from_secs(3600);
/// The default leaf lifetime (`--cert-ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetimes of a generated local CA (`--ca-dir`): the anchor and the issuer it signs.
pub const GENERATED_ANCHOR_DAYS: i64 = 3650;
pub const GENERATED_ISSUER_DAYS: i64 = 365;

/// The CA material as PEM text, as read from the files (or generated).
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// One or more CERTIFICATE blocks: every anchor a chain may end at.
    pub anchors_pem: String,
    /// The issuer's certificate first, then any intermediates up to (not including) an anchor.
    pub issuer_pem: String,
    /// The issuer's private key (PKCS#8, or what rcgen reads).
    pub issuer_key_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Material").field("anchors_pem", &self.anchors_pem).finish_non_exhaustive()
    }
}

/// Why a set of CA material cannot be used. Each names the part and what to change.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CaError {
    #[error("trust anchors: no CERTIFICATE block; give at least one PEM certificate (--trust-anchors, anchors.pem)")]
    NoAnchors,
    #[error(
        "issuer certificate: no CERTIFICATE block; give the issuer's PEM certificate first (--issuer-cert, issuer.pem)"
    )]
    NoIssuer,
    #[error("{what}: certificate {index} is not a valid X.509 certificate ({reason}); check the PEM is complete")]
    BadCertificate { what: &'static str, index: usize, reason: String },
    #[error(
        "issuer key: {0}; give the issuer's PEM private key, PKCS#8 ECDSA P-256/P-384 or Ed25519 (--issuer-key, issuer-key.pem)"
    )]
    BadKey(String),
    #[error(
        "issuer key does not belong to the issuer certificate ({subject}); --issuer-key must be the key of --issuer-cert"
    )]
    KeyMismatch { subject: String },
    #[error(
        "issuer certificate {subject} is not a CA (no basicConstraints CA:TRUE or no keyCertSign); issue it as a CA"
    )]
    NotCa { subject: String },
    #[error("{what} {subject} expired at {not_after} (unix seconds); issue a new one and replace it")]
    Expired { what: &'static str, subject: String, not_after: i64 },
    #[error("{what} {subject} is not valid before {not_before} (unix seconds); check the clock or the certificate")]
    NotYetValid { what: &'static str, subject: String, not_before: i64 },
    #[error(
        "issuer certificate {subject} (issued by {issuer}) does not chain to any trust anchor; add its anchor to the \
         anchors first (rotation: add the new anchor, wait for it to reach every proxy, then switch the issuer)"
    )]
    Untrusted { subject: String, issuer: String },
    #[error("signing a certificate: {0}")]
    Sign(String),
}

/// Why a CSR is refused. `service.rs` maps each to a gRPC status code.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CertifyError {
    #[error("the CSR is not a PEM PKCS#10 certificate request ({0}); send a 'CERTIFICATE REQUEST' PEM block")]
    Malformed(String),
    #[error("the CSR's signature does not verify ({0}); sign the request with the key it carries")]
    BadSignature(String),
    #[error("the CSR's key type {0} is not supported; use ECDSA P-256 (recommended), ECDSA P-384 or Ed25519")]
    UnsupportedKey(String),
    #[error(
        "the CSR asks for {requested} but the token proves {allowed}; the CSR's only SAN must be the URI {allowed}"
    )]
    IdentityMismatch { requested: String, allowed: String },
    #[error("the CA cannot sign now: {0}")]
    Unavailable(String),
}

impl CertifyError {
    /// Label for the failures metric.
    pub fn reason(&self) -> &'static str {
        match self {
            CertifyError::Malformed(_) => "malformed_csr",
            CertifyError::BadSignature(_) => "bad_signature",
            CertifyError::UnsupportedKey(_) => "unsupported_key",
            CertifyError::IdentityMismatch { .. } => "identity_mismatch",
            CertifyError::Unavailable(_) => "ca_unavailable",
        }
    }
}

/// A signed leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedLeaf {
    /// The leaf, then the issuer chain, PEM.
    pub chain_pem: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// A serving certificate the CA issued to the control plane itself, with its key.
#[derive(Debug, Clone)]
pub struct ServerCert {
    /// The leaf, then the issuer chain, DER.
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// One parsed certificate, kept as DER plus the facts we look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub pem: String,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// A loaded, validated CA.
pub struct Ca {
    material: Material,
    anchors: Vec<CertInfo>,
    /// The issuer first, then intermediates.
    chain: Vec<CertInfo>,
    issuer: Issuer<'static, KeyPair>,
    ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("anchors", &self.anchors.iter().map(|a| &a.subject).collect::<Vec<_>>())
            .field("issuer", &self.chain.first().map(|c| &c.subject))
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertInfo>, CaError> {
    let mut out = Vec::new();
    for (index, block) in Pem::iter_from_buffer(pem.as_bytes()).enumerate() {
        let bad = |reason: String| CaError::BadCertificate { what, index: index + 1, reason };
        let block = block.map_err(|e| bad(e.to_string()))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let (_, cert) = X509Certificate::from_der(&block.contents).map_err(|e| bad(e.to_string()))?;
        let validity = cert.validity();
        out.push(CertInfo {
            pem: pem_encode("CERTIFICATE", &block.contents),
            subject: cert.subject().to_string(),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            der: block.contents.clone(),
        });
    }
    Ok(out)
}

/// PEM with 64-column lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CaError> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| CaError::BadCertificate {
        what: "certificate",
        index: 1,
        reason: e.to_string(),
    })
}

/// True when `child` names `parent` as its issuer and `parent`'s key signed it.
fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer() == parent.subject() && child.verify_signature(Some(parent.public_key())).is_ok()
}

fn check_time(what: &'static str, c: &CertInfo, now: i64) -> Result<(), CaError> {
    if now >= c.not_after {
        return Err(CaError::Expired { what, subject: c.subject.clone(), not_after: c.not_after });
    }
    if now < c.not_before {
        return Err(CaError::NotYetValid { what, subject: c.subject.clone(), not_before: c.not_before });
    }
    Ok(())
}

fn is_signing_ca(cert: &X509Certificate<'_>) -> bool {
    let ku_ok = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    cert.is_ca() && ku_ok
}

impl Ca {
    /// Validates `material` at `now` (unix seconds); leaves will live `ttl`.
    pub fn load(material: &Material, ttl: Duration, now: i64) -> Result<Ca, CaError> {
        let anchors = certs(&material.anchors_pem, "trust anchors")?;
        if anchors.is_empty() {
            return Err(CaError::NoAnchors);
        }
        let mut chain = certs(&material.issuer_pem, "issuer certificate")?;
        // A chain that ends with an anchor is fine; the anchor is not sent twice.
        while chain.len() > 1 && chain.last().is_some_and(|last| anchors.iter().any(|a| a.der == last.der)) {
            chain.pop();
        }
        let issuer_info = chain.first().ok_or(CaError::NoIssuer)?.clone();
        let issuer_cert = parse(&issuer_info.der)?;
        if !is_signing_ca(&issuer_cert) {
            return Err(CaError::NotCa { subject: issuer_info.subject.clone() });
        }
        check_time("issuer certificate", &issuer_info, now)?;
        // Each link signed by the next; the last by an anchor (or it is one).
        for pair in chain.windows(2) {
            let (child, parent) = (parse(&pair[0].der)?, parse(&pair[1].der)?);
            if !signed_by(&child, &parent) {
                return Err(CaError::Untrusted {
                    subject: pair[0].subject.clone(),
                    issuer: child.issuer().to_string(),
                });
            }
        }
        let last_info = chain.last().ok_or(CaError::NoIssuer)?;
        let last = parse(&last_info.der)?;
        let trusted = anchors
            .iter()
            .any(|a| a.der == last_info.der || parse(&a.der).is_ok_and(|anchor| signed_by(&last, &anchor)));
        if !trusted {
            return Err(CaError::Untrusted { subject: last_info.subject.clone(), issuer: last.issuer().to_string() });
        }
        let key = KeyPair::from_pem(&material.issuer_key_pem).map_err(|e| CaError::BadKey(e.to_string()))?;
        if key.der_bytes() != issuer_cert.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::KeyMismatch { subject: issuer_info.subject.clone() });
        }
        let issuer = Issuer::from_ca_cert_der(&issuer_info.der.clone().into(), key)
            .map_err(|e| CaError::BadCertificate { what: "issuer certificate", index: 1, reason: e.to_string() })?;
        Ok(Ca { material: material.clone(), anchors, chain, issuer, ttl })
    }

    pub fn material(&self) -> &Material {
        &self.material
    }

    /// Every anchor, PEM, one certificate each (for the TrustBundle and CertifyResponse).
    pub fn anchors_pem(&self) -> Vec<String> {
        self.anchors.iter().map(|a| a.pem.clone()).collect()
    }

    pub fn anchors(&self) -> &[CertInfo] {
        &self.anchors
    }

    pub fn issuer(&self) -> &CertInfo {
        // `load` refuses an empty chain.
        &self.chain[0]
    }

    pub fn issuer_not_after(&self) -> i64 {
        self.issuer().not_after
    }

    /// The earliest notAfter among the anchors.
    pub fn earliest_anchor_not_after(&self) -> i64 {
        self.anchors.iter().map(|a| a.not_after).min().unwrap_or(0)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The validity window of a leaf signed at `now`: backdated a minute, `ttl` long,
    /// never past the issuer's own end.
    fn window(&self, now: i64) -> Result<(i64, i64), CertifyError> {
        self.window_for(now, self.ttl)
    }

    /// The validity of a certificate issued at `now` for `ttl`, capped at the issuer's end.
    fn window_for(&self, now: i64, ttl: Duration) -> Result<(i64, i64), CertifyError> {
        let end = self.issuer_not_after();
        if now >= end {
            return Err(CertifyError::Unavailable(format!(
                "the issuer certificate {} expired at {end} (unix seconds); replace the issuer",
                self.issuer().subject
            )));
        }
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        Ok((now - BACKDATE_SECS, now.saturating_add(ttl).min(end)))
    }

    fn leaf_params(&self, sans: Vec<SanType>, window: (i64, i64)) -> Result<CertificateParams, String> {
        let mut p = CertificateParams::default();
        // The URI SAN is the identity; the subject stays empty (the SAN is then critical).
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = time(window.0)?;
        p.not_after = time(window.1)?;
        p.serial_number = Some(random_serial());
        Ok(p)
    }

    fn chain_pem(&self, leaf_pem: &str) -> String {
        let mut out = leaf_pem.to_string();
        for c in &self.chain {
            out.push_str(&c.pem);
        }
        out
    }

    /// Signs `csr_pem`'s key into a leaf for `claimed` (what the caller's token proves).
    pub fn certify(&self, csr_pem: &str, claimed: &SpiffeId, now: i64) -> Result<IssuedLeaf, CertifyError> {
        let key = csr_key(csr_pem, claimed)?;
        let window = self.window(now)?;
        let uri = rcgen::string::Ia5String::try_from(claimed.to_string())
            .map_err(|e| CertifyError::Unavailable(format!("the SPIFFE id is not IA5: {e}")))?;
        let params = self.leaf_params(vec![SanType::URI(uri)], window).map_err(CertifyError::Unavailable)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| CertifyError::Unavailable(e.to_string()))?;
        Ok(IssuedLeaf { chain_pem: self.chain_pem(&leaf.pem()), not_before_unix: window.0, not_after_unix: window.1 })
    }

    /// A serving certificate (with a fresh key) for the control plane: `id`'s URI SAN
    /// plus `names` (IP literals become IP SANs, the rest DNS names).
    pub fn issue_server(&self, id: &SpiffeId, names: &[String], now: i64) -> Result<ServerCert, CaError> {
        let sign = |e: String| CaError::Sign(e);
        // Not the proxies' `--cert-ttl`: a very short one (seconds, in tests) would let the
        // serving certificate lapse between two runs of the CA task, cutting every proxy off.
        let window = self.window_for(now, self.ttl.max(SERVING_MIN_TTL)).map_err(|e| sign(e.to_string()))?;
        let mut sans =
            vec![SanType::URI(rcgen::string::Ia5String::try_from(id.to_string()).map_err(|e| sign(e.to_string()))?)];
        for name in names {
            sans.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    rcgen::string::Ia5String::try_from(name.as_str())
                        .map_err(|e| sign(format!("--tls-names {name:?}: {e}")))?,
                ),
            });
        }
        let key = KeyPair::generate().map_err(|e| sign(e.to_string()))?;
        let params = self.leaf_params(sans, window).map_err(sign)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| sign(e.to_string()))?;
        let mut chain_der = vec![leaf.der().to_vec()];
        chain_der.extend(self.chain.iter().map(|c| c.der.clone()));
        Ok(ServerCert { chain_der, key_der: key.serialize_der(), not_before_unix: window.0, not_after_unix: window.1 })
    }
}

fn time(unix: i64) -> Result<::time::OffsetDateTime, String> {
    ::time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| format!("time {unix}: {e}"))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

/// A public key taken from a CSR, for rcgen to sign.
struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";

/// Parses and verifies the CSR, checks it asks for exactly `claimed`, returns its key.
fn csr_key(csr_pem: &str, claimed: &SpiffeId) -> Result<CsrKey, CertifyError> {
    let malformed = |why: String| CertifyError::Malformed(why);
    let (_, block) = x509_parser::pem::parse_x509_pem(csr_pem.trim_start().as_bytes())
        .map_err(|e| malformed(format!("no PEM block: {e}")))?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err(malformed(format!("the PEM block is {:?}", block.label)));
    }
    let (_, csr) = X509CertificationRequest::from_der(&block.contents).map_err(|e| malformed(e.to_string()))?;
    csr.verify_signature().map_err(|e| CertifyError::BadSignature(e.to_string()))?;

    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter().map(|n| match n {
                GeneralName::URI(u) => u.to_string(),
                other => format!("{other}"),
            }));
        }
    }
    let allowed = claimed.to_string();
    if names.len() != 1 || names[0] != allowed {
        let requested = match names.as_slice() {
            [] => "no SAN".to_string(),
            [one] => one.clone(),
            many => format!("{} SANs ({})", many.len(), many.join(", ")),
        };
        return Err(CertifyError::IdentityMismatch { requested, allowed });
    }

    let spki = &csr.certification_request_info.subject_pki;
    let alg_oid = spki.algorithm.algorithm.to_id_string();
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
    let alg = match (alg_oid.as_str(), curve.as_deref()) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256)) => &rcgen::PKCS_ECDSA_P256_SHA256,
        (OID_EC_PUBLIC_KEY, Some(OID_P384)) => &rcgen::PKCS_ECDSA_P384_SHA384,
        (OID_ED25519, _) => &rcgen::PKCS_ED25519,
        (other, curve) => {
            let name = match curve {
                Some(c) => format!("{other} (curve {c})"),
                None => other.to_string(),
            };
            return Err(CertifyError::UnsupportedKey(name));
        }
    };
    Ok(CsrKey { raw: spki.subject_public_key.data.to_vec(), alg })
}

/// A fresh local CA: a self-signed anchor for `anchor_days` and an issuer it signs for
/// `issuer_days`, both from an hour before `now` (clock skew). For `--ca-dir` and
/// `neutrino install`.
pub fn generate(trust_domain: &str, now: i64, anchor_days: i64, issuer_days: i64) -> Result<Material, CaError> {
    let err = |e: rcgen::Error| CaError::Sign(e.to_string());
    let start = time(now - 3600).map_err(CaError::Sign)?;
    let anchor_key = KeyPair::generate().map_err(err)?;
    let mut anchor = CertificateParams::default();
    anchor.distinguished_name = DistinguishedName::new();
    anchor.distinguished_name.push(DnType::OrganizationName, "neutrino");
    anchor.distinguished_name.push(DnType::CommonName, format!("neutrino mesh root {trust_domain}"));
    anchor.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    anchor.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    anchor.not_before = start;
    anchor.not_after = time(now + anchor_days * 86_400).map_err(CaError::Sign)?;
    anchor.serial_number = Some(random_serial());
    let anchor_cert = anchor.self_signed(&anchor_key).map_err(err)?;
    let anchor_issuer = Issuer::new(anchor, anchor_key);

    let issuer_key = KeyPair::generate().map_err(err)?;
    let mut issuer = CertificateParams::default();
    issuer.distinguished_name = DistinguishedName::new();
    issuer.distinguished_name.push(DnType::OrganizationName, "neutrino");
    issuer.distinguished_name.push(DnType::CommonName, format!("neutrino mesh issuer {trust_domain}"));
    issuer.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    issuer.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    issuer.use_authority_key_identifier_extension = true;
    issuer.not_before = start;
    issuer.not_after = time(now + issuer_days * 86_400).map_err(CaError::Sign)?;
    issuer.serial_number = Some(random_serial());
    let issuer_cert = issuer.signed_by(&issuer_key, &anchor_issuer).map_err(err)?;
    Ok(Material {
        anchors_pem: anchor_cert.pem(),
        issuer_pem: issuer_cert.pem(),
        issuer_key_pem: issuer_key.serialize_pem(),
    })
}

#[cfg(test)]
#[path = "ca_tests.rs"]
mod tests;
