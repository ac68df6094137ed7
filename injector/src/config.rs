//! Step 1, configuration: what gets injected, from flags shared by `neutrino-injector`
//! and `neutrino inject` ([`InjectArgs`], flattened into both), checked into an
//! [`InjectConfig`].
//!
//! This module must not read pods: per-pod changes are [`crate::overrides`].

use std::path::PathBuf;

use thiserror::Error;

use crate::{anchors, overrides};

/// The default control-plane address the proxies dial without trust anchors: plaintext,
/// no identity (the proxy's own default too).
pub const DEFAULT_CONTROL_PLANE: &str = "neutrino-control-plane.neutrino-system.svc:15010";
/// The default with `--trust-anchors-file`: the control plane's TLS port (Discovery and
/// Identity; `control-plane/src/lib.rs`, `TLS_GRPC_PORT`).
pub const DEFAULT_TLS_CONTROL_PLANE: &str = "neutrino-control-plane.neutrino-system.svc:15012";
/// The control plane's plaintext port: refused with trust anchors (the proxies speak TLS).
const PLAINTEXT_PORT: &str = "15010";
/// The default SPIFFE trust domain (the proxy's and the control plane's default too).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The default image for the proxy and its init container (both run `neutrino-proxy`).
pub const DEFAULT_PROXY_IMAGE: &str = concat!("neutrino/neutrino-proxy:", env!("CARGO_PKG_VERSION"));
/// The mesh's own namespace: its pods are never injected.
pub const DEFAULT_SYSTEM_NAMESPACE: &str = "neutrino-system";
/// The audience of the projected service-account token: what the mesh CA asks TokenReview
/// for (`control-plane/src/identity/token.rs`, `DEFAULT_AUDIENCE`).
pub const DEFAULT_TOKEN_AUDIENCE: &str = "neutrino";

/// How the proxy is added to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SidecarMode {
    /// A native sidecar (Kubernetes 1.29+): an init container with `restartPolicy: Always`
    /// and a startup probe, so it is up before app init containers and app containers,
    /// and it stops after them.
    #[default]
    Native,
    /// For clusters older than 1.29: the first regular container, with a `postStart` hook
    /// that waits for the proxy's `/ready` so app containers start after it.
    Legacy,
}

impl SidecarMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Legacy => "legacy",
        }
    }
}

/// `imagePullPolicy` (an enum rather than a string list: it keeps [`InjectArgs`] small).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    #[value(name = "Always")]
    Always,
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    #[value(name = "Never")]
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The proxy container's requests and limits (Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
}

/// Everything the patch needs besides the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    pub proxy_image: String,
    pub init_image: String,
    /// `imagePullPolicy` of both containers; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    pub sidecar_mode: SidecarMode,
    pub control_plane: String,
    pub token_audience: String,
    pub token_expiration_seconds: u32,
    pub system_namespace: String,
    pub resources: Resources,
    pub log_level: String,
    /// Legacy mode: how long the `postStart` hook waits for the proxy's `/ready`.
    pub ready_timeout_secs: u32,
    /// Where the proxies export traces (OTLP/gRPC), set as `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// in the proxy container; `None`: traces off (pods may still set
    /// `config.neutrino.io/otlp-endpoint`).
    pub otlp_endpoint: Option<String>,
    /// The mesh's trust anchors (PEM certificates, checked: [`anchors::check`]), set as
    /// `NEUTRINO_CA_PEM` in the proxy container with `NEUTRINO_TRUST_DOMAIN`; `None`: the
    /// proxies run without a mesh identity. The text itself, not a path: the patch stays a
    /// pure function of the pod and this config (the webhook swaps in a new config when
    /// the file changes).
    pub trust_anchors_pem: Option<String>,
    /// The SPIFFE trust domain of the proxies' identities (with trust anchors only).
    pub trust_domain: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            init_image: DEFAULT_PROXY_IMAGE.to_string(),
            image_pull_policy: None,
            sidecar_mode: SidecarMode::Native,
            control_plane: DEFAULT_CONTROL_PLANE.to_string(),
            token_audience: DEFAULT_TOKEN_AUDIENCE.to_string(),
            token_expiration_seconds: 3600,
            system_namespace: DEFAULT_SYSTEM_NAMESPACE.to_string(),
            resources: Resources {
                cpu_request: "10m".into(),
                cpu_limit: "1".into(),
                memory_request: "20Mi".into(),
                memory_limit: "128Mi".into(),
            },
            log_level: "info".into(),
            ready_timeout_secs: 60,
            otlp_endpoint: None,
            trust_anchors_pem: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

