//! `neutrino-control-plane`: flags in, [`neutrino_control_plane::run`] out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use neutrino_control_plane::index::DebounceSettings;
use neutrino_control_plane::load::{LoadSettings, share::ShareSettings};
use neutrino_control_plane::serve::ServeSettings;
use neutrino_control_plane::watch::kube::{KubeSettings, KubeSource};
use neutrino_control_plane::watch::{Source, file::FileSource};
use neutrino_control_plane::{ADMIN_PORT, GRPC_PORT, Settings};

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
    let settings = Settings {
        source,
        trust_domain: args.trust_domain,
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        debounce: DebounceSettings {
            quiet: Duration::from_millis(args.debounce_quiet_ms),
            max_delay: Duration::from_millis(args.debounce_max_ms),
        },
        serve: ServeSettings { max_stream_age: Duration::from_secs(args.max_stream_age_secs) },
        load: LoadSettings { interval: Duration::from_millis(args.capacity_interval_ms.max(10)), redis },
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
