//! `neutrino demo`: the local demo mesh. Starts the real control plane, three sample
//! backends of different sizes each with its sidecar proxy, and a client sidecar, all
//! on loopback (no iptables needed: the client uses its sidecar as an explicit HTTP
//! proxy, and each backend sidecar forwards inbound traffic to its app). Then it sends
//! a mixed workload and reports where each kind of work went, then shows the trace of
//! one heavy request (`traces`: a built-in OTLP/gRPC receiver, or `--otlp-endpoint`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::traces::receive::Receiver;
use crate::{show, traces, workload};

/// `neutrino demo`'s flags.
#[derive(Debug)]
pub struct Options {
    pub mesh_file: PathBuf,
    pub keep_running: bool,
    pub requests: usize,
    /// Send traces to this collector; None: the demo's own receiver.
    pub otlp_endpoint: Option<String>,
    /// Where the received traces are written (Jaeger JSON).
    pub trace_file: PathBuf,
}

/// Where the processes' spans go.
enum Traces {
    /// The demo's own receiver.
    Received(Receiver),
    /// A collector the user runs (`--otlp-endpoint`).
    Sent(String),
    /// Nowhere: the receiver could not start (a warning was printed).
    Off,
}

impl Traces {
    async fn start(endpoint: Option<String>) -> Traces {
        if let Some(e) = endpoint.filter(|e| !e.trim().is_empty()) {
            return Traces::Sent(e);
        }
        match Receiver::start().await {
            Ok(r) => Traces::Received(r),
            Err(e) => {
                println!("warning: {e}; the demo runs without traces");
                Traces::Off
            }
        }
    }

    /// The environment of every process the demo starts.
    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Traces::Received(r) => traces::exporter_env(&r.endpoint()).into(),
            Traces::Sent(e) => traces::exporter_env(e).into(),
            Traces::Off => vec![],
        }
    }

    fn describe(&self) -> String {
        match self {
            Traces::Received(r) => format!(", traces to the demo's receiver at {}", r.endpoint()),
            Traces::Sent(e) => format!(", traces to {e}"),
            Traces::Off => String::new(),
        }
    }
}

/// A backend of examples/mesh.yaml: its app port, and its sidecar's inbound port (the
/// endpoint address in the mesh file), admin port and outbound port.
pub struct DemoBackend {
    pub name: &'static str,
    pub app: u16,
    pub inbound: u16,
    pub admin: u16,
    pub outbound: u16,
}

pub const BACKENDS: [DemoBackend; 3] = [
    DemoBackend { name: "orders-small", app: 18081, inbound: 28081, admin: 15121, outbound: 15101 },
    DemoBackend { name: "orders-medium", app: 18082, inbound: 28082, admin: 15122, outbound: 15102 },
    DemoBackend { name: "orders-large", app: 18083, inbound: 28083, admin: 15123, outbound: 15103 },
];

/// Kills the child when the demo ends, however it ends.
struct Running(Child, String);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the neutrino binary")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!("{} not found next to {}; build it with `cargo build --release --workspace --bins`", name, me.display());
    }
    Ok(path)
}

fn start(name: &str, binary: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Running> {
    let mut command = Command::new(sibling(binary)?);
    if !env.is_empty() {
        for var in traces::CLEARED_ENV {
            command.env_remove(var);
        }
    }
    let child = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NEUTRINO_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Running(child, name.to_string()))
}