/// The injection flags, the same for the webhook and `neutrino inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Image of the proxy container.
    #[arg(long, env = "NEUTRINO_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// Image of the init container (runs `neutrino-proxy init`); default: the proxy image.
    #[arg(long, env = "NEUTRINO_INIT_IMAGE")]
    pub init_image: Option<String>,
    /// imagePullPolicy of the injected containers (Always, IfNotPresent, Never).
    #[arg(long, value_enum)]
    pub image_pull_policy: Option<PullPolicy>,
    /// native: an init container with restartPolicy Always (Kubernetes 1.29+); legacy: the
    /// first container with a postStart hook waiting for /ready (older clusters).
    #[arg(long, value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,
    /// Control-plane address the proxies dial (several, comma-separated, are tried in turn).
    /// Default: neutrino-control-plane.neutrino-system.svc:15012 (TLS) with
    /// --trust-anchors-file, else ...:15010 (plaintext, no mesh identity).
    #[arg(long)]
    pub control_plane: Option<String>,
    /// The mesh's trust anchors (PEM root certificates, e.g. the ConfigMap
    /// neutrino-trust-anchors mounted as a file). With it, each proxy gets them as
    /// NEUTRINO_CA_PEM, dials the control plane over TLS and gets a mesh identity (mTLS).
    /// The webhook re-reads the file when it changes; a bad new file keeps the last good one.
    #[arg(long, env = "NEUTRINO_TRUST_ANCHORS_FILE")]
    pub trust_anchors_file: Option<PathBuf>,
    /// The SPIFFE trust domain of the proxies' identities (spiffe://DOMAIN/ns/NS/sa/SA);
    /// must match the control plane's --trust-domain.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Audience of the projected service-account token mounted into the proxy.
    #[arg(long, default_value = DEFAULT_TOKEN_AUDIENCE)]
    pub token_audience: String,
    /// Lifetime of that token in seconds (Kubernetes requires at least 600).
    #[arg(long, default_value_t = 3600)]
    pub token_expiration_seconds: u32,
    /// Pods in this namespace (the mesh's own) are never injected.
    #[arg(long, default_value = DEFAULT_SYSTEM_NAMESPACE)]
    pub system_namespace: String,
    #[arg(long, default_value = "10m")]
    pub proxy_cpu_request: String,
    #[arg(long, default_value = "1")]
    pub proxy_cpu_limit: String,
    #[arg(long, default_value = "20Mi")]
    pub proxy_memory_request: String,
    #[arg(long, default_value = "128Mi")]
    pub proxy_memory_limit: String,
    /// The proxies' log filter (pods may override it with config.neutrino.io/log-level).
    #[arg(long, default_value = "info")]
    pub proxy_log_level: String,
    /// Legacy mode: seconds the postStart hook waits for the proxy to be ready.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_secs: u32,
    /// OTLP/gRPC collector the proxies send traces to (http(s)://HOST:PORT, e.g.
    /// http://jaeger.neutrino-system.svc:4317), set as OTEL_EXPORTER_OTLP_ENDPOINT in the
    /// proxy; unset: no traces (pods may override it with config.neutrino.io/otlp-endpoint).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

/// A bad injection flag.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("checking the injection flags: --{flag} {value:?} {reason}")]
    Flag { flag: &'static str, value: String, reason: String },
    #[error(
        "checking the injection flags: --trust-anchors-file {path}: {reason} (the mesh's trust anchors: the PEM \
         root certificates of the mesh CA, e.g. the ConfigMap neutrino-trust-anchors, key anchors.pem; leave the \
         flag out to inject proxies without a mesh identity)"
    )]
    TrustAnchors { path: String, reason: String },
}

