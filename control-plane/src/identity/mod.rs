//! Identity (issue 7): the mesh CA, the `Identity` service and TLS on port 15012.
//!
//! Steps: 1 `token.rs` (what a caller's token proves), 2 `ca.rs` (validate CA material,
//! sign leaves: pure), 3 `service.rs` (the gRPC service), 4 `tls.rs` (the TLS listener's
//! certificate and connections), and this module, the CA task: the single writer of
//! the current CA (`ArcSwap`), of the trust-bundle lane (one `TrustBundle` named
//! "mesh") and of the control plane's own serving certificate.
//!
//! The CA files are polled (`--ca-reload-secs`; Kubernetes swaps mounted Secrets through
//! symlinks, which inotify misses): a changed set that validates replaces the CA, an
//! invalid one is logged, counted and refused, and the last good set keeps signing.
//! This module must not authenticate callers or serve Discovery.

pub mod ca;
pub mod service;
pub mod tls;
pub mod token;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use neutrino_proto::spiffe::SpiffeId;
use neutrino_proto::{Resource, TrustBundle, resource::Body, type_url};
use thiserror::Error;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::translate::Snapshot;
use ca::{Ca, CaError, Material};

/// The resource name of the one TrustBundle.
pub const TRUST_BUNDLE_NAME: &str = "mesh";
/// The control plane's own identity, in its serving certificate.
pub const CONTROL_PLANE_NAMESPACE: &str = "neutrino-system";
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "neutrino-control-plane";
/// Default `--tls-names`.
pub const DEFAULT_TLS_NAMES: &str = "neutrino-control-plane.neutrino-system.svc,neutrino-control-plane.neutrino-system.svc.cluster.local,localhost,127.0.0.1";
/// The serving certificate is renewed after this share of its life (tenths: 70 %).
const RENEW_AT_TENTHS: i64 = 7;
/// File names in `--ca-dir` (and the keys mounted from the `neutrino-ca` Secret).
pub const ANCHORS_FILE: &str = "anchors.pem";
pub const ISSUER_FILE: &str = "issuer.pem";
pub const ISSUER_KEY_FILE: &str = "issuer-key.pem";

/// Where the CA material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `--trust-anchors`, `--issuer-cert`, `--issuer-key`.
    Files { anchors: PathBuf, issuer_cert: PathBuf, issuer_key: PathBuf },
    /// `--ca-dir`: the three files there, generated on first start (local mode).
    Dir(PathBuf),
}

impl CaSource {
    fn paths(&self) -> (PathBuf, PathBuf, PathBuf) {
        match self {
            CaSource::Files { anchors, issuer_cert, issuer_key } => {
                (anchors.clone(), issuer_cert.clone(), issuer_key.clone())
            }
            CaSource::Dir(d) => (d.join(ANCHORS_FILE), d.join(ISSUER_FILE), d.join(ISSUER_KEY_FILE)),
        }
    }
}

/// Identity is on when a CA is configured.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub source: CaSource,
    /// Leaf lifetime (`--cert-ttl`, default 24h).
    pub cert_ttl: Duration,
    /// How often the CA files are re-read (`--ca-reload-secs`, default 5).
    pub reload: Duration,
    pub tokens: token::TokenSettings,
    /// `--tls-grpc-addr` (default 0.0.0.0:15012).
    pub tls_addr: SocketAddr,
    /// DNS names and IPs in the serving certificate (`--tls-names`).
    pub tls_names: Vec<String>,
}

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("reading {path}: {source}; check the CA flags (--ca-dir, or --trust-anchors/--issuer-cert/--issuer-key)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {source}; --ca-dir must be a writable directory")]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "{dir} holds {present} but not {missing}; add the missing files, or remove them all to generate a new local CA"
    )]
    PartialDir { dir: PathBuf, present: String, missing: String },
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    #[error("bootstrap tokens: {0}")]
    Tokens(#[from] token::BootstrapError),
    #[error("TLS on 15012: {0}")]
    Tls(String),
}

