//! Tests of `ca.rs`: material validation, leaves, CSR refusals, rotation.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

use super::*;

const NOW: i64 = 1_700_000_000;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("valid id")
}

fn material() -> Material {
    generate("cluster.local", NOW, GENERATED_ANCHOR_DAYS, GENERATED_ISSUER_DAYS).expect("generate")
}

fn ca(m: &Material) -> Ca {
    Ca::load(m, DEFAULT_TTL, NOW).expect("valid material")
}

fn csr_for(sans: Vec<SanType>, key: &KeyPair) -> String {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.serialize_request(key).expect("csr").pem().expect("pem")
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

fn csr(identity: &SpiffeId) -> String {
    csr_for(vec![uri(&identity.to_string())], &KeyPair::generate().expect("key"))
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem.as_bytes()).map(|p| p.expect("pem").contents).collect()
}

/// Verifies `chain_pem` (leaf first) as a client certificate against `anchors_pem`.
fn verify(chain_pem: &str, anchors_pem: &str, at: i64) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for der in ders(anchors_pem) {
        roots.add(CertificateDer::from(der)).expect("anchor");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .expect("verifier");
    let chain: Vec<CertificateDer<'static>> = ders(chain_pem).into_iter().map(CertificateDer::from).collect();
    let at = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(at).expect("positive")));
    verifier.verify_client_cert(&chain[0], &chain[1..], at).map(|_| ())
}

#[test]
fn a_leaf_has_exactly_the_spiffe_id_a_day_of_life_both_ekus_and_chains_to_the_anchor() {
    let m = material();
    let ca = ca(&m);
    let who = id("shop", "orders");
    let leaf = ca.certify(&csr(&who), &who, NOW).expect("issued");
    assert_eq!((leaf.not_before_unix, leaf.not_after_unix), (NOW - 60, NOW + 86_400));

    let chain = ders(&leaf.chain_pem);
    assert_eq!(chain.len(), 2, "leaf + issuer");
    assert_eq!(chain[1], ders(&m.issuer_pem)[0]);
    let (_, cert) = X509Certificate::from_der(&chain[0]).expect("x509");
    let san = cert.subject_alternative_name().expect("ext").expect("san");
    assert_eq!(san.value.general_names, vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/orders")]);
    assert!(san.critical, "an empty subject makes the SAN critical");
    assert_eq!(cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(), 86_400 + 60);
    let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    assert!(!cert.is_ca());
    let ku = cert.key_usage().expect("ext").expect("ku").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());

    verify(&leaf.chain_pem, &m.anchors_pem, NOW + 10).expect("chains to the anchor");
    verify(&leaf.chain_pem, &m.anchors_pem, NOW + 86_400 + 10).expect_err("expired after a day");
    verify(&leaf.chain_pem, &material().anchors_pem, NOW + 10).expect_err("not under another anchor");
}

#[test]
fn the_ttl_is_capped_at_the_issuers_end() {
    let m = generate("cluster.local", NOW, 10, 1).expect("generate");
    let ca = Ca::load(&m, Duration::from_secs(7 * 86_400), NOW).expect("load");
    let who = id("a", "b");
    let leaf = ca.certify(&csr(&who), &who, NOW).expect("issued");
    assert_eq!(leaf.not_after_unix, ca.issuer_not_after());
    assert_eq!(ca.issuer_not_after(), NOW + 86_400);
    let late = ca.certify(&csr(&who), &who, NOW + 2 * 86_400).expect_err("issuer expired");
    assert!(matches!(late, CertifyError::Unavailable(_)), "{late}");
}