impl InjectArgs {
    /// Checks the flags; every error names the flag and value.
    pub fn config(&self) -> Result<InjectConfig, ConfigError> {
        let flag = |flag: &'static str, value: &str, reason: String| ConfigError::Flag {
            flag,
            value: value.to_string(),
            reason,
        };
        let resources = Resources {
            cpu_request: self.proxy_cpu_request.clone(),
            cpu_limit: self.proxy_cpu_limit.clone(),
            memory_request: self.proxy_memory_request.clone(),
            memory_limit: self.proxy_memory_limit.clone(),
        };
        for (name, value) in [
            ("proxy-cpu-request", &resources.cpu_request),
            ("proxy-cpu-limit", &resources.cpu_limit),
            ("proxy-memory-request", &resources.memory_request),
            ("proxy-memory-limit", &resources.memory_limit),
        ] {
            overrides::quantity(value).map_err(|r| flag(name, value, r))?;
        }
        for (request, limit, req_flag) in [
            (&resources.cpu_request, &resources.cpu_limit, "proxy-cpu-request"),
            (&resources.memory_request, &resources.memory_limit, "proxy-memory-request"),
        ] {
            if overrides::quantity(request).ok() > overrides::quantity(limit).ok() {
                return Err(flag(req_flag, request, format!("is above the limit {limit}")));
            }
        }
        overrides::log_level(&self.proxy_log_level).map_err(|r| flag("proxy-log-level", &self.proxy_log_level, r))?;
        if self.token_expiration_seconds < 600 {
            let value = self.token_expiration_seconds.to_string();
            return Err(flag("token-expiration-seconds", &value, "is below Kubernetes' minimum of 600".into()));
        }
        if let Some(url) = &self.otlp_endpoint {
            overrides::otlp_endpoint(url)
                .and_then(
                    |u| if u.is_empty() { Err("is empty; leave the flag out for no traces".into()) } else { Ok(u) },
                )
                .map_err(|r| flag("otlp-endpoint", url, r))?;
        }
        for (name, value) in [("proxy-image", &self.proxy_image), ("token-audience", &self.token_audience)] {
            if value.trim().is_empty() {
                return Err(flag(name, value, "is empty".into()));
            }
        }
        let trust_anchors_pem = match &self.trust_anchors_file {
            Some(path) => Some(
                anchors::read(path)
                    .map_err(|reason| ConfigError::TrustAnchors { path: path.display().to_string(), reason })?
                    .pem,
            ),
            None => None,
        };
        let control_plane = self.control_plane(trust_anchors_pem.is_some())?;
        trust_domain(&self.trust_domain).map_err(|r| flag("trust-domain", &self.trust_domain, r))?;
        Ok(InjectConfig {
            proxy_image: self.proxy_image.clone(),
            init_image: self.init_image.clone().unwrap_or_else(|| self.proxy_image.clone()),
            image_pull_policy: self.image_pull_policy.map(|p| p.as_str().to_string()),
            sidecar_mode: self.sidecar_mode,
            control_plane,
            token_audience: self.token_audience.clone(),
            token_expiration_seconds: self.token_expiration_seconds,
            system_namespace: self.system_namespace.clone(),
            resources,
            log_level: self.proxy_log_level.clone(),
            ready_timeout_secs: self.ready_timeout_secs,
            otlp_endpoint: self.otlp_endpoint.as_ref().map(|u| u.trim().to_string()),
            trust_anchors_pem,
            trust_domain: self.trust_domain.clone(),
        })
    }

    /// `--control-plane`, or the default for plaintext or TLS. With trust anchors, an
    /// address on the plaintext port is refused: the proxies would speak TLS to it.
    fn control_plane(&self, tls: bool) -> Result<String, ConfigError> {
        let Some(value) = &self.control_plane else {
            return Ok(if tls { DEFAULT_TLS_CONTROL_PLANE } else { DEFAULT_CONTROL_PLANE }.to_string());
        };
        let flag = |reason: String| ConfigError::Flag { flag: "control-plane", value: value.clone(), reason };
        let addresses: Vec<&str> = value.split(',').map(str::trim).collect();
        if addresses.iter().any(|a| a.is_empty()) {
            return Err(flag("has an empty address; give HOST:PORT[,HOST:PORT...]".into()));
        }
        if tls && addresses.iter().any(|a| a.rsplit_once(':').is_some_and(|(_, port)| port == PLAINTEXT_PORT)) {
            return Err(flag(format!(
                "is the control plane's plaintext port {PLAINTEXT_PORT}, but with --trust-anchors-file the proxies \
                 speak TLS: use its TLS port (default {DEFAULT_TLS_CONTROL_PLANE}) or leave --control-plane out"
            )));
        }
        Ok(value.clone())
    }
}

