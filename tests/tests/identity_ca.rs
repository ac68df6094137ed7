//! The mesh CA end to end (issue 7): the real control plane with a local CA (`--ca-dir`)
//! and bootstrap tokens, or Kubernetes TokenReview against the fake API server, called
//! over TLS on its 15012-style port by a tonic client that verifies the server against
//! the generated anchors and the name `localhost`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use neutrino_proto::discovery_client::DiscoveryClient;
use neutrino_proto::identity_client::IdentityClient;
use neutrino_proto::{CertifyRequest, CertifyResponse, DiscoveryRequest, Node, resource::Body, type_url};
use neutrino_tests::kube_api::FakeApi;
use neutrino_tests::*;
use serde_json::json;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::prelude::*;

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";

struct Cp {
    proc: Proc,
    grpc: u16,
    tls: u16,
    admin: u16,
    ca_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _mesh: MeshFile,
}

impl Cp {
    /// A control plane with `--ca-dir` (generated on start) and the given extra flags/env.
    fn start(extra: &[String], env: &[(&str, &str)]) -> Cp {
        let dir = tempfile::tempdir().unwrap();
        let mesh = MeshFile::new(&mesh_yaml(1, &|_| 1000));
        let ca_dir = dir.path().join("ca");
        let (grpc, tls, admin) = (free_port(), free_port(), free_port());
        let mut args = vec![
            "--mesh-file".to_string(),
            mesh.path().display().to_string(),
            format!("--grpc-addr=127.0.0.1:{grpc}"),
            format!("--admin-addr=127.0.0.1:{admin}"),
            format!("--tls-grpc-addr=127.0.0.1:{tls}"),
            format!("--ca-dir={}", ca_dir.display()),
            "--ca-reload-secs=1".into(),
        ];
        args.extend(extra.iter().cloned());
        let proc = Proc::spawn_env("neutrino-control-plane", &args, env);
        Cp { proc, grpc, tls, admin, ca_dir, _dir: dir, _mesh: mesh }
    }

    async fn wait_ready(&self) {
        wait_for("control plane /ready", Duration::from_secs(20), || async {
            let (code, body) = get(self.admin, "/ready").await?;
            anyhow::ensure!(code == 200, "{code}: {body}");
            Ok(())
        })
        .await
    }

    fn anchors(&self) -> String {
        std::fs::read_to_string(self.ca_dir.join("anchors.pem")).unwrap()
    }

    /// A TLS channel verifying the server against the CA's anchors as `localhost`.
    async fn tls_channel(&self) -> Channel {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.anchors())).domain_name("localhost");
        let endpoint =
            Endpoint::from_shared(format!("https://127.0.0.1:{}", self.tls)).unwrap().tls_config(tls).unwrap();
        wait_for("a TLS connection to the control plane", Duration::from_secs(10), || {
            let endpoint = endpoint.clone();
            async move { Ok(endpoint.connect().await?) }
        })
        .await
    }

    async fn metric(&self, name: &str, labels: &str) -> f64 {
        let (_, text) = get(self.admin, "/metrics").await.unwrap();
        metric(&text, name, labels).unwrap_or(0.0)
    }
}