#[test]
fn a_csr_for_another_identity_is_refused_naming_both() {
    let ca = ca(&material());
    let e = ca.certify(&csr(&id("shop", "payments")), &id("shop", "orders"), NOW).expect_err("other id");
    assert!(matches!(e, CertifyError::IdentityMismatch { .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains("spiffe://cluster.local/ns/shop/sa/payments"), "{text}");
    assert!(text.contains("spiffe://cluster.local/ns/shop/sa/orders"), "{text}");

    let key = KeyPair::generate().expect("key");
    let who = id("shop", "orders");
    let extra = csr_for(vec![uri(&who.to_string()), SanType::DnsName("evil.example".try_into().expect("dns"))], &key);
    let e = ca.certify(&extra, &who, NOW).expect_err("two SANs");
    assert!(e.to_string().contains("2 SANs") && e.to_string().contains("evil.example"), "{e}");
    let none = csr_for(Vec::new(), &key);
    assert!(ca.certify(&none, &who, NOW).expect_err("no SAN").to_string().contains("no SAN"));
}

#[test]
fn what_else_a_csr_asks_for_is_ignored() {
    let ca = ca(&material());
    let who = id("shop", "orders");
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![uri(&who.to_string())];
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![5, 0])];
    p.distinguished_name.push(rcgen::DnType::CommonName, "admin");
    let pem = p.serialize_request(&key).expect("csr").pem().expect("pem");
    let leaf = ca.certify(&pem, &who, NOW).expect("issued anyway");
    let chain = ders(&leaf.chain_pem);
    let (_, cert) = X509Certificate::from_der(&chain[0]).expect("x509");
    assert!(!cert.is_ca());
    assert!(!cert.key_usage().expect("ext").expect("ku").value.key_cert_sign());
    let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
    assert!(!eku.code_signing && eku.client_auth);
    assert!(cert.subject().iter_common_name().next().is_none(), "the CSR's subject is not copied");
    assert_eq!(cert.extensions().iter().filter(|e| e.oid.to_id_string() == "1.2.3.4").count(), 0);
}

#[test]
fn garbage_truncated_and_badly_signed_csrs_are_invalid_arguments() {
    let ca = ca(&material());
    let who = id("shop", "orders");
    for bad in ["", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"] {
        let e = ca.certify(bad, &who, NOW).expect_err(bad);
        assert!(matches!(e, CertifyError::Malformed(_)), "{bad:?}: {e}");
    }
    let good = csr(&who);
    let truncated = format!("{}\n-----END CERTIFICATE REQUEST-----\n", &good[..good.len() / 2]);
    assert!(matches!(ca.certify(&truncated, &who, NOW), Err(CertifyError::Malformed(_))));
    let not_a_csr = material().anchors_pem;
    let e = ca.certify(&not_a_csr, &who, NOW).expect_err("a certificate");
    assert!(e.to_string().contains("\"CERTIFICATE\""), "{e}");

    // Flip a bit of the signature: the request no longer proves possession of its key.
    let mut der = ders(&good).remove(0);
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem_encode("CERTIFICATE REQUEST", &der);
    let e = ca.certify(&tampered, &who, NOW).expect_err("bad signature");
    assert!(matches!(e, CertifyError::BadSignature(_)), "{e}");
    assert_eq!(e.reason(), "bad_signature");
}