/// A trust domain the proxy accepts: a lower-case DNS name (`proto/src/spiffe.rs`,
/// `SpiffeId::new`): dot-separated labels of `a-z`, `0-9` and inner `-`.
fn trust_domain(domain: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if domain.is_empty() || domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err("is not a lower-case DNS name (e.g. cluster.local, the default); it must be the control \
             plane's --trust-domain"
            .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        inject: InjectArgs,
    }

    fn config(args: &[&str]) -> Result<InjectConfig, ConfigError> {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).expect("flags parse").inject.config()
    }

    #[test]
    fn flag_defaults_are_the_default_config() {
        assert_eq!(config(&[]), Ok(InjectConfig::default()));
    }

    #[test]
    fn flags_are_checked() {
        let c = config(&["--proxy-image", "p:1", "--sidecar-mode", "legacy"]).expect("valid");
        assert_eq!((c.init_image.as_str(), c.sidecar_mode), ("p:1", SidecarMode::Legacy));
        let c = config(&["--image-pull-policy", "IfNotPresent"]).expect("valid");
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        let bad = Cli::try_parse_from(["x", "--image-pull-policy", "always"]).expect_err("case matters");
        assert!(bad.to_string().contains("[possible values: Always, IfNotPresent, Never]"), "{bad}");
        let e = config(&["--proxy-memory-limit", "big"]).expect_err("bad quantity");
        assert!(e.to_string().starts_with("checking the injection flags: --proxy-memory-limit \"big\""), "{e}");
        let e = config(&["--proxy-cpu-request", "2"]).expect_err("request above limit");
        assert!(e.to_string().contains("above the limit 1"), "{e}");
        assert!(config(&["--token-expiration-seconds", "60"]).is_err());
        assert!(config(&["--proxy-log-level", "chatty"]).is_err());
        assert!(config(&["--control-plane", " "]).is_err());
    }

    #[test]
    fn the_otlp_endpoint_is_an_http_url() {
        assert_eq!(config(&[]).expect("valid").otlp_endpoint, None);
        let c = config(&["--otlp-endpoint", "http://jaeger.neutrino-system.svc:4317"]).expect("valid");
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://jaeger.neutrino-system.svc:4317"));
        for bad in ["jaeger:4317", "grpc://jaeger:4317", "", "http://"] {
            let e = config(&["--otlp-endpoint", bad]).expect_err(bad);
            assert!(e.to_string().starts_with("checking the injection flags: --otlp-endpoint"), "{e}");
        }
    }

    #[test]
    fn trust_anchors_switch_the_proxies_to_tls_and_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path.to_str().expect("utf-8").to_string()
        };
        let anchors = file("anchors.pem", include_str!("../tests/testdata/anchor-1.pem"));
        let c = config(&["--trust-anchors-file", &anchors]).expect("valid");
        assert_eq!(c.trust_anchors_pem.as_deref(), Some(include_str!("../tests/testdata/anchor-1.pem")));
        assert_eq!((c.control_plane.as_str(), c.trust_domain.as_str()), (DEFAULT_TLS_CONTROL_PLANE, "cluster.local"));
        assert!(DEFAULT_TLS_CONTROL_PLANE.ends_with(":15012") && DEFAULT_CONTROL_PLANE.ends_with(":15010"));
        let c = config(&["--trust-anchors-file", &anchors, "--control-plane", "cp-a:15012,cp-b:15012"]).expect("valid");
        assert_eq!(c.control_plane, "cp-a:15012,cp-b:15012", "an explicit --control-plane wins");
        let e = config(&["--trust-anchors-file", &anchors, "--control-plane", "cp:15012,cp:15010"]).expect_err("plain");
        assert!(
            e.to_string().starts_with("checking the injection flags: --control-plane \"cp:15012,cp:15010\""),
            "{e}"
        );
        assert!(e.to_string().contains("plaintext port 15010"), "{e}");
        assert_eq!(config(&["--control-plane", "cp:15010"]).expect("no anchors: plaintext").control_plane, "cp:15010");
        assert!(config(&["--control-plane", "cp:15010,"]).is_err());

        let missing = dir.path().join("missing.pem");
        let e = config(&["--trust-anchors-file", missing.to_str().expect("utf-8")]).expect_err("missing");
        let start = format!("checking the injection flags: --trust-anchors-file {}: cannot be read", missing.display());
        assert!(e.to_string().starts_with(&start), "{e}");
        assert!(e.to_string().contains("ConfigMap neutrino-trust-anchors"), "{e}");
        let leaf = file("leaf.pem", include_str!("../tests/testdata/leaf.pem"));
        let e = config(&["--trust-anchors-file", &leaf]).expect_err("not a CA");
        assert!(matches!(&e, ConfigError::TrustAnchors { reason, .. } if reason.contains("not a CA")), "{e}");
        let empty = file("empty.pem", "");
        assert!(
            config(&["--trust-anchors-file", &empty]).expect_err("empty").to_string().contains("no PEM CERTIFICATE")
        );
    }

    #[test]
    fn the_trust_domain_is_a_lower_case_dns_name() {
        let c = config(&["--trust-domain", "mesh.example-1"]).expect("valid");
        assert_eq!(c.trust_domain, "mesh.example-1");
        for bad in ["", "Cluster.Local", "a_b", "-a.b", "a..b", "spiffe://x", "a b"] {
            let e = config(&[&format!("--trust-domain={bad}")]).expect_err(bad);
            assert!(e.to_string().starts_with("checking the injection flags: --trust-domain"), "{e}");
        }
    }
}
