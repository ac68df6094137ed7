//! `neutrino-injector`: flags in, the HTTPS admission webhook out (`serve`).
//!
//! Prints `listening on https://ADDR` on stdout once it accepts connections (after the CA
//! bundle, if asked for, is written); logs go to stderr. SIGTERM or Ctrl-C: stop
//! accepting, drain, send the Events still queued (up to 5 s), exit 0.
//!
//! Events (`--events`): on by default when a Kubernetes config can be inferred (in a
//! pod: its service-account token; elsewhere KUBECONFIG or ~/.kube/config), off with
//! `--events=false`; `--events` alone makes a missing config an error.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use neutrino_injector::anchors;
use neutrino_injector::config::InjectArgs;
use neutrino_injector::recorder::{self, Recorder};
use neutrino_injector::serve::{self, Settings};
use neutrino_injector::tls;

#[derive(Debug, Parser)]
#[command(name = "neutrino-injector", version, about = "Neutrino sidecar injector (mutating admission webhook)")]
struct Args {
    /// HTTPS listen address (port 0: any free port, printed at start).
    #[arg(long, env = "NEUTRINO_INJECTOR_ADDR", default_value = "0.0.0.0:15017")]
    addr: SocketAddr,
    /// PEM certificate chain to serve (re-read when it changes).
    #[arg(long, requires = "tls_key", conflicts_with = "self_signed_dns")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Generate a CA and a serving certificate for these DNS names at start
    /// (comma-separated, e.g. neutrino-injector.neutrino-system.svc).
    #[arg(long, value_delimiter = ',')]
    self_signed_dns: Vec<String>,
    /// With --self-signed-dns: write the CA certificate (PEM, the webhook's caBundle) here.
    #[arg(long, requires = "self_signed_dns")]
    ca_bundle_out: Option<PathBuf>,
    /// With --tls-cert: how often the files are checked for a new certificate (seconds).
    #[arg(long, default_value_t = 10)]
    tls_reload_secs: u64,
    /// With --trust-anchors-file: how often its modification time is checked (seconds).
    #[arg(long, default_value_t = 5)]
    trust_anchors_reload_secs: u64,
    /// Larger request bodies are refused with 413.
    #[arg(long, default_value_t = serve::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// On SIGTERM, how long open connections may take to finish (seconds).
    #[arg(long, default_value_t = 10)]
    drain_timeout_secs: u64,
    /// Record a Kubernetes Event for each skipped or denied pod. Default: on when a
    /// Kubernetes config can be inferred (in-cluster, KUBECONFIG, ~/.kube/config);
    /// `--events` alone: on, and no config is an error; `--events=false`: off.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    events: Option<bool>,
    /// The Events' reportingInstance: this injector's pod (the downward API's
    /// metadata.name); default: $HOSTNAME.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Log filter, e.g. "info" or "neutrino_injector=debug".
    #[arg(long, env = "NEUTRINO_LOG", default_value = "info")]
    log: String,
    #[command(flatten)]
    inject: InjectArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("parsing --log")?)
        .init();
    let inject = args.inject.config()?;
    let mode = inject.sidecar_mode.as_str();
    let image = inject.proxy_image.clone();
    let identity = inject.trust_anchors_pem.is_some();
    let inject = Arc::new(arc_swap::ArcSwap::from_pointee(inject));
    if let Some(path) = &args.inject.trust_anchors_file {
        let every = Duration::from_secs(args.trust_anchors_reload_secs.max(1));
        tokio::spawn(anchors::watch(inject.clone(), anchors::Reloader::new(path.clone()), every));
    }

    let (key, files) = match (&args.tls_cert, &args.tls_key, args.self_signed_dns.is_empty()) {
        (Some(cert), Some(key), _) => (tls::load(cert, key)?, Some((cert.clone(), key.clone()))),
        (None, None, false) => {
            let generated = tls::generate(&args.self_signed_dns)?;
            if let Some(path) = &args.ca_bundle_out {
                tls::write_ca(path, &generated.ca_pem)?;
            }
            (generated.key, None)
        }
        _ => anyhow::bail!(
            "no TLS certificate: give --tls-cert and --tls-key, or --self-signed-dns NAMES [--ca-bundle-out FILE] \
             (the API server only calls webhooks over HTTPS)"
        ),
    };
    let resolver = tls::Resolver::new(key);
    let config = tls::server_config(resolver.clone())?;
    if let Some((cert, key)) = files {
        tokio::spawn(tls::watch_files(resolver, cert, key, Duration::from_secs(args.tls_reload_secs.max(1))));
    }

    let (recorder, events_task) = events(&args).await?;

    let listener =
        tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("binding --addr {}", args.addr))?;
    let local = listener.local_addr().context("reading the listen address")?;
    tracing::info!(%local, mode, %image, identity, "serving");
    if !identity {
        tracing::warn!(
            "no --trust-anchors-file: injected proxies get no mesh identity and talk to the control plane and to \
             each other in plaintext"
        );
    }
    let mut out = std::io::stdout();
    writeln!(out, "listening on https://{local}").and_then(|()| out.flush()).context("writing to stdout")?;

    let settings = Arc::new(Settings {
        inject,
        max_body_bytes: args.max_body_bytes,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        recorder: recorder.clone(),
    });
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    serve::serve(listener, config, settings, shutdown).await;
    if let Some(task) = events_task {
        if !task.finish(EVENTS_FLUSH).await {
            tracing::warn!("the Events still queued after {EVENTS_FLUSH:?} were abandoned");
        }
        tracing::info!("events: {}", recorder.counts());
    }
    Ok(())
}

/// How long the Events still queued at shutdown may take to be sent.
const EVENTS_FLUSH: Duration = Duration::from_secs(5);

/// The Event recorder `--events` asks for.
async fn events(args: &Args) -> anyhow::Result<(Recorder, Option<recorder::Task>)> {
    if args.events == Some(false) {
        return Ok((Recorder::disabled(), None));
    }
    let config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) if args.events == Some(true) => {
            anyhow::bail!(
                "--events: no Kubernetes config ({e}); run in a pod with a service-account token, set \
                 KUBECONFIG, or pass --events=false"
            )
        }
        Err(e) => {
            tracing::info!("events off: no Kubernetes config ({e})");
            return Ok((Recorder::disabled(), None));
        }
    };
    let cluster = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("--events: making the Kubernetes client")?;
    let instance = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "neutrino-injector".to_string());
    tracing::info!(%cluster, %instance, "events: skipped and denied pods are recorded as Kubernetes Events");
    let (recorder, task) = Recorder::kube(client, instance, recorder::DEFAULT_QUEUE);
    Ok((recorder, Some(task)))
}
