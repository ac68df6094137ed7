//! Identity step 1, authentication: which service account a caller's token proves.
//!
//! A closed set of validators ([`Validator`]): a local bootstrap-token file (local mode,
//! `--bootstrap-tokens`: one `<token> <namespace>/<service-account>` per line, `#`
//! comments, re-read when it changes) or the Kubernetes TokenReview API
//! (authentication.k8s.io/v1, audiences `--token-audience`). The answer is only a
//! [`Subject`]; this module must not sign anything or decide what the subject may ask
//! for (that is `service.rs` and `ca.rs`), and must never log a token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use thiserror::Error;
use tokio::sync::OnceCell;

/// A TokenReview that takes longer is reported as unavailable.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// The default audience of the projected tokens the injector mounts.
pub const DEFAULT_AUDIENCE: &str = "neutrino";

/// What a token proves: a service account in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub namespace: String,
    pub service_account: String,
}

/// Why a token proves nothing (UNAUTHENTICATED), or cannot be checked now (UNAVAILABLE).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    #[error("no token; send the pod's projected service-account token (or a bootstrap token) in CertifyRequest.token")]
    Missing,
    #[error("the token is not in the bootstrap token file {file}; add a line `<token> <namespace>/<service-account>`")]
    Unknown { file: String },
    #[error(
        "Kubernetes did not authenticate the token ({0}); send the pod's projected service-account token with the \
         audience the control plane expects (--token-audience), and check it has not expired"
    )]
    Rejected(String),
    #[error("the token authenticates {0:?}, not a service account (system:serviceaccount:<namespace>:<name>)")]
    NotServiceAccount(String),
    #[error("checking the token with Kubernetes failed: {0}; check the control plane can create tokenreviews")]
    Unavailable(String),
}

impl TokenError {
    /// True when the token could not be checked (as opposed to being refused).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenError::Unavailable(_))
    }
}

/// A line of the bootstrap file that is not `<token> <namespace>/<service-account>`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BootstrapError {
    #[error("reading bootstrap tokens {file}: {reason}")]
    Read { file: String, reason: String },
    #[error(
        "{file}:{line}: {reason}; each line is `<token> <namespace>/<service-account>` (e.g. `s3cret default/orders`), \
         `#` starts a comment"
    )]
    Line { file: String, line: usize, reason: String },
}

/// Parses a bootstrap token file (pure): token -> subject.
pub fn parse_bootstrap(file: &Path, text: &str) -> Result<HashMap<String, Subject>, BootstrapError> {
    let mut out = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |reason: String| BootstrapError::Line { file: file.display().to_string(), line: i + 1, reason };
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [token, who] = fields.as_slice() else {
            return Err(err(format!("expected 2 fields, found {}", fields.len())));
        };
        let Some((ns, sa)) = who.split_once('/') else {
            return Err(err(format!("{who:?} is not <namespace>/<service-account>")));
        };
        // The same rules the SPIFFE id applies.
        neutrino_proto::spiffe::SpiffeId::new("cluster.local", ns, sa).map_err(|e| err(e.to_string()))?;
        if token.len() < 8 {
            return Err(err("the token is shorter than 8 characters".into()));
        }
        let subject = Subject { namespace: ns.to_string(), service_account: sa.to_string() };
        if out.insert(token.to_string(), subject).is_some() {
            return Err(err("this token is listed twice".into()));
        }
    }
    Ok(out)
}

/// `system:serviceaccount:<ns>:<sa>` -> the subject (pure).
pub fn service_account_of(username: &str) -> Result<Subject, TokenError> {
    let not = || TokenError::NotServiceAccount(username.to_string());
    let rest = username.strip_prefix("system:serviceaccount:").ok_or_else(not)?;
    let (ns, sa) = rest.split_once(':').ok_or_else(not)?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return Err(not());
    }
    Ok(Subject { namespace: ns.to_string(), service_account: sa.to_string() })
}

