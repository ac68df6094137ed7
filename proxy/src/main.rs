//! `neutrino-proxy`: flags in, [`neutrino_proxy::run`] out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use neutrino_proto::Node;
use neutrino_proxy::config::stream::StreamSettings;
use neutrino_proxy::{ADMIN_PORT, ConfigSource, Settings};

#[derive(Debug, Parser)]
#[command(name = "neutrino-proxy", version, about = "Neutrino sidecar proxy")]
struct Args {
    /// Without a subcommand, runs the proxy.
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Control plane address (host:port); several replicas, comma-separated, are tried in
    /// turn on each reconnect. Ignored with --config-file.
    #[arg(long, env = "NEUTRINO_CONTROL_PLANE", default_value = "neutrino-control-plane.neutrino-system.svc:15010")]
    control_plane: String,
    /// Local mode: read config from this mesh file instead of a control plane.
    #[arg(long, env = "NEUTRINO_CONFIG_FILE")]
    config_file: Option<PathBuf>,
    /// Admin HTTP address (/live, /ready, /metrics, /config_dump).
    #[arg(long, env = "NEUTRINO_ADMIN_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)))]
    admin_addr: SocketAddr,
    /// Outbound listener: apps' traffic redirected by iptables, or explicit HTTP proxy use.
    #[arg(long, env = "NEUTRINO_OUTBOUND_ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], neutrino_proxy::OUTBOUND_PORT)))]
    outbound_addr: SocketAddr,
    /// Inbound listener: traffic to this pod, redirected by iptables.
    #[arg(long, env = "NEUTRINO_INBOUND_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], neutrino_proxy::INBOUND_PORT)))]
    inbound_addr: SocketAddr,
    /// Where inbound connections go when iptables did not redirect them (local mode).
    #[arg(long, env = "NEUTRINO_INBOUND_APP_ADDR")]
    inbound_app_addr: Option<SocketAddr>,
    /// How long a request may wait for an endpoint with room before a 503 (milliseconds).
    #[arg(long, default_value_t = 500)]
    queue_timeout_ms: u64,
    /// Ports where the server speaks first, never sniffed (comma-separated; replaces the
    /// default list: 21,22,25,110,143,465,587,993,995,3306,5432,6379,11211,27017).
    #[arg(long, value_delimiter = ',')]
    no_sniff_ports: Option<Vec<u16>>,
    /// Write one record per request to this Redis (a Stream; see `neutrino logs`).
    #[arg(long, env = "NEUTRINO_REDIS_URL")]
    redis_url: Option<String>,
    /// The Redis Stream the request log goes to.
    #[arg(long, default_value = "neutrino:requests")]
    request_log_stream: String,
    /// The request log is trimmed to about this many records.
    #[arg(long, default_value_t = 100_000)]
    request_log_max_len: u64,
    /// Export trace spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317).
    /// Without it, tracing is on only when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set; the other OTEL_* variables (OTEL_SERVICE_NAME,
    /// OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_EXPORTER_OTLP_*) are honoured.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// On SIGTERM, how long open inbound connections may take to finish (seconds).
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
    /// How long a client may take to send a request head (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// An HTTP/1 client connection quiet this long (milliseconds) gives back its HTTP
    /// buffers until the client sends again; 0 keeps them.
    #[arg(long, default_value_t = 2_000)]
    park_idle_after_ms: u64,
    /// A client connection quiet this long (seconds) is closed, as a server closes an idle
    /// keep-alive connection: parked ones (see --park-idle-after-ms) by their lot's
    /// sweep, the others (HTTP/2, mTLS) after a graceful finish, within twice this; 0
    /// never closes one.
    #[arg(long, default_value_t = 3600)]
    client_idle_timeout_secs: u64,
    /// This proxy's pod (downward API), for its node identity.
    #[arg(long, env = "NEUTRINO_POD_NAME", default_value = "")]
    pod: String,
    #[arg(long, env = "NEUTRINO_POD_NAMESPACE", default_value = "default")]
    namespace: String,
    #[arg(long, env = "NEUTRINO_SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    #[arg(long, env = "NEUTRINO_ZONE", default_value = "")]
    zone: String,
    /// Trust anchors (PEM). With it, the control plane is reached over TLS (give its TLS
    /// port, 15012, in --control-plane) and, with --token-file, the proxy gets a mesh
    /// identity and calls meshed endpoints over mTLS.
    #[arg(long, env = "NEUTRINO_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The trust anchors as PEM text instead of a file (the injector sets NEUTRINO_CA_PEM).
    #[arg(long, env = "NEUTRINO_CA_PEM", hide_env_values = true)]
    ca_pem: Option<String>,
    /// The token proving this pod's service account (Kubernetes: a projected token with
    /// audience "neutrino"; local mode: a bootstrap token).
    #[arg(long, env = "NEUTRINO_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "NEUTRINO_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Reconnect backoff bounds in milliseconds.
    #[arg(long, default_value_t = 100)]
    backoff_min_ms: u64,
    #[arg(long, default_value_t = 5000)]
    backoff_max_ms: u64,
    /// Log filter, e.g. "info" or "neutrino_proxy=debug".
    #[arg(long, env = "NEUTRINO_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install (or with --cleanup remove) the nat rules that send this pod's TCP to the proxy; the init container.
    Init(neutrino_proxy::init::InitArgs),
    /// Wait until the proxy answers 200 on its admin /ready, then exit 0 (exit 1 at the
    /// timeout). The legacy sidecar's postStart hook, so app containers start after the proxy.
    WaitReady(WaitReadyArgs),
}