/// Writes a fresh local CA into `dir` unless its three files exist (none may be half there).
pub fn ensure_dir(dir: &Path, trust_domain: &str, now: i64) -> Result<(), IdentityError> {
    let files = [ANCHORS_FILE, ISSUER_FILE, ISSUER_KEY_FILE];
    let (present, missing): (Vec<&str>, Vec<&str>) = files.iter().partition(|f| dir.join(f).exists());
    if missing.is_empty() {
        return Ok(());
    }
    if !present.is_empty() {
        return Err(IdentityError::PartialDir {
            dir: dir.to_path_buf(),
            present: present.join(", "),
            missing: missing.join(", "),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write { path: dir.to_path_buf(), source })?;
    let m = ca::generate(trust_domain, now, ca::GENERATED_ANCHOR_DAYS, ca::GENERATED_ISSUER_DAYS)?;
    for (name, text, private) in [
        (ANCHORS_FILE, &m.anchors_pem, false),
        (ISSUER_FILE, &m.issuer_pem, false),
        (ISSUER_KEY_FILE, &m.issuer_key_pem, true),
    ] {
        write_file(&dir.join(name), text, private)?;
    }
    tracing::info!(dir = %dir.display(), "identity: generated a local CA (anchor 10 years, issuer 1 year)");
    Ok(())
}

fn write_file(path: &Path, text: &str, private: bool) -> Result<(), IdentityError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| IdentityError::Write { path: path.to_path_buf(), source };
    let mode = if private { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// Reads the three files as they are now.
pub fn read_material(source: &CaSource) -> Result<Material, IdentityError> {
    let (a, i, k) = source.paths();
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|source| IdentityError::Read { path: p.clone(), source });
    Ok(Material { anchors_pem: read(&a)?, issuer_pem: read(&i)?, issuer_key_pem: read(&k)? })
}

/// What `/config_dump` shows about the CA.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IdentityStatus {
    pub trust_domain: String,
    pub issuer: String,
    pub issuer_not_after: i64,
    pub anchors: Vec<AnchorStatus>,
    pub cert_ttl_secs: u64,
    pub serving_cert_not_after: i64,
    /// The last refused reload, until a good one.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AnchorStatus {
    pub subject: String,
    pub not_after: i64,
}

/// Handles to a running identity: for the service, the TLS listener, the lane, admin.
#[derive(Debug, Clone)]
pub struct Started {
    pub ca: Arc<ArcSwap<Ca>>,
    pub validator: Arc<token::Validator>,
    pub resolver: Arc<tls::Resolver>,
    pub status: Arc<ArcSwap<IdentityStatus>>,
}

/// The trust-bundle lane without a CA: one empty publish, so a proxy subscribed to
/// TrustBundle learns there is none (as it did before identity existed). The sender
/// must be kept for as long as streams are served: a dropped sender reads as shutdown.
pub fn empty_lane() -> (watch::Sender<Arc<Snapshot>>, watch::Receiver<Arc<Snapshot>>) {
    watch::channel(Arc::new(Snapshot { generation: 1, ..Default::default() }))
}

/// The TrustBundle resource for `ca`.
pub fn trust_bundle(ca: &Ca, trust_domain: &str) -> Resource {
    let body = Body::TrustBundle(TrustBundle { trust_domain: trust_domain.to_string(), anchors_pem: ca.anchors_pem() });
    Resource::with_content_version(TRUST_BUNDLE_NAME.to_string(), body)
}

fn lane_types(ca: &Ca, trust_domain: &str) -> BTreeMap<&'static str, Arc<crate::translate::ResourceMap>> {
    let map = BTreeMap::from([(TRUST_BUNDLE_NAME.to_string(), Arc::new(trust_bundle(ca, trust_domain)))]);
    BTreeMap::from([(type_url::TRUST_BUNDLE, Arc::new(map))])
}

/// Loads the CA (generating it first with `--ca-dir`), the token validator and the
/// serving certificate, then starts the CA task. Errors here stop the control plane.
pub fn start(
    settings: &IdentitySettings,
    trust_domain: &str,
    metrics: Arc<Metrics>,
) -> Result<(Started, watch::Receiver<Arc<Snapshot>>), IdentityError> {
    let now = service::now_unix();
    if let CaSource::Dir(dir) = &settings.source {
        ensure_dir(dir, trust_domain, now)?;
    }
    let material = read_material(&settings.source)?;
    let loaded = Ca::load(&material, settings.cert_ttl, now)?;
    let validator = Arc::new(token::Validator::new(&settings.tokens)?);
    let own_id = SpiffeId::new(trust_domain, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT)
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    let resolver = Arc::new(tls::Resolver::default());
    let serving = loaded.issue_server(&own_id, &settings.tls_names, now)?;
    resolver.set(&serving).map_err(IdentityError::Tls)?;
    metrics.serving_cert_renewals.inc();

    let (lane_tx, lane_rx) = watch::channel(Arc::new(Snapshot {
        generation: 1,
        by_type: lane_types(&loaded, trust_domain),
        ..Default::default()
    }));
    let status = Arc::new(ArcSwap::from_pointee(IdentityStatus::default()));
    let task = CaTask {
        source: settings.source.clone(),
        ttl: settings.cert_ttl,
        trust_domain: trust_domain.to_string(),
        names: settings.tls_names.clone(),
        own_id,
        ca: Arc::new(ArcSwap::from_pointee(loaded)),
        resolver: Arc::clone(&resolver),
        lane_tx,
        generation: 1,
        status: Arc::clone(&status),
        metrics,
        seen: material,
        serving_window: (serving.not_before_unix, serving.not_after_unix),
        last_error: None,
    };
    task.update_status();
    let started = Started { ca: Arc::clone(&task.ca), validator, resolver, status };
    tokio::spawn(task.run(settings.reload));
    Ok((started, lane_rx))
}