fn csr_for(id: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn certify(channel: &Channel, token: &str, csr_pem: String) -> Result<CertifyResponse, tonic::Status> {
    let mut client = IdentityClient::new(channel.clone());
    client.certify(CertifyRequest { token: token.into(), csr_pem }).await.map(|r| r.into_inner())
}

fn leaf_uris(chain_pem: &str) -> (Vec<String>, usize) {
    let pems: Vec<Pem> = Pem::iter_from_buffer(chain_pem.as_bytes()).map(|p| p.unwrap()).collect();
    let cert = pems[0].parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris = san.value.general_names.iter().map(|n| n.to_string()).collect();
    (uris, pems.len())
}

/// Replaces a file at once (write, then rename over), as a Secret update swaps its files.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_tokens(dir: &Path) -> String {
    let path = dir.join("tokens");
    std::fs::write(&path, "# local tokens\norders-token-1 shop/orders\npayments-token-1 shop/payments\n").unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn certify_over_tls_with_bootstrap_tokens_and_the_trust_bundle_on_discovery() {
    let tokens_dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tokens_dir.path());
    let cp = Cp::start(&[format!("--bootstrap-tokens={tokens}")], &[]);
    cp.wait_ready().await;
    let channel = cp.tls_channel().await;

    // A valid token and a CSR for its own identity: a chain with exactly that id.
    let issued = certify(&channel, "orders-token-1", csr_for(ORDERS)).await.unwrap();
    let (uris, len) = leaf_uris(&issued.certificate_chain_pem);
    assert_eq!(uris, vec![format!("URI({ORDERS})")]);
    assert_eq!(len, 2, "leaf and issuer");
    assert_eq!(issued.trust_anchors_pem.len(), 1);
    assert_eq!(issued.trust_anchors_pem[0].trim(), cp.anchors().trim());
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let life = issued.not_after_ms.saturating_sub(now_ms);
    assert!((86_300_000..=86_401_000).contains(&life), "24 h by default, got {life} ms");

    // Another service account's token for the orders identity: refused, naming both.
    let denied = certify(&channel, "payments-token-1", csr_for(ORDERS)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(ORDERS) && denied.message().contains(PAYMENTS), "{}", denied.message());

    let unknown = certify(&channel, "no-such-token", csr_for(ORDERS)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    assert!(unknown.message().contains("bootstrap token file"), "{}", unknown.message());

    let bad = certify(&channel, "orders-token-1", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n".into()).await;
    let bad = bad.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");

    // Discovery over the same TLS port delivers the TrustBundle.
    let mut discovery = DiscoveryClient::new(channel.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node { id: "tls-client".into(), ..Default::default() }),
        type_url: type_url::TRUST_BUNDLE.into(),
        subscribe: vec!["*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = discovery.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let response = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(response.type_url, type_url::TRUST_BUNDLE);
    assert_eq!(response.resources.len(), 1);
    assert_eq!(response.resources[0].name, "mesh");
    match &response.resources[0].body {
        Some(Body::TrustBundle(b)) => {
            assert_eq!(b.trust_domain, "cluster.local");
            assert_eq!(b.anchors_pem, issued.trust_anchors_pem);
        }
        other => panic!("not a TrustBundle: {other:?}"),
    }

    // Plaintext to the TLS port fails; Identity is never served on the plaintext port.
    let plain = async {
        let mut c = IdentityClient::connect(format!("http://127.0.0.1:{}", cp.tls)).await?;
        c.certify(CertifyRequest::default()).await?;
        anyhow::Ok(())
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), plain).await.unwrap().is_err(), "plaintext on the TLS port");
    let mut on_plain_port = IdentityClient::connect(format!("http://127.0.0.1:{}", cp.grpc)).await.unwrap();
    let refused = on_plain_port.certify(CertifyRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");

    assert_eq!(cp.metric("neutrino_cp_certificates_issued_total", "").await, 1.0);
    assert_eq!(cp.metric("neutrino_cp_certify_failures_total", "reason=\"identity_mismatch\"").await, 1.0);
    assert_eq!(cp.metric("neutrino_cp_certify_failures_total", "reason=\"unauthenticated\"").await, 1.0);
    let expiry = cp.metric("neutrino_cp_issuer_expiry_timestamp_seconds", "").await;
    assert!(expiry > (now_ms / 1000 + 300 * 86_400) as f64, "a generated issuer lives a year: {expiry}");
    let dump = get_json(cp.admin, "/config_dump").await.unwrap();
    assert_eq!(dump["identity"]["issuer_not_after"].as_f64(), Some(expiry), "{dump}");
    assert!(dump["resources"]["TrustBundle"]["mesh"].is_string(), "{dump}");
}

#[tokio::test]
async fn an_invalid_ca_change_is_refused_and_a_new_anchor_is_served() {
    let tokens_dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(tokens_dir.path());
    let cp = Cp::start(&[format!("--bootstrap-tokens={tokens}")], &[]);
    cp.wait_ready().await;
    let channel = cp.tls_channel().await;
    let first = certify(&channel, "orders-token-1", csr_for(ORDERS)).await.unwrap();

    // A key that is not the issuer's: refused, the CA keeps signing.
    let key = cp.ca_dir.join("issuer-key.pem");
    let good_key = std::fs::read_to_string(&key).unwrap();
    write_atomic(&key, &rcgen::KeyPair::generate().unwrap().serialize_pem());
    wait_for("the reload error metric", Duration::from_secs(10), || async {
        let n = cp.metric("neutrino_cp_ca_reload_errors_total", "").await;
        anyhow::ensure!(n >= 1.0, "{n}");
        Ok(())
    })
    .await;
    certify(&channel, "orders-token-1", csr_for(ORDERS)).await.unwrap();
    assert!(cp.proc.logs().contains("does not belong to the issuer"), "{}", cp.proc.logs());

    // Step 1 of a rotation: a second anchor. The TrustBundle grows to two.
    write_atomic(&key, &good_key);
    let other = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let new_anchor = params.self_signed(&other).unwrap().pem();
    write_atomic(&cp.ca_dir.join("anchors.pem"), &format!("{}{new_anchor}", cp.anchors()));
    wait_for("the new anchor in Certify answers", Duration::from_secs(10), || async {
        let r = certify(&channel, "orders-token-1", csr_for(ORDERS)).await?;
        anyhow::ensure!(r.trust_anchors_pem.len() == 2, "{} anchors", r.trust_anchors_pem.len());
        Ok(())
    })
    .await;
    assert!(cp.metric("neutrino_cp_ca_reloads_total", "").await >= 1.0);
    let dump = get_json(cp.admin, "/config_dump").await.unwrap();
    assert_eq!(dump["identity"]["anchors"].as_array().map(Vec::len), Some(2), "{dump}");
    assert!(first.trust_anchors_pem.len() == 1);
}

#[tokio::test]
async fn kubernetes_token_review_proves_the_service_account() {
    let api = FakeApi::default();
    api.review_token(
        "projected-orders",
        json!({"authenticated": true, "user": {"username": "system:serviceaccount:shop:orders",
               "groups": ["system:serviceaccounts"]}, "audiences": ["neutrino"]}),
    );
    api.review_token(
        "a-person",
        json!({"authenticated": true, "user": {"username": "alice@example.com"}, "audiences": ["neutrino"]}),
    );
    let port = api.clone().serve().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = neutrino_tests::kube_api::kubeconfig(dir.path(), port).display().to_string();
    let cp = Cp::start(&[], &[("KUBECONFIG", kubeconfig.as_str())]);
    cp.wait_ready().await;
    let channel = cp.tls_channel().await;

    let issued = certify(&channel, "projected-orders", csr_for(ORDERS)).await.unwrap();
    assert_eq!(leaf_uris(&issued.certificate_chain_pem).0, vec![format!("URI({ORDERS})")]);
    let seen = api.reviews_seen();
    assert_eq!(seen[0]["token"], "projected-orders");
    assert_eq!(seen[0]["audiences"], json!(["neutrino"]));

    let denied = certify(&channel, "projected-orders", csr_for(PAYMENTS)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let rejected = certify(&channel, "forged", csr_for(ORDERS)).await.unwrap_err();
    assert_eq!(rejected.code(), Code::Unauthenticated, "{rejected:?}");
    assert!(rejected.message().contains("invalid bearer token"), "{}", rejected.message());
    let person = certify(&channel, "a-person", csr_for(ORDERS)).await.unwrap_err();
    assert_eq!(person.code(), Code::Unauthenticated, "{person:?}");
    assert!(person.message().contains("not a service account"), "{}", person.message());
}