#[derive(Debug, clap::Args)]
struct WaitReadyArgs {
    /// The proxy's admin address.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)))]
    admin_addr: SocketAddr,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("parsing --log")?)
        .init();
    if let Some(Cmd::Init(init)) = &args.command {
        print!("{}", neutrino_proxy::init::run(init)?);
        return Ok(());
    }
    if let Some(Cmd::WaitReady(w)) = &args.command {
        return wait_ready(w.admin_addr, Duration::from_secs(w.timeout_secs)).await;
    }
    let pod = if args.pod.is_empty() { hostname() } else { args.pod.clone() };
    let pod_name = pod.clone();
    let source = format!("{pod}.{}", args.namespace);
    let config = match args.config_file.clone() {
        Some(path) => ConfigSource::File(path, args.trust_domain.clone()),
        None => ConfigSource::Stream(StreamSettings {
            control_plane: args.control_plane.clone(),
            node: Node {
                id: source.clone(),
                pod,
                namespace: args.namespace.clone(),
                service_account: args.service_account.clone(),
                zone: args.zone.clone(),
            },
            backoff_min: Duration::from_millis(args.backoff_min_ms),
            backoff_max: Duration::from_millis(args.backoff_max_ms),
            trust: None,
        }),
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let data = neutrino_proxy::forward::DataSettings {
        namespace: args.namespace.as_str().into(),
        source: source.as_str().into(),
        pod: pod_name.as_str().into(),
        queue_timeout: Duration::from_millis(args.queue_timeout_ms),
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
        park_idle_after: Duration::from_millis(args.park_idle_after_ms),
        client_idle_timeout: Duration::from_secs(args.client_idle_timeout_secs),
        server_first_ports: args
            .no_sniff_ports
            .clone()
            .unwrap_or_else(|| neutrino_proxy::detect::DEFAULT_SERVER_FIRST_PORTS.to_vec()),
        ..Default::default()
    };
    let anchors = match (&args.ca_file, &args.ca_pem) {
        (Some(_), Some(_)) => anyhow::bail!("--ca-file and --ca-pem (NEUTRINO_CA_PEM) both given; choose one"),
        (Some(path), None) => Some(neutrino_proxy::identity::Anchors::File(path.clone())),
        (None, Some(pem)) => Some(neutrino_proxy::identity::Anchors::Pem(pem.clone())),
        (None, None) => None,
    };
    let identity = match (anchors, &args.token_file, &args.config_file) {
        (Some(_), _, Some(_)) => {
            anyhow::bail!("--ca-file/--ca-pem apply to a control-plane stream, not to --config-file")
        }
        (Some(anchors), Some(token), None) => Some(neutrino_proxy::identity::IdentitySettings {
            id: neutrino_proto::spiffe::SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "this proxy's identity: {e}; check --namespace, --service-account and --trust-domain"
                    )
                })?,
            anchors,
            token_file: token.clone(),
        }),
        (Some(_), None, None) => anyhow::bail!(
            "--ca-file/--ca-pem need --token-file (the token that proves this pod's service account to the Identity service)"
        ),
        (None, Some(_), None) => {
            tracing::warn!(
                "--token-file is set but no trust anchors (--ca-file or NEUTRINO_CA_PEM): running WITHOUT a mesh \
                 identity; calls to meshed endpoints go in plaintext (counted in \
                 neutrino_proxy_outbound_plaintext_to_meshed_total). Configure the injector's --trust-anchors-file."
            );
            None
        }
        (None, _, _) => None,
    };
    let settings = Settings {
        identity,
        config,
        admin_addr: args.admin_addr,
        outbound_addr: args.outbound_addr,
        inbound_addr: args.inbound_addr,
        inbound_app_addr: args.inbound_app_addr,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        request_log: args.redis_url.clone().map(|redis_url| neutrino_proxy::telemetry::request_log::Settings {
            redis_url,
            stream: args.request_log_stream.clone(),
            max_len: args.request_log_max_len,
            queue: 8192,
        }),
        tracing: neutrino_proxy::telemetry::trace::Settings::if_enabled(
            args.otlp_endpoint.clone(),
            &pod_name,
            &args.namespace,
            &source,
        ),
        data,
    };
    neutrino_proxy::run(settings, shutdown).await?;
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("proxy-{}", std::process::id()))
}

/// `wait-ready`: polls `http://ADDR/ready` every 200 ms (each try bounded by 2 s) until it
/// answers 200. Plain HTTP/1.1 over a socket: nothing else of the proxy is started.
async fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(2), ready_status(addr)).await {
            Ok(Ok((200, _))) => return Ok(()),
            Ok(Ok((code, body))) => format!("{code} {}", body.trim()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 2 s".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the proxy was not ready within {} s: http://{addr}/ready last said: {last}; \
                 see the neutrino-proxy container's log (kubectl logs POD -c neutrino-proxy)",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One `GET /ready`: the status code and body.
async fn ready_status(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    let code = code.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
}