#[test]
fn material_is_checked_as_a_whole() {
    let a = material();
    let b = material();
    ca(&a);
    let cases: [(Material, &str); 6] = [
        (Material { anchors_pem: String::new(), ..a.clone() }, "no CERTIFICATE block"),
        (Material { anchors_pem: b.anchors_pem.clone(), ..a.clone() }, "does not chain to any trust anchor"),
        (Material { issuer_key_pem: b.issuer_key_pem.clone(), ..a.clone() }, "does not belong to the issuer"),
        (Material { issuer_key_pem: "nope".into(), ..a.clone() }, "issuer key"),
        (Material { issuer_pem: String::new(), ..a.clone() }, "issuer certificate: no CERTIFICATE"),
        (Material { issuer_pem: a.issuer_pem.replace("MII", "MIX"), ..a.clone() }, "issuer certificate"),
    ];
    for (m, needle) in cases {
        let e = Ca::load(&m, DEFAULT_TTL, NOW).expect_err(needle).to_string();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    let e = Ca::load(&a, DEFAULT_TTL, NOW + 400 * 86_400).expect_err("expired").to_string();
    assert!(e.contains("expired") && e.contains("issue a new one"), "{e}");

    // A leaf is not a CA: it cannot be the issuer.
    let ca_a = ca(&a);
    let who = id("x", "y");
    let key = KeyPair::generate().expect("key");
    let leaf = ca_a.certify(&csr_for(vec![uri(&who.to_string())], &key), &who, NOW).expect("leaf");
    let not_ca = Material { issuer_pem: leaf.chain_pem, issuer_key_pem: key.serialize_pem(), ..a.clone() };
    let e = Ca::load(&not_ca, DEFAULT_TTL, NOW).expect_err("leaf as issuer").to_string();
    assert!(e.contains("is not a CA"), "{e}");
}

#[test]
fn rotation_adds_an_anchor_then_switches_the_issuer() {
    let a = material();
    let ca_a = ca(&a);
    let who = id("shop", "orders");
    let old_leaf = ca_a.certify(&csr(&who), &who, NOW).expect("leaf under A");

    // Step 1: both anchors, issuer still A.
    let b = material();
    let both = format!("{}{}", a.anchors_pem, b.anchors_pem);
    let step1 = Ca::load(&Material { anchors_pem: both.clone(), ..a.clone() }, DEFAULT_TTL, NOW).expect("step 1");
    assert_eq!(step1.anchors_pem().len(), 2);
    // Step 2: the issuer under B; leaves from A and from B both verify against the bundle.
    let step2 = Ca::load(&Material { anchors_pem: both.clone(), ..b.clone() }, DEFAULT_TTL, NOW).expect("step 2");
    let new_leaf = step2.certify(&csr(&who), &who, NOW).expect("leaf under B");
    verify(&new_leaf.chain_pem, &both, NOW + 10).expect("new leaf");
    verify(&old_leaf.chain_pem, &both, NOW + 10).expect("old leaf still trusted");
    verify(&new_leaf.chain_pem, &a.anchors_pem, NOW + 10).expect_err("not under A alone");
    // Switching the issuer before adding its anchor is refused.
    assert!(matches!(
        Ca::load(&Material { anchors_pem: a.anchors_pem.clone(), ..b.clone() }, DEFAULT_TTL, NOW),
        Err(CaError::Untrusted { .. })
    ));
    // Step 3: the old anchor removed.
    let step3 = Ca::load(&b, DEFAULT_TTL, NOW).expect("step 3");
    assert_eq!(step3.earliest_anchor_not_after(), NOW + GENERATED_ANCHOR_DAYS * 86_400);
}

#[test]
fn the_serving_certificate_has_the_control_planes_id_and_its_names() {
    let m = material();
    let ca = ca(&m);
    let own = id("neutrino-system", "neutrino-control-plane");
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "cp.neutrino-system.svc".to_string()];
    let cert = ca.issue_server(&own, &names, NOW).expect("serving cert");
    let (_, leaf) = X509Certificate::from_der(&cert.chain_der[0]).expect("x509");
    let san = leaf.subject_alternative_name().expect("ext").expect("san");
    assert_eq!(
        san.value.general_names,
        vec![
            GeneralName::URI("spiffe://cluster.local/ns/neutrino-system/sa/neutrino-control-plane"),
            GeneralName::DNSName("localhost"),
            GeneralName::IPAddress(&[127, 0, 0, 1]),
            GeneralName::DNSName("cp.neutrino-system.svc"),
        ]
    );
    assert_eq!(cert.chain_der.len(), 2);
}

#[test]
fn the_serving_certificate_outlives_very_short_leaf_ttls() {
    // With `--cert-ttl 3s` the serving certificate used to live 3 s too, and lapsed between
    // two runs of the CA task: every proxy was cut off from the control plane.
    let m = material();
    let ca = Ca::load(&m, Duration::from_secs(3), NOW).expect("ca");
    let own = id("neutrino-system", "neutrino-control-plane");
    let cert = ca.issue_server(&own, &["localhost".to_string()], NOW).expect("serving cert");
    assert_eq!(cert.not_after_unix - NOW, SERVING_MIN_TTL.as_secs() as i64);
    let web = id("shop", "web");
    let leaf = ca.certify(&csr(&web), &web, NOW).expect("leaf");
    assert_eq!(leaf.not_after_unix - NOW, 3, "proxies' leaves keep --cert-ttl");
}