/// How tokens are checked, from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSettings {
    /// `--bootstrap-tokens FILE`.
    Bootstrap(PathBuf),
    /// Kubernetes TokenReview with these audiences (`--token-audience`).
    TokenReview { audiences: Vec<String> },
}

/// The bootstrap file as last read, and the stamp that tells when to read it again.
#[derive(Debug, Default)]
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    tokens: HashMap<String, Subject>,
}

#[derive(Debug)]
pub struct BootstrapTokens {
    path: PathBuf,
    loaded: ArcSwap<Loaded>,
}

impl BootstrapTokens {
    /// Reads the file now: a missing or broken file at start is an error.
    pub fn open(path: PathBuf) -> Result<BootstrapTokens, BootstrapError> {
        let t = BootstrapTokens { path, loaded: ArcSwap::from_pointee(Loaded::default()) };
        t.refresh()?;
        Ok(t)
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        std::fs::metadata(&self.path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
    }

    /// Re-reads the file if its modification time or size changed. A broken file is
    /// refused (and the last good tokens kept).
    fn refresh(&self) -> Result<(), BootstrapError> {
        let stamp = self.stamp();
        if stamp.is_some() && stamp == self.loaded.load().stamp {
            return Ok(());
        }
        let file = self.path.display().to_string();
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| BootstrapError::Read { file: file.clone(), reason: e.to_string() })?;
        let tokens = match parse_bootstrap(&self.path, &text) {
            Ok(t) => t,
            Err(e) => {
                // Remember the broken content's stamp so it is reported once, not per call.
                let kept = self.loaded.load().tokens.clone();
                self.loaded.store(Arc::new(Loaded { stamp, tokens: kept }));
                return Err(e);
            }
        };
        tracing::info!(file, tokens = tokens.len(), "identity: bootstrap tokens loaded");
        self.loaded.store(Arc::new(Loaded { stamp, tokens }));
        Ok(())
    }

    pub fn validate(&self, token: &str) -> Result<Subject, TokenError> {
        if let Err(e) = self.refresh() {
            tracing::error!("identity: {e}; keeping the tokens read before");
        }
        let loaded = self.loaded.load();
        loaded.tokens.get(token).cloned().ok_or_else(|| TokenError::Unknown { file: self.path.display().to_string() })
    }
}

/// Kubernetes TokenReview; the client is made on first use (KUBECONFIG, else in-cluster).
pub struct TokenReviewer {
    audiences: Vec<String>,
    client: OnceCell<Client>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer").field("audiences", &self.audiences).finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(audiences: Vec<String>) -> TokenReviewer {
        TokenReviewer { audiences, client: OnceCell::new() }
    }

    /// With a given client (tests).
    pub fn with_client(audiences: Vec<String>, client: Client) -> TokenReviewer {
        TokenReviewer { audiences, client: OnceCell::new_with(Some(client)) }
    }

    async fn client(&self) -> Result<Client, TokenError> {
        self.client
            .get_or_try_init(|| async { Client::try_default().await })
            .await
            .cloned()
            .map_err(|e| TokenError::Unavailable(format!("no Kubernetes client configuration: {e}")))
    }

    pub async fn validate(&self, token: &str) -> Result<Subject, TokenError> {
        let api: Api<TokenReview> = Api::all(self.client().await?);
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(self.audiences.clone()) },
            ..Default::default()
        };
        let answer = tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| TokenError::Unavailable(format!("no answer within {} s", REVIEW_TIMEOUT.as_secs())))?
            .map_err(|e| TokenError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".to_string());
            return Err(TokenError::Rejected(why));
        }
        // The API server lists the requested audiences the token is valid for.
        if let Some(valid) = status.audiences.as_ref().filter(|a| !a.is_empty())
            && !valid.iter().any(|a| self.audiences.contains(a))
        {
            return Err(TokenError::Rejected(format!(
                "the token is for audiences {valid:?}, not {:?}",
                self.audiences
            )));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account_of(&user)
    }
}