struct CaTask {
    source: CaSource,
    ttl: Duration,
    trust_domain: String,
    names: Vec<String>,
    own_id: SpiffeId,
    ca: Arc<ArcSwap<Ca>>,
    resolver: Arc<tls::Resolver>,
    lane_tx: watch::Sender<Arc<Snapshot>>,
    generation: u64,
    status: Arc<ArcSwap<IdentityStatus>>,
    metrics: Arc<Metrics>,
    /// The material last read (good or refused): only a change is looked at again.
    seen: Material,
    serving_window: (i64, i64),
    last_error: Option<String>,
}

/// When a certificate valid over `window` should be renewed.
pub fn renew_at(window: (i64, i64)) -> i64 {
    let life = (window.1 - window.0).max(0);
    window.0 + life / 10 * RENEW_AT_TENTHS
}

impl CaTask {
    async fn run(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.lane_tx.is_closed() && Arc::strong_count(&self.ca) == 1 {
                return;
            }
            self.reload();
            let now = service::now_unix();
            if now >= renew_at(self.serving_window) {
                self.renew_serving(now);
            }
        }
    }

    /// Re-reads the files; a changed set is validated and either replaces the CA or is refused.
    fn reload(&mut self) {
        let material = match read_material(&self.source) {
            Ok(m) => m,
            Err(e) => {
                // A file mid-swap, or removed: keep signing with what we have.
                self.refuse(e.to_string());
                return;
            }
        };
        if material == self.seen {
            return;
        }
        self.seen = material.clone();
        let now = service::now_unix();
        match Ca::load(&material, self.ttl, now) {
            Ok(next) => {
                let anchors_changed = next.anchors_pem() != self.ca.load().anchors_pem();
                tracing::info!(issuer = %next.issuer().subject, anchors = next.anchors().len(), "identity: CA reloaded");
                self.metrics.ca_reloads.inc();
                self.ca.store(Arc::new(next));
                self.last_error = None;
                if anchors_changed {
                    self.publish();
                }
                self.renew_serving(now);
                self.update_status();
            }
            Err(e) => {
                self.metrics.ca_reload_errors.inc();
                self.refuse(e.to_string());
            }
        }
    }

    fn refuse(&mut self, why: String) {
        if self.last_error.as_deref() != Some(why.as_str()) {
            tracing::error!("identity: refusing the changed CA material: {why}; the last good CA keeps signing");
            self.last_error = Some(why);
            self.update_status();
        }
    }

    fn publish(&mut self) {
        let ca = self.ca.load();
        let next = self.generation + 1;
        // The borrow must end before send_replace takes the write lock.
        let succeeded = Snapshot::succeed(&self.lane_tx.borrow(), next, lane_types(&ca, &self.trust_domain));
        if let Some(s) = succeeded {
            self.generation = next;
            self.lane_tx.send_replace(Arc::new(s));
        }
    }

    fn renew_serving(&mut self, now: i64) {
        let ca = self.ca.load();
        match ca.issue_server(&self.own_id, &self.names, now) {
            Ok(cert) => match self.resolver.set(&cert) {
                Ok(()) => {
                    self.serving_window = (cert.not_before_unix, cert.not_after_unix);
                    self.metrics.serving_cert_renewals.inc();
                    self.update_status();
                }
                Err(e) => tracing::error!("identity: installing the serving certificate: {e}"),
            },
            // Retried at the next tick.
            Err(e) => tracing::error!("identity: renewing the serving certificate: {e}"),
        }
    }

    fn update_status(&self) {
        let ca = self.ca.load();
        self.metrics.issuer_expiry.set(ca.issuer_not_after());
        self.metrics.anchor_expiry.set(ca.earliest_anchor_not_after());
        self.status.store(Arc::new(IdentityStatus {
            trust_domain: self.trust_domain.clone(),
            issuer: ca.issuer().subject.clone(),
            issuer_not_after: ca.issuer_not_after(),
            anchors: ca
                .anchors()
                .iter()
                .map(|a| AnchorStatus { subject: a.subject.clone(), not_after: a.not_after })
                .collect(),
            cert_ttl_secs: ca.ttl().as_secs(),
            serving_cert_not_after: self.serving_window.1,
            last_error: self.last_error.clone(),
        }));
    }
}