async fn wait_ready(what: &str, url: &str, procs: &mut [Running]) -> anyhow::Result<()> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        for p in procs.iter_mut() {
            if let Some(status) = p.0.try_wait()? {
                bail!("{} exited ({status}) before {what} was ready; see its log above", p.1);
            }
        }
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(1)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "{what} not ready after 30 s ({url}); are ports 15001-15020, 15101-15123, 18081-18083 and 28081-28083 free?"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let Options { mesh_file, keep_running, requests, otlp_endpoint, trace_file } = opts;
    let mesh = mesh_file.to_str().context("mesh file path is not UTF-8")?;
    if !mesh_file.exists() {
        bail!("mesh file {mesh} not found; run from the repository root or pass --mesh-file");
    }
    // The CA and the bootstrap tokens live in a directory of their own, removed at the end.
    let secrets =
        tempfile::Builder::new().prefix("neutrino-demo-").tempdir().context("creating a temporary directory")?;
    let path = |name: &str| secrets.path().join(name).to_string_lossy().into_owned();
    std::fs::write(path("tokens"), "demo-orders-token shop/orders\ndemo-client-token shop/client\n")
        .context("writing the demo's bootstrap tokens")?;
    std::fs::write(path("token-orders"), "demo-orders-token\n").context("writing a demo token")?;
    std::fs::write(path("token-client"), "demo-client-token\n").context("writing a demo token")?;
    let (ca_dir, tokens, anchors) = (path("ca"), path("tokens"), path("ca/anchors.pem"));
    let mut procs = Vec::new();
    let sink = Traces::start(otlp_endpoint).await;
    let env = sink.env();
    println!(
        "[1/4] control plane on {mesh} (gRPC 127.0.0.1:15010, TLS 127.0.0.1:15012, admin 127.0.0.1:15014), with a CA in {ca_dir}{}",
        sink.describe()
    );
    procs.push(start(
        "neutrino-control-plane",
        "neutrino-control-plane",
        &[
            "--mesh-file",
            mesh,
            "--grpc-addr",
            "127.0.0.1:15010",
            "--tls-grpc-addr",
            "127.0.0.1:15012",
            "--admin-addr",
            "127.0.0.1:15014",
            "--ca-dir",
            &ca_dir,
            "--bootstrap-tokens",
            &tokens,
        ],
        &env,
    )?);
    wait_ready("the control plane", "http://127.0.0.1:15014/ready", &mut procs).await?;
    let (orders_token, client_token) = (path("token-orders"), path("token-client"));
    let identity = |token: &'static str| -> Vec<String> {
        let file = if token == "orders" { orders_token.clone() } else { client_token.clone() };
        ["--control-plane", "127.0.0.1:15012", "--ca-file", &anchors, "--token-file", &file, "--service-account", token]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };

    println!("[2/4] three backends (sample app + sidecar each): small 1 CPU, medium 2 CPU, large 4 CPU + 1 GPU");
    for b in &BACKENDS {
        let app = format!("127.0.0.1:{}", b.app);
        procs.push(start(b.name, "neutrino-sample-app", &["serve", "--http", &app, "--name", b.name], &[])?);
        let (admin, inbound, outbound) =
            (format!("127.0.0.1:{}", b.admin), format!("127.0.0.1:{}", b.inbound), format!("127.0.0.1:{}", b.outbound));
        let id = identity("orders");
        let mut args: Vec<&str> = id.iter().map(String::as_str).collect();
        args.extend([
            "--admin-addr",
            &admin,
            "--inbound-addr",
            &inbound,
            "--outbound-addr",
            &outbound,
            "--inbound-app-addr",
            &app,
            "--pod",
            b.name,
            "--namespace",
            "shop",
        ]);
        procs.push(start(&format!("{} sidecar", b.name), "neutrino-proxy", &args, &env)?);
    }
    println!("[3/4] the client's sidecar (outbound 127.0.0.1:15001, admin 127.0.0.1:15020), identity shop/client");
    let id = identity("client");
    let mut args: Vec<&str> = id.iter().map(String::as_str).collect();
    args.extend([
        "--admin-addr",
        "127.0.0.1:15020",
        "--outbound-addr",
        "127.0.0.1:15001",
        "--inbound-addr",
        "127.0.0.1:15006",
        "--pod",
        "client",
        "--namespace",
        "shop",
        "--queue-timeout-ms",
        "2000",
    ]);
    procs.push(start("client sidecar", "neutrino-proxy", &args, &env)?);
    for b in &BACKENDS {
        wait_ready(b.name, &format!("http://127.0.0.1:{}/ready", b.admin), &mut procs).await?;
    }
    wait_ready("the client sidecar", "http://127.0.0.1:15020/ready", &mut procs).await?;
    let dump = show::fetch("127.0.0.1:15020").await?;
    print!("\nwhat the client's sidecar received:\n{}", show::render(&dump));

    println!("\n[4/4] sending {requests} requests (mixed light and heavy operations) through the client's sidecar");
    let report = workload::run(&dump, "http://127.0.0.1:15001", requests).await?;
    print!("{report}");
    print!("{}", mtls_summary().await);
    let admins: Vec<u16> = BACKENDS.iter().map(|b| b.admin).chain([15020]).collect();
    match &sink {
        Traces::Received(receiver) => print!("{}", traces::summary(receiver, &trace_file).await),
        Traces::Sent(endpoint) => print!("{}", traces::external_summary(endpoint, &admins).await),
        Traces::Off => {}
    }
    if keep_running {
        println!(
            "\nthe mesh is still running; try:\n  curl -x http://127.0.0.1:15001 http://orders.shop/orders/1\n  neutrino config\nCtrl-C to stop."
        );
        tokio::signal::ctrl_c().await?;
        if let Traces::Received(receiver) = &sink {
            // The traces of what was sent meanwhile too.
            let export = traces::jaeger::convert(&receiver.batches());
            match traces::jaeger::write(&trace_file, &export) {
                Ok(()) => println!("all {} traces written to {}", export.data.len(), trace_file.display()),
                Err(e) => println!("warning: {e}"),
            }
        }
    }
    Ok(())
}

/// What mTLS did during the demo, from the sidecars' own metrics.
async fn mtls_summary() -> String {
    let scrape = |port: u16| async move {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let text = match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let sum = |name: &str, label: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l.contains(label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        (
            sum("neutrino_proxy_tls_handshakes_total", "result=\"ok\""),
            sum("neutrino_proxy_plaintext_accepted_total", ""),
            sum("neutrino_proxy_policy_denials_total", ""),
        )
    };
    let (client_ok, _, _) = scrape(15020).await;
    let (mut inbound_ok, mut plaintext, mut denied) = (0.0, 0.0, 0.0);
    for b in &BACKENDS {
        let (ok, p, d) = scrape(b.admin).await;
        inbound_ok += ok;
        plaintext += p;
        denied += d;
    }
    format!(
        "\nmTLS: the client's sidecar (spiffe://cluster.local/ns/shop/sa/client) made {client_ok:.0} verified \
         handshakes to backends running as spiffe://cluster.local/ns/shop/sa/orders; the backends' sidecars accepted \
         {inbound_ok:.0}, plaintext connections accepted: {plaintext:.0}, policy denials: {denied:.0}.\n"
    )
}
