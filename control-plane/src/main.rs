//! `neutrino-control-plane`: flags in, [`neutrino_control_plane::run`] out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use neutrino_control_plane::identity::{self, CaSource, IdentitySettings, token::TokenSettings};
use neutrino_control_plane::index::DebounceSettings;
use neutrino_control_plane::load::{LoadSettings, share::ShareSettings};
use neutrino_control_plane::serve::ServeSettings;
use neutrino_control_plane::watch::kube::{KubeSettings, KubeSource};
use neutrino_control_plane::watch::{Source, file::FileSource};
use neutrino_control_plane::{ADMIN_PORT, GRPC_PORT, Settings, TLS_GRPC_PORT};

#[derive(Debug, Parser)]
#[command(
    name = "neutrino-control-plane",
    version,
    about = "Neutrino control plane: discovers services and streams config to proxies"
)]
struct Args {
    /// Discover services from this mesh file (format: docs/mesh-file.md). Edits are picked up live.
    /// Exactly one of --mesh-file and --kubernetes.
    #[arg(long, env = "NEUTRINO_MESH_FILE")]
    mesh_file: Option<PathBuf>,
    /// Discover services from the Kubernetes API (KUBECONFIG, ~/.kube/config, or the pod's
    /// service account). Exactly one of --mesh-file and --kubernetes.
    #[arg(long, env = "NEUTRINO_KUBERNETES")]
    kubernetes: bool,
    /// Address for the Discovery gRPC stream.
    #[arg(long, env = "NEUTRINO_GRPC_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], GRPC_PORT)))]
    grpc_addr: SocketAddr,
    /// Address for admin HTTP (/live, /ready, /metrics, /config_dump).
    #[arg(long, env = "NEUTRINO_ADMIN_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)))]
    admin_addr: SocketAddr,
    /// Publish after this much quiet following a change (milliseconds).
    #[arg(long, default_value_t = 100)]
    debounce_quiet_ms: u64,
    /// ...but never later than this after the first unpublished change (milliseconds).
    #[arg(long, default_value_t = 1000)]
    debounce_max_ms: u64,
    /// Close streams after about this long (±10 %) so proxies rebalance across replicas.
    #[arg(long, default_value_t = 1800)]
    max_stream_age_secs: u64,
    /// Share proxies' load reports with other replicas through this Redis (e.g.
    /// redis://redis:6379). Without it, each replica pushes only its own proxies' reports.
    #[arg(long, env = "NEUTRINO_REDIS_URL")]
    redis_url: Option<String>,
    /// This replica's name in Redis messages; defaults to host name and process id.
    #[arg(long, env = "NEUTRINO_REPLICA")]
    replica: Option<String>,
    /// Publish load changes at most this often (milliseconds; 250 to 1000 is sensible).
    #[arg(long, default_value_t = 250)]
    capacity_interval_ms: u64,
    /// The SPIFFE trust domain: identities are spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, env = "NEUTRINO_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Local CA: keep anchors.pem, issuer.pem and issuer-key.pem in this directory, generating
    /// them (anchor 10 years, issuer 1 year) when none exist. Turns identity and TLS on 15012 on.
    #[arg(long, env = "NEUTRINO_CA_DIR", conflicts_with_all = ["trust_anchors", "issuer_cert", "issuer_key"])]
    ca_dir: Option<PathBuf>,
    /// The trust anchors (PEM, one or more certificates; during a rotation both). With
    /// --issuer-cert and --issuer-key: turns identity and TLS on 15012 on.
    #[arg(long, env = "NEUTRINO_TRUST_ANCHORS", requires_all = ["issuer_cert", "issuer_key"])]
    trust_anchors: Option<PathBuf>,
    /// The issuer's certificate (PEM; intermediates after it), signed by one of the anchors.
    #[arg(long, env = "NEUTRINO_ISSUER_CERT", requires_all = ["trust_anchors", "issuer_key"])]
    issuer_cert: Option<PathBuf>,
    /// The issuer's private key (PEM).
    #[arg(long, env = "NEUTRINO_ISSUER_KEY", requires_all = ["trust_anchors", "issuer_cert"])]
    issuer_key: Option<PathBuf>,
    /// Re-read the CA files this often (seconds); a changed, valid set replaces the CA.
    #[arg(long, default_value_t = 5)]
    ca_reload_secs: u64,
    /// Lifetime of workload certificates: a number and s, m, h or d (e.g. 24h, 90m, 30s).
    #[arg(long, default_value = "24h", value_parser = identity::parse_ttl)]
    cert_ttl: Duration,
    /// Local mode: tokens accepted by Certify, one `<token> <namespace>/<service-account>`
    /// per line. Without it, tokens are checked with the Kubernetes TokenReview API.
    #[arg(long, env = "NEUTRINO_BOOTSTRAP_TOKENS")]
    bootstrap_tokens: Option<PathBuf>,
    /// Audiences a service-account token must be valid for (TokenReview), comma-separated.
    #[arg(long, default_value = identity::token::DEFAULT_AUDIENCE, value_delimiter = ',')]
    token_audience: Vec<String>,
    /// Address for Discovery and Identity over TLS (only with a CA).
    #[arg(long, env = "NEUTRINO_TLS_GRPC_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], TLS_GRPC_PORT)))]
    tls_grpc_addr: SocketAddr,
    /// Names in the control plane's TLS certificate (comma-separated; IP literals become IP SANs).
    #[arg(long, default_value = identity::DEFAULT_TLS_NAMES, value_delimiter = ',')]
    tls_names: Vec<String>,
    /// Export a span per push (until the proxy's ACK or NACK) over OTLP/gRPC to this
    /// collector; without it, OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT decides. Other OTEL_*
    /// variables (OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*) are honoured.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Log filter, e.g. "info" or "neutrino_control_plane=debug".
    #[arg(long, env = "NEUTRINO_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("parsing --log")?)
        .init();
    let redis = match args.redis_url {
        Some(url) => {
            redis::Client::open(url.as_str())
                .with_context(|| format!("--redis-url {url:?} is not a Redis URL; use redis://host:port"))?;
            let replica = args.replica.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            });
            Some(ShareSettings { redis_url: url, replica, prefix: "neutrino:load".into() })
        }
        None => None,
    };
    let source = match (args.mesh_file, args.kubernetes) {
        (Some(path), false) => Source::File(FileSource::new(path)),
        (None, true) => Source::Kubernetes(KubeSource::new(KubeSettings::default())),
        (Some(_), true) => anyhow::bail!(
            "--mesh-file and --kubernetes both given (or set through NEUTRINO_MESH_FILE / NEUTRINO_KUBERNETES); choose one discovery source"
        ),
        (None, false) => anyhow::bail!(
            "no discovery source: pass --mesh-file <path> (local mode) or --kubernetes (in a cluster, or with KUBECONFIG)"
        ),
    };
    neutrino_proto::spiffe::SpiffeId::new(&args.trust_domain, "default", "default")
        .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
    let ca_source = match (args.ca_dir, args.trust_anchors, args.issuer_cert, args.issuer_key) {
        (Some(dir), None, None, None) => Some(CaSource::Dir(dir)),
        (None, Some(anchors), Some(issuer_cert), Some(issuer_key)) => {
            Some(CaSource::Files { anchors, issuer_cert, issuer_key })
        }
        (None, None, None, None) => None,
        _ => anyhow::bail!(
            "give either --ca-dir, or all three of --trust-anchors, --issuer-cert and --issuer-key (or none: no CA)"
        ),
    };
    let tls_names: Vec<String> =
        args.tls_names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
    let audiences: Vec<String> =
        args.token_audience.iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
    if audiences.is_empty() {
        anyhow::bail!("--token-audience is empty; give at least one audience (default neutrino)");
    }
    let identity = ca_source.map(|source| IdentitySettings {
        source,
        cert_ttl: args.cert_ttl,
        reload: Duration::from_secs(args.ca_reload_secs.max(1)),
        tokens: match args.bootstrap_tokens {
            Some(path) => TokenSettings::Bootstrap(path),
            None => TokenSettings::TokenReview { audiences },
        },
        tls_addr: args.tls_grpc_addr,
        tls_names,
    });
    let settings = Settings {
        source,
        trust_domain: args.trust_domain,
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        debounce: DebounceSettings {
            quiet: Duration::from_millis(args.debounce_quiet_ms),
            max_delay: Duration::from_millis(args.debounce_max_ms),
        },
        serve: ServeSettings { max_stream_age: Duration::from_secs(args.max_stream_age_secs), tracer: None },
        otlp_endpoint: args.otlp_endpoint.filter(|e| !e.trim().is_empty()),
        load: LoadSettings { interval: Duration::from_millis(args.capacity_interval_ms.max(10)), redis },
        identity,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
    };
    neutrino_control_plane::run(settings, shutdown).await?;
    Ok(())
}
