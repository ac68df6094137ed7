//! Real TLS 1.3 handshakes over in-memory pipes between configs built by `MeshTls`,
//! with certificates from throwaway CAs made with rcgen.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const TD: &str = "cluster.local";

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca { issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca") }
    }

    fn anchor(&self) -> String {
        self.issuer.pem()
    }

    /// A chain (PEM) and key for `id`.
    fn leaf(&self, id: &str) -> (String, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names = vec![SanType::URI(id.try_into().expect("ia5"))];
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer).expect("leaf");
        (cert.pem(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).expect("id")
}

/// A proxy identity trusting `anchors`, holding a leaf from `ca`.
fn proxy(who: &SpiffeId, anchors: &[String], ca: &Ca) -> MeshTls {
    let provider = crate::identity::provider();
    let trust = Arc::new(Trust::new(TD, anchors, Arc::clone(&provider)).expect("trust"));
    let creds = Arc::new(Credentials::default());
    let (chain, key) = ca.leaf(&who.to_string());
    creds.install(who, &chain, key, &provider).expect("install");
    MeshTls::new(who.clone(), trust, creds).expect("tls")
}

/// Client `c` calls server `s` expecting `expect`; the server's view of the caller, or
/// the first side's error.
async fn handshake(c: &MeshTls, s: &MeshTls, expect: &str) -> Result<Option<Arc<str>>, String> {
    let (ci, si) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(c.client_config(expect, Alpn::H2));
    let acceptor = tokio_rustls::TlsAcceptor::from(s.server_config());
    let name = MeshTls::peer_server_name(expect).map_err(|e| e.to_string())?;
    let client = async move {
        let mut t = connector.connect(name, ci).await.map_err(|e| format!("client: {e}"))?;
        t.write_all(b"ping").await.map_err(|e| format!("client write: {e}"))?;
        t.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(t)
    };
    let server = async move {
        let mut t = acceptor.accept(si).await.map_err(|e| format!("server: {e}"))?;
        let mut buf = [0u8; 4];
        t.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
        assert_eq!(&buf, b"ping");
        Ok::<_, String>(peer_identity(t.get_ref().1.peer_certificates()))
    };
    let (c, s) = tokio::join!(client, server);
    let _client = c?;
    s
}

#[tokio::test]
async fn mutual_tls_binds_both_spiffe_ids() {
    let ca = Ca::new("anchor");
    let (a, b) = (id("shop", "web"), id("shop", "orders"));
    let (pa, pb) = (proxy(&a, &[ca.anchor()], &ca), proxy(&b, &[ca.anchor()], &ca));
    let caller = handshake(&pa, &pb, &b.to_string()).await.expect("handshake");
    assert_eq!(caller.as_deref(), Some(a.to_string().as_str()), "the server sees the caller's verified id");
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = Ca::new("anchor");
    let (a, b) = (id("shop", "web"), id("shop", "orders"));
    let (pa, pb) = (proxy(&a, &[ca.anchor()], &ca), proxy(&b, &[ca.anchor()], &ca));
    let err = handshake(&pa, &pb, "spiffe://cluster.local/ns/shop/sa/payments").await.expect_err("wrong id");
    assert!(err.contains("expected spiffe://cluster.local/ns/shop/sa/payments"), "{err}");
}

#[tokio::test]
async fn peers_from_another_ca_are_refused_both_ways() {
    let (ours, theirs) = (Ca::new("ours"), Ca::new("theirs"));
    let (a, b) = (id("shop", "web"), id("shop", "orders"));
    let good = proxy(&b, &[ours.anchor()], &ours);
    let stranger = proxy(&a, &[theirs.anchor(), ours.anchor()], &theirs);
    // A caller holding another CA's certificate.
    assert!(handshake(&stranger, &good, &b.to_string()).await.is_err());
    // A server holding another CA's certificate.
    let client = proxy(&a, &[ours.anchor()], &ours);
    let fake_b = proxy(&b, &[ours.anchor()], &theirs);
    let err = handshake(&client, &fake_b, &b.to_string()).await.expect_err("untrusted server");
    assert!(err.contains("client"), "{err}");
}

#[tokio::test]
async fn anchors_rotate_in_place_with_an_overlap() {
    let (old, new) = (Ca::new("old"), Ca::new("new"));
    let (a, b) = (id("shop", "web"), id("shop", "orders"));
    let pa = proxy(&a, &[old.anchor()], &old);
    let pb = proxy(&b, &[old.anchor()], &old);
    // Step 1: both anchors trusted everywhere; certificates from either work.
    for p in [&pa, &pb] {
        assert!(p.trust.replace(&[old.anchor(), new.anchor()]).expect("valid"));
    }
    let (chain, key) = new.leaf(&b.to_string());
    pb.credentials.install(&b, &chain, key, &pb.provider).expect("install");
    handshake(&pa, &pb, &b.to_string()).await.expect("old caller, new server");
    // Step 2: the old anchor goes; a peer still holding an old certificate is refused.
    assert!(pb.trust.replace(&[new.anchor()]).expect("valid"));
    assert!(handshake(&pa, &pb, &b.to_string()).await.is_err(), "old caller certificate after removal");
    let (chain, key) = new.leaf(&a.to_string());
    pa.credentials.install(&a, &chain, key, &pa.provider).expect("install");
    handshake(&pa, &pb, &b.to_string()).await.expect("both renewed");
    // A bad bundle changes nothing.
    assert!(pb.trust.replace(&["not a certificate".into()]).is_err());
    handshake(&pa, &pb, &b.to_string()).await.expect("last good anchors kept");
}

#[test]
fn a_chain_for_another_identity_is_not_installed() {
    let ca = Ca::new("anchor");
    let creds = Credentials::default();
    let (chain, key) = ca.leaf("spiffe://cluster.local/ns/shop/sa/other");
    let err = creds.install(&id("shop", "web"), &chain, key, &crate::identity::provider()).expect_err("wrong id");
    assert!(err.to_string().contains("names Some(\"spiffe://cluster.local/ns/shop/sa/other\")"), "{err}");
    assert!(creds.current().is_none());
}

#[test]
fn client_hello_server_names_are_read_from_the_first_bytes() {
    let ca = Ca::new("anchor");
    let a = id("shop", "web");
    let pa = proxy(&a, &[ca.anchor()], &ca);
    let name = MeshTls::peer_server_name("spiffe://cluster.local/ns/shop/sa/orders").expect("name");
    let mut conn =
        rustls::ClientConnection::new(pa.client_config("spiffe://cluster.local/ns/shop/sa/orders", Alpn::H2), name)
            .expect("conn");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("hello");
    assert_eq!(hello_server_name(&hello), Some("orders.shop.id.neutrino.mesh".to_string()));
    assert_eq!(hello_server_name(&hello[..hello.len() / 2]), None, "a partial hello is not enough");
    assert_eq!(hello_server_name(b"GET / HTTP/1.1\r\n"), None);
}