/// The configured validator.
#[derive(Debug)]
pub enum Validator {
    Bootstrap(BootstrapTokens),
    Kube(TokenReviewer),
}

impl Validator {
    pub fn new(settings: &TokenSettings) -> Result<Validator, BootstrapError> {
        Ok(match settings {
            TokenSettings::Bootstrap(path) => Validator::Bootstrap(BootstrapTokens::open(path.clone())?),
            TokenSettings::TokenReview { audiences } => Validator::Kube(TokenReviewer::new(audiences.clone())),
        })
    }

    pub async fn validate(&self, token: &str) -> Result<Subject, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        match self {
            Validator::Bootstrap(b) => b.validate(token),
            Validator::Kube(k) => k.validate(token).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_file_lines_comments_and_subjects() {
        let text =
            "# local mesh\n\ntoken-orders-1 shop/orders   # the orders service\n  tok-client-22 default/client\n";
        let tokens = parse_bootstrap(Path::new("t.txt"), text).expect("valid");
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens["token-orders-1"], Subject { namespace: "shop".into(), service_account: "orders".into() });
        assert_eq!(tokens["tok-client-22"].service_account, "client");
    }

    #[test]
    fn bootstrap_errors_name_file_line_and_the_fix() {
        for (text, line, needle) in [
            ("ok-token-1 a/b\njust-one-field\n", 2, "expected 2 fields"),
            ("ok-token-1 shop-orders\n", 1, "is not <namespace>/<service-account>"),
            ("ok-token-1 Shop/orders\n", 1, "namespace"),
            ("short a/b\n", 1, "shorter than 8"),
            ("ok-token-1 a/b\nok-token-1 c/d\n", 2, "listed twice"),
            ("ok-token-1 a/b extra\n", 1, "expected 2 fields, found 3"),
        ] {
            let e = parse_bootstrap(Path::new("/etc/tokens"), text).expect_err(text).to_string();
            assert!(e.starts_with(&format!("/etc/tokens:{line}: ")), "{e}");
            assert!(e.contains(needle) && e.contains("<token> <namespace>/<service-account>"), "{e}");
        }
    }

    #[test]
    fn usernames_map_to_service_accounts_only() {
        assert_eq!(
            service_account_of("system:serviceaccount:shop:orders"),
            Ok(Subject { namespace: "shop".into(), service_account: "orders".into() })
        );
        for bad in ["alice", "system:serviceaccount:shop", "system:serviceaccount::x", "system:node:n1", ""] {
            let e = service_account_of(bad).expect_err(bad);
            assert!(matches!(e, TokenError::NotServiceAccount(_)), "{bad}");
        }
    }

    #[tokio::test]
    async fn bootstrap_validator_rereads_a_changed_file_and_keeps_the_last_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, "first-token default/a\n").expect("write");
        let v = Validator::new(&TokenSettings::Bootstrap(path.clone())).expect("valid file");
        assert_eq!(v.validate("first-token").await.expect("known").service_account, "a");
        let unknown = v.validate("second-token").await.expect_err("unknown");
        assert!(unknown.to_string().contains("not in the bootstrap token file"), "{unknown}");
        assert_eq!(v.validate("  ").await, Err(TokenError::Missing));

        // A longer file: its size changes even within one mtime tick.
        std::fs::write(&path, "first-token default/a\nsecond-token default/bb\n").expect("write");
        assert_eq!(v.validate("second-token").await.expect("re-read").service_account, "bb");
        std::fs::write(&path, "broken\n").expect("write");
        assert_eq!(v.validate("second-token").await.expect("last good kept").service_account, "bb");

        std::fs::write(&path, "x\n").expect("write");
        assert!(Validator::new(&TokenSettings::Bootstrap(path)).is_err(), "a broken file at start is an error");
        let missing = Validator::new(&TokenSettings::Bootstrap(dir.path().join("nope"))).expect_err("missing");
        assert!(missing.to_string().contains("reading bootstrap tokens"), "{missing}");
    }
}
