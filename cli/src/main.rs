//! `neutrino`: the command-line tool. Subcommands are thin: each reads or starts real
//! components and prints what it finds.

mod check;
mod demo;
mod inject;
mod install;
mod logs;
mod show;
mod stat;
mod traces;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "neutrino", version, about = "Neutrino service mesh command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the local demo mesh: a control plane, three backends with their sidecars and a
    /// client's sidecar on a mesh file; send a mixed workload, report where it went, and
    /// show the trace of one heavy request.
    Demo {
        /// The mesh file (format: docs/mesh-file.md).
        #[arg(long, default_value = "examples/mesh.yaml")]
        mesh_file: PathBuf,
        /// Keep the mesh running until Ctrl-C instead of exiting after the report.
        #[arg(long)]
        keep_running: bool,
        /// How many requests the demo client sends.
        #[arg(long, default_value_t = 800)]
        requests: usize,
        /// Send every trace to this OTLP/gRPC collector (a Jaeger: http://127.0.0.1:4317)
        /// instead of the demo's built-in receiver.
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
        /// Without --otlp-endpoint: where the received traces are written, as JSON Jaeger's
        /// UI loads (Search -> Upload JSON).
        #[arg(long, value_name = "PATH", default_value = "target/demo-traces.json")]
        trace_file: PathBuf,
    },
    /// Print the request log (one record per request, written by every proxy to Redis).
    Logs {
        #[arg(long, env = "NEUTRINO_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        #[arg(long, default_value = "neutrino:requests")]
        stream: String,
        /// Only this service ("<namespace>/<name>").
        #[arg(long)]
        service: Option<String>,
        /// Only this OpenAPI operation id.
        #[arg(long)]
        operation: Option<String>,
        /// Only this status ("503") or class ("5xx").
        #[arg(long)]
        status: Option<String>,
        /// How many of the newest matching records to print first.
        #[arg(long, short = 'n', default_value_t = 20)]
        count: usize,
        /// Keep printing new records as they arrive.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Add the sidecar proxy to the pods of workload manifests (Pods, Deployments,
    /// StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs, Lists), offline: the same
    /// patch the injector webhook applies. Other kinds pass through unchanged.
    Inject {
        /// Manifests (multi-document YAML); "-" reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        #[command(flatten)]
        args: Box<neutrino_injector::config::InjectArgs>,
    },
    /// Remove exactly what `neutrino inject` (or the webhook) added.
    Uninject {
        /// Manifests (multi-document YAML); "-" reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Write here instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Print the mesh's Kubernetes manifests (deploy/ rendered), for
    /// `neutrino install | kubectl apply -f -`. Without --cert-manager, a CA and the
    /// injector's serving certificate are generated (a new pair on every run), and the
    /// mesh CA (Secret neutrino-ca and ConfigMap neutrino-trust-anchors: a new trust
    /// anchor and issuer on every run, unless --mesh-ca-dir keeps them).
    Install {
        /// Add the demo: Redis for the control-plane replicas, Jaeger, and the sample app.
        #[arg(long)]
        demo: bool,
        /// Take the injector's certificate and the mesh CA from cert-manager (installed in
        /// the cluster) instead of generating them.
        #[arg(long)]
        cert_manager: bool,
        /// Registry and repository prefix of the Neutrino images (default: neutrino).
        #[arg(long)]
        image_registry: Option<String>,
        /// Tag of the Neutrino images (default: this version).
        #[arg(long)]
        tag: Option<String>,
        /// Control-plane replicas share load reports through this Redis (the demo's by default
        /// with --demo).
        #[arg(long)]
        redis_url: Option<String>,
        /// Keep the mesh CA here: anchors.pem, issuer.pem and issuer-key.pem are read (and
        /// validated) when all present, or generated and written (the directory created,
        /// the key 0600) when none is; a partial set is refused. Without it every run
        /// generates a new mesh CA, and applying that replaces the CA of a running mesh.
        #[arg(long, value_name = "DIR", conflicts_with = "cert_manager")]
        mesh_ca_dir: Option<PathBuf>,
    },
    /// Preflight and health of the mesh in a cluster (KUBECONFIG): API, permissions, the
    /// webhook and its CA, the control plane, connected proxies and their versions. Exits
    /// non-zero when a check fails.
    Check {
        /// Seconds each request to the API server may take.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Per service and operation: requests per second, success rate, p50/p99 latency;
    /// per endpoint: utilization and capacity. From the proxies' /metrics (given with
    /// --proxy, or every meshed pod of a cluster with -n/-A), measured over a window.
    Stat {
        #[command(flatten)]
        targets: TargetArgs,
        /// How long to measure, in seconds.
        #[arg(long, default_value_t = 2.0)]
        window_secs: f64,
    },
    /// The busiest routes, live: `stat` refreshed in the terminal until Ctrl-C.
    Top {
        #[command(flatten)]
        targets: TargetArgs,
        /// Refresh every this many milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Show at most this many routes.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Stop after this many refreshes (default: run until Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Print the config a running proxy holds (from its admin /config_dump).
    Config {
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: String,
    },
}

/// Which proxies `stat` and `top` read: by admin address, or a cluster's meshed pods.
#[derive(Debug, clap::Args)]
struct TargetArgs {
    /// Admin addresses of the proxies to read (repeat or comma-separate); the demo's
    /// client sidecar when no cluster scope (-n, -A) is given.
    #[arg(long = "proxy", value_delimiter = ',', conflicts_with_all = ["namespace", "all_namespaces"])]
    proxies: Vec<String>,
    /// Read every meshed pod of this namespace, through the API server (KUBECONFIG).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Read every meshed pod of the cluster, through the API server (KUBECONFIG).
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Only pods matching this label selector (with -n or -A), e.g. app=web.
    #[arg(short = 'l', long)]
    selector: Option<String>,
}

impl TargetArgs {
    async fn resolve(self) -> anyhow::Result<stat::Targets> {
        if self.namespace.is_some() || self.all_namespaces {
            return Ok(stat::Targets::cluster(self.namespace, self.selector).await?);
        }
        if self.selector.is_some() {
            anyhow::bail!("--selector reads pods of a cluster: add -n NAMESPACE or -A");
        }
        let proxies = if self.proxies.is_empty() { vec!["127.0.0.1:15020".to_string()] } else { self.proxies };
        Ok(stat::Targets::Direct(proxies))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo { mesh_file, keep_running, requests, otlp_endpoint, trace_file } => {
            demo::run(demo::Options { mesh_file, keep_running, requests, otlp_endpoint, trace_file }).await
        }
        Command::Stat { targets, window_secs } => {
            let targets = targets.resolve().await?;
            stat::stat(&targets, std::time::Duration::from_secs_f64(window_secs.clamp(0.1, 3600.0))).await
        }
        Command::Top { targets, interval_ms, limit, iterations } => {
            let targets = targets.resolve().await?;
            stat::top(&targets, std::time::Duration::from_millis(interval_ms.max(100)), limit, iterations).await
        }
        Command::Logs { redis_url, stream, service, operation, status, count, follow } => {
            let filter = logs::Filter { service, operation, status };
            logs::run(&redis_url, &stream, &filter, count, follow).await
        }
        Command::Inject { file, output, args } => inject::inject(&file, output.as_ref(), &args),
        Command::Uninject { file, output } => inject::uninject(&file, output.as_ref()),
        Command::Install { demo, cert_manager, image_registry, tag, redis_url, mesh_ca_dir } => {
            let opts = install::Options { demo, cert_manager, image_registry, tag, redis_url };
            let (tls, notice) = match cert_manager {
                true => (None, None),
                false => {
                    let now = now_unix();
                    let (mesh, origin) = install::mesh_ca(mesh_ca_dir.as_deref(), now)?;
                    (Some(install::tls_with_mesh_ca(now, mesh)?), origin.notice())
                }
            };
            print!("{}", install::render(&opts, tls.as_ref())?);
            if let Some(notice) = notice {
                eprintln!("{notice}");
            }
            Ok(())
        }
        Command::Check { timeout_secs } => {
            let results = check::run(std::time::Duration::from_secs(timeout_secs.max(1))).await;
            print!("{}", check::report(&results));
            if results.iter().any(|r| r.status == check::Status::Fail) {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Config { admin } => {
            let dump = show::fetch(&admin).await?;
            print!("{}", show::render(&dump));
            Ok(())
        }
    }
}

fn now_unix() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.as_secs() as i64).unwrap_or(0)
}
