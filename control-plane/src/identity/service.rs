//! Identity step 3, the `Identity` gRPC service (served only on the TLS port 15012):
//! token -> service account -> SPIFFE id -> the CA signs the CSR for exactly that id.
//!
//! Each refusal maps to one status code, with a message saying what to check:
//! UNAUTHENTICATED (the token), PERMISSION_DENIED (the CSR asks for another identity),
//! INVALID_ARGUMENT (the CSR itself), UNAVAILABLE (Kubernetes or the CA cannot answer
//! now; retry). This module must not parse certificates or tokens itself (`ca.rs`,
//! `token.rs`), and must never log a token.

use std::sync::Arc;

use arc_swap::ArcSwap;
use neutrino_proto::identity_server::{Identity, IdentityServer};
use neutrino_proto::spiffe::SpiffeId;
use neutrino_proto::{CertifyRequest, CertifyResponse};
use tonic::{Code, Request, Response, Status};

use super::ca::{Ca, CertifyError};
use super::token::{TokenError, Validator};
use crate::metrics::{Metrics, ReasonLabel};

/// Why a Certify call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Token(TokenError),
    /// The token's subject is not a valid identity in this trust domain.
    Identity(String),
    Certify(CertifyError),
}

impl Failure {
    /// The gRPC code and the metric label.
    pub fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            Failure::Token(e) if e.is_unavailable() => (Code::Unavailable, "token_review_unavailable"),
            Failure::Token(_) => (Code::Unauthenticated, "unauthenticated"),
            Failure::Identity(_) => (Code::PermissionDenied, "invalid_identity"),
            Failure::Certify(e @ CertifyError::IdentityMismatch { .. }) => (Code::PermissionDenied, e.reason()),
            Failure::Certify(e @ CertifyError::Unavailable(_)) => (Code::Unavailable, e.reason()),
            Failure::Certify(e) => (Code::InvalidArgument, e.reason()),
        }
    }

    pub fn status(&self) -> Status {
        let message = match self {
            Failure::Token(e) => e.to_string(),
            Failure::Identity(e) => format!("the token's service account is not a valid mesh identity: {e}"),
            Failure::Certify(e) => e.to_string(),
        };
        Status::new(self.code_and_reason().0, message)
    }
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct IdentityService {
    ca: Arc<ArcSwap<Ca>>,
    validator: Arc<Validator>,
    trust_domain: String,
    metrics: Arc<Metrics>,
}

impl IdentityService {
    pub fn new(ca: Arc<ArcSwap<Ca>>, validator: Arc<Validator>, trust_domain: String, metrics: Arc<Metrics>) -> Self {
        IdentityService { ca, validator, trust_domain, metrics }
    }

    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    async fn certify_inner(&self, req: CertifyRequest) -> Result<(SpiffeId, CertifyResponse), Failure> {
        let subject = self.validator.validate(&req.token).await.map_err(Failure::Token)?;
        let id = SpiffeId::new(&self.trust_domain, &subject.namespace, &subject.service_account)
            .map_err(|e| Failure::Identity(e.to_string()))?;
        let ca = self.ca.load_full();
        let leaf = ca.certify(&req.csr_pem, &id, now_unix()).map_err(Failure::Certify)?;
        let response = CertifyResponse {
            certificate_chain_pem: leaf.chain_pem,
            not_after_ms: u64::try_from(leaf.not_after_unix).unwrap_or(0).saturating_mul(1000),
            trust_anchors_pem: ca.anchors_pem(),
        };
        Ok((id, response))
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        match self.certify_inner(request.into_inner()).await {
            Ok((id, response)) => {
                self.metrics.certificates_issued.inc();
                tracing::info!(%peer, %id, not_after_ms = response.not_after_ms, "identity: certificate issued");
                Ok(Response::new(response))
            }
            Err(failure) => {
                let status = failure.status();
                let (code, reason) = failure.code_and_reason();
                self.metrics.certify_failures.get_or_create(&ReasonLabel { reason }).inc();
                tracing::info!(%peer, ?code, "identity: certify refused: {}", status.message());
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_code_and_a_message_that_says_what_to_check() {
        let cases = [
            (Failure::Token(TokenError::Missing), Code::Unauthenticated, "CertifyRequest.token"),
            (Failure::Token(TokenError::Unknown { file: "/t".into() }), Code::Unauthenticated, "/t"),
            (Failure::Token(TokenError::Rejected("expired".into())), Code::Unauthenticated, "--token-audience"),
            (Failure::Token(TokenError::Unavailable("timeout".into())), Code::Unavailable, "tokenreviews"),
            (Failure::Identity("bad".into()), Code::PermissionDenied, "not a valid mesh identity"),
            (
                Failure::Certify(CertifyError::IdentityMismatch {
                    requested: "spiffe://a".into(),
                    allowed: "spiffe://b".into(),
                }),
                Code::PermissionDenied,
                "spiffe://a",
            ),
            (Failure::Certify(CertifyError::Malformed("x".into())), Code::InvalidArgument, "CERTIFICATE REQUEST"),
            (Failure::Certify(CertifyError::BadSignature("x".into())), Code::InvalidArgument, "signature"),
            (Failure::Certify(CertifyError::UnsupportedKey("rsa".into())), Code::InvalidArgument, "P-256"),
            (Failure::Certify(CertifyError::Unavailable("expired".into())), Code::Unavailable, "expired"),
        ];
        for (failure, code, needle) in cases {
            let status = failure.status();
            assert_eq!(status.code(), code, "{failure:?}");
            assert!(status.message().contains(needle), "{failure:?}: {}", status.message());
        }
    }
}