/// Parses `--cert-ttl`: a number with a unit, `s`, `m`, `h` or `d` (e.g. 24h, 30s, 90m).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{text:?} is not a duration such as 24h, 90m or 30s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d (e.g. 24h, 90m, 30s)")),
    };
    if secs == 0 {
        return Err(format!("{text:?}: a certificate lifetime must be longer than zero"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_ttl("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "24", "h", "1.5h", "0s", "-1h", "10y"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serving_cert_renews_at_seventy_percent() {
        assert_eq!(renew_at((1000, 2000)), 1700);
        assert_eq!(renew_at((0, 86_400)), 60_480);
    }

    #[test]
    fn ca_dir_is_generated_once_with_a_private_key_file_and_refuses_half_sets() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        ensure_dir(&ca_dir, "cluster.local", 1_700_000_000).expect("generate");
        let key = ca_dir.join(ISSUER_KEY_FILE);
        assert_eq!(std::fs::metadata(&key).expect("key").permissions().mode() & 0o777, 0o600);
        let m = read_material(&CaSource::Dir(ca_dir.clone())).expect("read");
        Ca::load(&m, ca::DEFAULT_TTL, 1_700_000_000).expect("generated material is valid");
        ensure_dir(&ca_dir, "cluster.local", 1_700_000_000).expect("kept");
        assert_eq!(read_material(&CaSource::Dir(ca_dir.clone())).expect("read"), m, "not regenerated");
        std::fs::remove_file(&key).expect("rm");
        let e = ensure_dir(&ca_dir, "cluster.local", 1_700_000_000).expect_err("half a set");
        assert!(e.to_string().contains("but not issuer-key.pem"), "{e}");
    }

    /// Polls `check` every 20 ms for up to 5 s.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        for _ in 0..250 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{what} did not happen within 5 s");
    }

    fn bundle_anchors(lane: &watch::Receiver<Arc<Snapshot>>) -> usize {
        let snap = lane.borrow();
        let Some(map) = snap.by_type.get(type_url::TRUST_BUNDLE) else { return 0 };
        match map.get(TRUST_BUNDLE_NAME).and_then(|r| r.body.as_ref()) {
            Some(Body::TrustBundle(b)) => b.anchors_pem.len(),
            _ => 0,
        }
    }

    #[tokio::test]
    async fn an_invalid_reload_keeps_the_last_good_ca_and_a_rotation_republishes_the_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "a-long-token default/a\n").expect("tokens");
        let settings = IdentitySettings {
            source: CaSource::Dir(dir.path().join("ca")),
            cert_ttl: ca::DEFAULT_TTL,
            reload: Duration::from_millis(100),
            tokens: token::TokenSettings::Bootstrap(tokens),
            tls_addr: "127.0.0.1:0".parse().expect("addr"),
            tls_names: vec!["localhost".into()],
        };
        let metrics = Arc::new(Metrics::default());
        let (started, lane) = start(&settings, "cluster.local", Arc::clone(&metrics)).expect("start");
        let generation = lane.borrow().generation;
        assert_eq!((generation, bundle_anchors(&lane)), (1, 1));
        let first = started.ca.load_full();
        let issuer_pem = first.material().issuer_pem.clone();

        // The issuer of another CA with this CA's key: refused, the first CA stays.
        let other = ca::generate("cluster.local", service::now_unix(), 10, 1).expect("other");
        let ca_dir = dir.path().join("ca");
        std::fs::write(ca_dir.join(ISSUER_FILE), &other.issuer_pem).expect("write");
        eventually("a refused reload", || metrics.ca_reload_errors.get() == 1).await;
        assert!(Arc::ptr_eq(&first, &started.ca.load_full()), "the last good CA keeps signing");
        let why = started.status.load().last_error.clone().expect("status says why");
        assert!(why.contains("does not chain to any trust anchor"), "{why}");
        assert_eq!(metrics.ca_reloads.get(), 0);

        // Rotation: both anchors, the issuer under the new one.
        std::fs::write(ca_dir.join(ISSUER_FILE), &issuer_pem).expect("write");
        let both = format!("{}{}", first.material().anchors_pem, other.anchors_pem);
        std::fs::write(ca_dir.join(ANCHORS_FILE), &both).expect("write");
        eventually("the second anchor published", || bundle_anchors(&lane) == 2).await;
        std::fs::write(ca_dir.join(ISSUER_KEY_FILE), &other.issuer_key_pem).expect("write");
        std::fs::write(ca_dir.join(ISSUER_FILE), &other.issuer_pem).expect("write");
        eventually("the new issuer loaded", || started.ca.load().material().issuer_pem == other.issuer_pem).await;
        let generation = lane.borrow().generation;
        assert!(generation >= 2);
        assert_eq!(started.status.load().last_error, None);
        assert!(metrics.serving_cert_renewals.get() >= 2, "a CA change renews the serving certificate");
    }
}
