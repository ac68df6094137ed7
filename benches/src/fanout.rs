//! Control-plane fan-out benchmark.
//!
//! Starts the real `neutrino-control-plane` release binary as a separate process on a
//! generated mesh file (by default 500 services x 20 endpoints = 10,000 endpoints), then
//! connects N in-process proxy config clients (`neutrino_proxy::start_config` with a
//! stream source: the proxy's real stream, validate and publish code) in steps, and at
//! each step changes one endpoint's capacity several times. It reports, per step:
//!
//! - the time from the mesh file's rename until each proxy published (and therefore
//!   ACKed: the proxy sends its ACK right after publishing) the snapshot holding the
//!   change, p50 and p99 over all proxies and changes;
//! - the time until the last proxy had it, p50, p99 and max over the changes;
//! - the control plane's CPU time (utime + stime from `/proc/<pid>/stat`) during the
//!   changes, and its resident memory (`VmRSS`) per connected proxy.
//!
//! It must not change or reach into the control plane or the proxy (it only drives them
//! through their public interfaces: the mesh file, the Discovery stream and `/proc`),
//! and it must not leave the control plane running: the process is killed on every exit
//! path. It is a benchmark binary, not a test: it asserts nothing and never fails on slow
//! numbers, only on errors that make the numbers meaningless.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use neutrino_proto::{Node, resource::Body, type_url};
use neutrino_proxy::config::stream::StreamSettings;
use neutrino_proxy::config::{ConfigStore, Snapshot};
use neutrino_proxy::{ConfigSource, Handles};
use prost::Message as _;
use tokio::sync::watch;
use tokio::task::JoinSet;

const NAMESPACE: &str = "bench";
/// Capacity of every endpoint that has not been changed: `{cpu: "2", memory: 4Gi}`.
const BASE_CPU_MILLIS: u64 = 2000;
const MIB: f64 = 1024.0 * 1024.0;
/// How long the idle control plane's CPU use is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

#[derive(Debug, Parser)]
#[command(
    name = "fanout",
    about = "Control-plane fan-out benchmark: N proxies, 10,000 endpoints, one endpoint changes",
    long_about = "Control-plane fan-out benchmark. Build first with \
                  `cargo build --release -p neutrino-control-plane -p neutrino-benches`, or run \
                  `bash benches/run-fanout.sh`, which also raises the open-files limit."
)]
struct Args {
    /// Services in the generated mesh.
    #[arg(long, default_value_t = 500)]
    services: usize,
    /// Endpoints per service (10,000 endpoints in total by default).
    #[arg(long, default_value_t = 20)]
    endpoints_per_service: usize,
    /// Connected proxies at each step, ascending, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,500,1000,2000")]
    proxies: Vec<usize>,
    /// Endpoint changes measured at each step.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Proxies connected at a time; each batch is fully synced before the next starts.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Pause after every proxy has a change, before the next one (milliseconds).
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Give up on a batch's initial sync or on one change after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// The control-plane binary; default: `neutrino-control-plane` next to this binary.
    #[arg(long)]
    control_plane: Option<PathBuf>,
    /// How each change is made: `rename` a new file over the mesh file, or swap a
    /// `symlink` to it (as Kubernetes does for ConfigMap volumes).
    #[arg(long, value_enum, default_value_t = Update::Rename)]
    update: Update,
    /// The control plane's log filter; its log goes to a file whose end is shown on errors.
    #[arg(long, default_value = "info")]
    cp_log: String,
    /// Write the results table (markdown) here.
    #[arg(long, default_value = "benches/results/fanout.md")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tokio::select! {
        result = Box::pin(run(args)) => result,
        // Dropping `run` drops the control-plane guard, which kills the process.
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the control plane was stopped"),
    }
}

async fn run(args: Args) -> Result<()> {
    check_args(&args)?;
    let started = Instant::now();
    let progress = Progress { started };
    let ticks = clock_ticks_per_second();

    let dir = tempfile::Builder::new().prefix("neutrino-fanout-").tempdir().context("creating a temp dir")?;
    let mut mesh = MeshFile::create(dir.path(), args.update, args.services, args.endpoints_per_service).await?;
    progress.say(format!(
        "mesh: {} services x {} endpoints = {} endpoints, {:.1} MiB of YAML at {}",
        args.services,
        args.endpoints_per_service,
        args.services * args.endpoints_per_service,
        mesh.bytes as f64 / MIB,
        mesh.path.display()
    ));

    let binary = control_plane_binary(args.control_plane.as_deref())?;
    let cp = ControlPlane::start(&binary, &mesh.path, &dir.path().join("control-plane.log"), &args.cp_log)?;
    progress.say(format!(
        "control plane pid {} (grpc {}, admin {}), waiting for /ready",
        cp.pid(),
        cp.grpc_addr,
        cp.admin_addr
    ));
    cp.wait_ready(Duration::from_secs(args.timeout_secs), &progress).await?;
    // Let the initial parse's garbage settle before taking the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_base = proc_status_kib(cp.pid(), "VmRSS")?;
    let idle_before = proc_cpu_ticks(cp.pid())?;
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_pct = (proc_cpu_ticks(cp.pid())? - idle_before) as f64 / ticks / IDLE_WINDOW.as_secs_f64() * 100.0;
    progress.say(format!(
        "control plane ready; with 0 proxies: RSS {:.1} MiB, CPU {idle_pct:.0} % of a core while nothing changes",
        rss_base as f64 / 1024.0
    ));
    let baseline = Baseline { rss_kib: rss_base, idle_pct };

    let mut proxies: Vec<Handles> = Vec::new();
    let mut rows = Vec::new();
    let mut change_no = 0usize;
    let mut sizes = String::new();
    for &target in &args.proxies {
        let sync_started = Instant::now();
        let cpu_before_sync = proc_cpu_ticks(cp.pid())?;
        while proxies.len() < target {
            let batch_end = (proxies.len() + args.batch).min(target);
            let first_new = proxies.len();
            for i in first_new..batch_end {
                proxies.push(connect(&cp.grpc_addr, i));
            }
            wait_synced(&proxies[first_new..], first_new, args.services, &cp, &args, &progress).await?;
            progress.say(format!("  {}/{target} proxies synced", proxies.len()));
        }
        let sync_secs = sync_started.elapsed().as_secs_f64();
        if sizes.is_empty() {
            sizes = response_sizes(&proxies[0].store.load());
            progress.say(format!("initial responses per proxy: {sizes}"));
        }
        let sync_cpu = (proc_cpu_ticks(cp.pid())? - cpu_before_sync) as f64 / ticks;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = proc_status_kib(cp.pid(), "VmRSS")?;
        let connected = cp.connected_proxies()?;
        if connected != Some(target as u64) {
            bail!("the control plane reports {connected:?} connected proxies, expected {target}; {}", cp.diagnose());
        }
        progress.say(format!(
            "step {target}: synced in {sync_secs:.1} s; control plane RSS {:.1} MiB ({:.3} MiB/proxy)",
            rss as f64 / 1024.0,
            rss.saturating_sub(rss_base) as f64 / 1024.0 / target as f64
        ));

        let mut per_proxy = Vec::with_capacity(target * args.changes);
        let mut last_acks = Vec::with_capacity(args.changes);
        let cpu_before = proc_cpu_ticks(cp.pid())?;
        let own_cpu_before = proc_cpu_ticks(std::process::id())?;
        for _ in 0..args.changes {
            change_no += 1;
            let change = mesh.change(change_no);
            let latencies = measure_change(&mut mesh, &change, &proxies, &cp, &args).await?;
            let last = latencies.iter().copied().max().unwrap_or_default();
            progress.say(format!(
                "  change {change_no} ({} endpoint {}): p50 {} ms, last proxy {} ms",
                change.service,
                change.endpoint,
                ms(percentile(&latencies, 50.0)),
                ms(last)
            ));
            per_proxy.extend(latencies);
            last_acks.push(last);
            tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        }
        let cp_cpu = (proc_cpu_ticks(cp.pid())? - cpu_before) as f64 / ticks;
        let own_cpu = (proc_cpu_ticks(std::process::id())? - own_cpu_before) as f64 / ticks;
        let row = Row {
            proxies: target,
            sync_secs,
            sync_cpu,
            per_proxy_p50: percentile(&per_proxy, 50.0),
            per_proxy_p99: percentile(&per_proxy, 99.0),
            last_p50: percentile(&last_acks, 50.0),
            last_p99: percentile(&last_acks, 99.0),
            last_max: last_acks.iter().copied().max().unwrap_or_default(),
            cp_cpu_per_change: cp_cpu / args.changes as f64,
            bench_cpu_per_change: own_cpu / args.changes as f64,
            rss_mib: rss as f64 / 1024.0,
            mib_per_proxy: rss.saturating_sub(rss_base) as f64 / 1024.0 / target as f64,
            cp_peak_mib: proc_status_kib(cp.pid(), "VmHWM")? as f64 / 1024.0,
            bench_rss_mib: proc_status_kib(std::process::id(), "VmRSS")? as f64 / 1024.0,
        };
        progress.say(format!(
            "step {target}: per-proxy p50 {} ms p99 {} ms; last ACK p50 {} ms p99 {} ms; control plane {:.3} CPU-s/change",
            ms(row.per_proxy_p50),
            ms(row.per_proxy_p99),
            ms(row.last_p50),
            ms(row.last_p99),
            row.cp_cpu_per_change
        ));
        rows.push(row);
    }
    drop(cp);

    let report = report(&args, &baseline, &sizes, &rows, started.elapsed());
    println!("\n{report}");
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&args.out, &report).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("results written to {}", args.out.display());
    Ok(())
}

fn check_args(args: &Args) -> Result<()> {
    if args.services == 0 || args.endpoints_per_service == 0 {
        bail!("--services and --endpoints-per-service must be at least 1");
    }
    if args.services > 1 << 16
        || args.endpoints_per_service > 1000
        || args.services * args.endpoints_per_service > 1 << 24
    {
        bail!(
            "at most 65,536 services, 1000 endpoints per service and 16M endpoints in all \
             (virtual IPs are generated in 10.96.0.0/16, endpoint addresses in 10.0.0.0/8)"
        );
    }
    if args.proxies.is_empty() || args.proxies.contains(&0) || !args.proxies.is_sorted() {
        bail!("--proxies must be ascending counts of at least 1, e.g. 100,500,1000,2000");
    }
    if args.changes == 0 || args.batch == 0 {
        bail!("--changes and --batch must be at least 1");
    }
    let max = args.proxies.iter().copied().max().unwrap_or(0);
    // One socket per proxy here and one per proxy in the control plane (same limit, it
    // inherits ours), plus headroom for the runtime, the files and the admin probes.
    let needed = max as u64 + 256;
    if let Some(limit) = open_files_limit()?
        && limit < needed
    {
        bail!(
            "the open-files limit is {limit} but {max} proxies need about {needed}; raise it \
             (`ulimit -n 65536`, as benches/run-fanout.sh does) or use fewer --proxies"
        );
    }
    Ok(())
}

/// The control plane with no proxies connected.
#[derive(Debug)]
struct Baseline {
    rss_kib: u64,
    /// CPU use while nothing changes, in % of one core.
    idle_pct: f64,
}

/// One published step of the table.
#[derive(Debug)]
struct Row {
    proxies: usize,
    sync_secs: f64,
    sync_cpu: f64,
    per_proxy_p50: Duration,
    per_proxy_p99: Duration,
    last_p50: Duration,
    last_p99: Duration,
    last_max: Duration,
    cp_cpu_per_change: f64,
    bench_cpu_per_change: f64,
    rss_mib: f64,
    mib_per_proxy: f64,
    cp_peak_mib: f64,
    bench_rss_mib: f64,
}

// ---------------------------------------------------------------------------------------
// The mesh file

/// The generated mesh file and the changes made to it so far.
///
/// Layout under a temp dir: `mesh/mesh.yaml` is what the control plane reads (it watches
/// `mesh/`); new versions are written elsewhere first, so that the only event the
/// watched directory sees per change is the final rename:
/// - [`Update::Rename`]: `mesh/mesh.yaml` is a file; a new version is written to
///   `staging/mesh.yaml` and renamed over it.
/// - [`Update::Symlink`]: `mesh/mesh.yaml` is a symlink to `data/mesh-<n>.yaml`; a new
///   version is written there and a new symlink in `staging/` is renamed over the old
///   one (as Kubernetes updates ConfigMap volumes).
#[derive(Debug)]
struct MeshFile {
    path: PathBuf,
    staging: PathBuf,
    data: PathBuf,
    update: Update,
    /// Versions written so far (names the data files in symlink mode).
    version: usize,
    services: usize,
    per_service: usize,
    /// (service, endpoint) -> CPU millis, for endpoints whose capacity was changed.
    cpu: HashMap<(usize, usize), u64>,
    bytes: usize,
}

/// How a change reaches the mesh file; see [`MeshFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Update {
    Rename,
    Symlink,
}

impl Update {
    fn name(self) -> &'static str {
        match self {
            Update::Rename => "renaming a new file over the mesh file",
            Update::Symlink => "swapping a symlink to a new file",
        }
    }
}

/// One endpoint's capacity change, and how a proxy recognizes it.
#[derive(Debug, Clone)]
struct Change {
    /// Resource name of the service's `Endpoints`.
    service: String,
    endpoint: usize,
    address: String,
    port: u32,
    cpu_millis: u64,
}

fn service_name(s: usize) -> String {
    format!("svc-{s:05}")
}

impl MeshFile {
    /// Creates the directories and writes the first version.
    async fn create(root: &Path, update: Update, services: usize, per_service: usize) -> Result<Self> {
        let (dir, staging, data) = (root.join("mesh"), root.join("staging"), root.join("data"));
        for d in [&dir, &staging, &data] {
            tokio::fs::create_dir_all(d).await.with_context(|| format!("creating {}", d.display()))?;
        }
        let path = dir.join("mesh.yaml");
        let mut mesh =
            MeshFile { path, staging, data, update, version: 0, services, per_service, cpu: HashMap::new(), bytes: 0 };
        mesh.stage().await?.commit()?;
        Ok(mesh)
    }

    /// A distinct address and port for every endpoint.
    fn address(&self, s: usize, e: usize) -> (Ipv4Addr, u16) {
        let k = s * self.per_service + e;
        // `check_args` bounds k below 2^24 and e below 1000.
        let ip = Ipv4Addr::new(10, (k >> 16) as u8, (k >> 8) as u8, k as u8);
        (ip, 8000 + e as u16)
    }

    fn render(&self) -> String {
        let mut out = String::with_capacity(self.services * (300 + self.per_service * 120));
        out.push_str("# Generated by the neutrino fan-out benchmark.\nservices:\n");
        for s in 0..self.services {
            let name = service_name(s);
            let vip = Ipv4Addr::new(10, 96, (s >> 8) as u8, s as u8);
            let _ = writeln!(out, "  - name: {name}\n    namespace: {NAMESPACE}\n    virtualIP: {vip}");
            out.push_str("    ports: [{port: 80, targetPort: 8080, protocol: http}]\n    endpoints:\n");
            for e in 0..self.per_service {
                let (ip, port) = self.address(s, e);
                let cpu = self.cpu.get(&(s, e)).copied().unwrap_or(BASE_CPU_MILLIS);
                let zone = ["a", "b", "c"][e % 3];
                let _ = writeln!(
                    out,
                    "      - {{address: {ip}, port: {port}, zone: zone-{zone}, name: {name}-{e}, \
                     capacity: {{cpu: {cpu}m, memory: 4Gi}}}}"
                );
            }
        }
        out
    }

    /// Picks change number `n` (1-based): a different endpoint and a never-seen CPU value
    /// each time, and records it. The file is written by [`MeshFile::stage`].
    fn change(&mut self, n: usize) -> Change {
        let s = (n * 7919 + 13) % self.services;
        let e = n % self.per_service;
        let cpu_millis = BASE_CPU_MILLIS + 10 * n as u64;
        self.cpu.insert((s, e), cpu_millis);
        let (ip, port) = self.address(s, e);
        Change {
            service: format!("{NAMESPACE}/{}", service_name(s)),
            endpoint: e,
            address: ip.to_string(),
            port: u32::from(port),
            cpu_millis,
        }
    }

    /// Writes the current content outside the watched directory; [`Staged::commit`]
    /// then makes it the mesh file with one rename.
    async fn stage(&mut self) -> Result<Staged> {
        let text = self.render();
        self.bytes = text.len();
        let tmp = self.staging.join("mesh.yaml");
        match self.update {
            Update::Rename => {
                tokio::fs::write(&tmp, text).await.with_context(|| format!("writing {}", tmp.display()))?;
            }
            Update::Symlink => {
                let target = self.data.join(format!("mesh-{}.yaml", self.version));
                tokio::fs::write(&target, text).await.with_context(|| format!("writing {}", target.display()))?;
                std::os::unix::fs::symlink(&target, &tmp)
                    .with_context(|| format!("linking {} to {}", tmp.display(), target.display()))?;
                // The version before the current one is no longer linked or read.
                if let Some(old) = self.version.checked_sub(2) {
                    let old = self.data.join(format!("mesh-{old}.yaml"));
                    tokio::fs::remove_file(&old).await.with_context(|| format!("removing {}", old.display()))?;
                }
            }
        }
        self.version += 1;
        Ok(Staged { tmp, path: self.path.clone() })
    }
}

#[derive(Debug)]
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
}

impl Staged {
    fn commit(self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("renaming {} over {}", self.tmp.display(), self.path.display()))
    }
}

// ---------------------------------------------------------------------------------------
// Proxies

fn connect(grpc_addr: &SocketAddr, i: usize) -> Handles {
    neutrino_proxy::start_config(ConfigSource::Stream(StreamSettings {
        control_plane: grpc_addr.to_string(),
        node: Node { id: format!("bench-{i}"), namespace: NAMESPACE.into(), ..Default::default() },
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
    }))
}

/// Ready, and holding every service's resources of every type.
fn synced(s: &Snapshot, services: usize) -> bool {
    s.is_ready() && type_url::ALL.iter().all(|t| s.resources(t).map_or(0, |m| m.len()) == services)
}

/// True once the snapshot's `Endpoints` for the changed service carries the new capacity.
fn has_change(s: &Snapshot, c: &Change) -> bool {
    let Some(r) = s.resources(type_url::ENDPOINTS).and_then(|m| m.get(&c.service)) else { return false };
    let Some(Body::Endpoints(eps)) = &r.body else { return false };
    eps.endpoints
        .iter()
        .any(|e| e.address == c.address && e.port == c.port && e.capacity.is_some_and(|v| v.cpu_millis == c.cpu_millis))
}

/// Resolves at the first published snapshot (after `rx` was created) that satisfies
/// `done`, with the instant it was seen.
async fn first_snapshot(
    store: Arc<ConfigStore>,
    mut rx: watch::Receiver<u64>,
    done: impl Fn(&Snapshot) -> bool,
) -> Instant {
    loop {
        if done(&store.load()) {
            return Instant::now();
        }
        if rx.changed().await.is_err() {
            // The store (and its sender) outlives this task; nothing more will come.
            std::future::pending::<()>().await;
        }
    }
}

async fn wait_synced(
    batch: &[Handles],
    first_index: usize,
    services: usize,
    cp: &ControlPlane,
    args: &Args,
    progress: &Progress,
) -> Result<()> {
    let mut set = JoinSet::new();
    for h in batch {
        let rx = h.store.subscribe();
        set.spawn(first_snapshot(Arc::clone(&h.store), rx, move |s| synced(s, services)));
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut last_note = Instant::now();
    while !set.is_empty() {
        match tokio::time::timeout(Duration::from_secs(5), set.join_next()).await {
            Ok(Some(joined)) => {
                joined.context("a sync waiter panicked")?;
            }
            Ok(None) => break,
            Err(_) => {
                cp.check_alive()?;
                if Instant::now() >= deadline {
                    set.abort_all();
                    return Err(stuck(batch, first_index, cp, "the initial sync", args.timeout_secs));
                }
                if last_note.elapsed() >= Duration::from_secs(5) {
                    last_note = Instant::now();
                    progress.say(format!(
                        "    waiting: {} of proxies {}..{} not synced yet",
                        set.len(),
                        first_index,
                        first_index + batch.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Makes `change` and returns, per proxy, the time from the rename until the proxy
/// published a snapshot holding it.
async fn measure_change(
    mesh: &mut MeshFile,
    change: &Change,
    proxies: &[Handles],
    cp: &ControlPlane,
    args: &Args,
) -> Result<Vec<Duration>> {
    let staged = mesh.stage().await?;
    let mut set = JoinSet::new();
    for (i, h) in proxies.iter().enumerate() {
        // Subscribed before the rename, so no publish can be missed.
        let rx = h.store.subscribe();
        let c = change.clone();
        let store = Arc::clone(&h.store);
        set.spawn(async move { (i, first_snapshot(store, rx, move |s| has_change(s, &c)).await) });
    }
    // Let the waiters make their first check (the change is not there yet) before t0.
    // One that has not run by then only reports later than the truth, never earlier.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    staged.commit()?;
    let deadline = tokio::time::Instant::from_std(t0 + Duration::from_secs(args.timeout_secs));
    let mut latencies = Vec::with_capacity(proxies.len());
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(joined)) => {
                let (_, seen) = joined.context("a change waiter panicked")?;
                latencies.push(seen.saturating_duration_since(t0));
            }
            Ok(None) => break,
            Err(_) => {
                set.abort_all();
                cp.check_alive()?;
                let what = format!("change of {} endpoint {}", change.service, change.endpoint);
                return Err(stuck(proxies, 0, cp, &what, args.timeout_secs));
            }
        }
    }
    Ok(latencies)
}

/// The size of what a proxy received on connecting, per type: resources and encoded KiB
/// (the `DiscoveryResponse` that carried them is a few bytes per resource larger).
fn response_sizes(s: &Snapshot) -> String {
    let mut out = Vec::new();
    for t in type_url::ALL {
        let map = s.resources(t).map(|m| m.values().collect::<Vec<_>>()).unwrap_or_default();
        let bytes: usize = map.iter().map(|r| r.encoded_len()).sum();
        out.push(format!("{} {} ({:.0} KiB)", map.len(), type_url::short(t), bytes as f64 / 1024.0));
    }
    out.join(", ")
}

/// Explains why proxies did not get something in time, naming EMFILE when that is it.
fn stuck(proxies: &[Handles], first_index: usize, cp: &ControlPlane, what: &str, secs: u64) -> anyhow::Error {
    let mut states: HashMap<String, usize> = HashMap::new();
    let mut sample = None;
    for (i, h) in proxies.iter().enumerate() {
        let st = h.stream.load();
        *states.entry(st.state.clone()).or_default() += 1;
        if sample.is_none()
            && let Some(e) = &st.last_error
        {
            sample = Some(format!("bench-{}: {e}", first_index + i));
        }
    }
    let mut msg = format!("{what} did not reach every proxy within {secs} s; stream states {states:?}");
    if let Some(s) = sample {
        let _ = write!(msg, "; e.g. {s}");
    }
    let _ = write!(msg, "; control plane: {}", cp.diagnose());
    for (who, pid) in [("this benchmark", std::process::id()), ("the control plane", cp.pid())] {
        if let (Ok(open), Ok(Some(limit))) = (open_files(pid), open_files_limit_of(pid))
            && open + 16 >= limit
        {
            let _ = write!(
                msg,
                "; {who} has {open} files open of a limit of {limit}: it hit EMFILE (too many open files); \
                 raise the limit with `ulimit -n 65536` (benches/run-fanout.sh does) or use fewer --proxies"
            );
        }
    }
    anyhow!(msg)
}

// ---------------------------------------------------------------------------------------
// The control plane process

/// The running control plane; killed when dropped, on every exit path.
#[derive(Debug)]
struct ControlPlane {
    child: Child,
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    log: PathBuf,
}

fn control_plane_binary(flag: Option<&Path>) -> Result<PathBuf> {
    let path = match flag {
        Some(p) => p.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("finding this benchmark's own path")?;
            let dir = exe.parent().ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
            dir.join("neutrino-control-plane")
        }
    };
    if !path.is_file() {
        bail!(
            "control-plane binary {} not found; build it with `cargo build --release -p neutrino-control-plane` \
             (or run `bash benches/run-fanout.sh`, which builds everything)",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free local port")?;
    l.local_addr().context("reading a bound port")
}

impl ControlPlane {
    fn start(binary: &Path, mesh_file: &Path, log: &Path, filter: &str) -> Result<Self> {
        let grpc_addr = free_port()?;
        let admin_addr = free_port()?;
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("sharing {}", log.display()))?;
        let child = Command::new(binary)
            .arg("--mesh-file")
            .arg(mesh_file)
            .args(["--grpc-addr", &grpc_addr.to_string(), "--admin-addr", &admin_addr.to_string()])
            .args(["--log", filter])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(ControlPlane { child, grpc_addr, admin_addr, log: log.to_path_buf() })
    }

    /// What can be seen of the control plane from outside, for error messages: whether
    /// it accepts connections and answers `/ready`, and the end of its log.
    fn diagnose(&self) -> String {
        let grpc = match TcpStream::connect_timeout(&self.grpc_addr, Duration::from_secs(2)) {
            Ok(_) => "accepts connections".to_string(),
            Err(e) => format!("does not accept connections ({e})"),
        };
        let ready = match http_get(self.admin_addr, "/ready") {
            Ok((status, body)) => format!("HTTP {status} {}", body.trim()),
            Err(e) => format!("{e:#}"),
        };
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n    ");
        format!("gRPC port {} {grpc}; /ready: {ready}; last lines of its log:\n    {tail}", self.grpc_addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&self) -> Result<()> {
        // /proc/<pid>/stat state "Z" (or no entry) means it exited; `try_wait` needs &mut.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()));
        match stat.as_deref().ok().and_then(|s| s.rsplit_once(')')).map(|(_, rest)| rest.trim_start()) {
            Some(rest) if !rest.starts_with('Z') && !rest.starts_with('X') => Ok(()),
            _ => bail!("the control plane (pid {}) exited; {}", self.pid(), self.diagnose()),
        }
    }

    async fn wait_ready(&self, timeout: Duration, progress: &Progress) -> Result<()> {
        let started = Instant::now();
        let mut last_note = Instant::now();
        loop {
            self.check_alive()?;
            let last = match http_get(self.admin_addr, "/ready") {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > timeout {
                bail!("the control plane was not ready after {timeout:?} (last: {last})");
            }
            if last_note.elapsed() >= Duration::from_secs(2) {
                last_note = Instant::now();
                progress.say(format!("  still waiting for /ready ({last})"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `neutrino_cp_connected_proxies` from `/metrics`.
    fn connected_proxies(&self) -> Result<Option<u64>> {
        let (status, body) = http_get(self.admin_addr, "/metrics")?;
        if status != 200 {
            bail!("control plane /metrics answered HTTP {status}");
        }
        Ok(body
            .lines()
            .find_map(|l| l.strip_prefix("neutrino_cp_connected_proxies "))
            .and_then(|v| v.trim().parse().ok()))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal blocking HTTP/1.1 GET (the admin server is local and answers at once).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut conn = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    conn.set_read_timeout(Some(timeout)).context("setting a read timeout")?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("sending GET {path}"))?;
    let mut text = String::new();
    conn.read_to_string(&mut text).with_context(|| format!("reading the answer to GET {path}"))?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: not an HTTP answer: {:?}", text.lines().next()))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------
// /proc

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let field = |n: usize| -> Result<u64> {
        fields.get(n - 3).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("{path}: no field {n}"))
    };
    Ok(field(14)? + field(15)?)
}

/// A "kB" line of /proc/<pid>/status, e.g. VmRSS or VmHWM, in KiB.
fn proc_status_kib(pid: u32, key: &str) -> Result<u64> {
    kib_line(&format!("/proc/{pid}/status"), key)
}

/// The value of a "Key:   123 kB" line of a /proc file.
fn kib_line(path: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("{path} has no {key} line"))
}

/// Clock ticks per second for /proc CPU times: `getconf CLK_TCK`, or 100 (Linux's
/// USER_HZ on every common architecture) if that cannot be run.
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

fn open_files_limit() -> Result<Option<u64>> {
    open_files_limit_of(std::process::id())
}

/// The soft "Max open files" limit of a process; None when unlimited.
fn open_files_limit_of(pid: u32) -> Result<Option<u64>> {
    let path = format!("/proc/{pid}/limits");
    let limits = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| anyhow!("{path} has no \"Max open files\" line"))?;
    Ok(soft.parse().ok())
}

fn open_files(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path).with_context(|| format!("listing {path}"))?.count() as u64)
}

// ---------------------------------------------------------------------------------------
// Numbers and output

/// Nearest-rank percentile; zero for no samples.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

#[derive(Debug)]
struct Progress {
    started: Instant,
}

impl Progress {
    fn say(&self, line: String) {
        eprintln!("[{:>7.1} s] {line}", self.started.elapsed().as_secs_f64());
    }
}

fn report(args: &Args, base: &Baseline, sizes: &str, rows: &[Row], took: Duration) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_gib = kib_line("/proc/meminfo", "MemTotal").map(|k| k as f64 / MIB).unwrap_or(0.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Mesh: {} services x {} endpoints = {} endpoints; {} changes per step (one endpoint's CPU capacity each); \
         changes made by {}; machine: {cores} cores, {mem_gib:.1} GiB; control plane with 0 proxies: RSS {:.1} MiB, \
         {:.0} % of a core while nothing changes; initial responses per proxy: {sizes}; run took {:.0} s.\n",
        args.services,
        args.endpoints_per_service,
        args.services * args.endpoints_per_service,
        args.changes,
        args.update.name(),
        base.rss_kib as f64 / 1024.0,
        base.idle_pct,
        took.as_secs_f64()
    );
    out.push_str(
        "| proxies | per-proxy ACK p50 (ms) | per-proxy ACK p99 (ms) | all ACKed p50 (ms) | all ACKed p99 (ms) \
         | all ACKed max (ms) | CP CPU per change (s) | CP RSS (MiB) | CP MiB per proxy | CP peak RSS (MiB) \
         | initial sync of new proxies (s / CP CPU-s) | bench CPU per change (s) | bench RSS (MiB) |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.3} | {:.0} | {:.3} | {:.0} | {:.1} / {:.1} | {:.3} | {:.0} |",
            r.proxies,
            ms(r.per_proxy_p50),
            ms(r.per_proxy_p99),
            ms(r.last_p50),
            ms(r.last_p99),
            ms(r.last_max),
            r.cp_cpu_per_change,
            r.rss_mib,
            r.mib_per_proxy,
            r.cp_peak_mib,
            r.sync_secs,
            r.sync_cpu,
            r.bench_cpu_per_change,
            r.bench_rss_mib
        );
    }
    if let Some(r) = rows.last() {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let _ = writeln!(
            out,
            "\nAt {} proxies: all-ACKed p99 {} ms (goal < 1000 ms: {}); {:.3} MiB of control-plane memory per proxy \
             (goal <= 1 MiB: {}).",
            r.proxies,
            ms(r.last_p99),
            verdict(r.last_p99 < Duration::from_secs(1)),
            r.mib_per_proxy,
            verdict(r.mib_per_proxy <= 1.0)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use neutrino_control_plane::watch::mesh_file;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=100).map(|i| i * MS).collect();
        assert_eq!(percentile(&s, 50.0), 50 * MS);
        assert_eq!(percentile(&s, 99.0), 99 * MS);
        assert_eq!(percentile(&[7 * MS], 99.0), 7 * MS);
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[tokio::test]
    async fn generated_mesh_has_distinct_endpoints_and_changes_land_in_the_watched_file() {
        for update in [Update::Rename, Update::Symlink] {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut m = MeshFile::create(dir.path(), update, 3, 4).await.expect("mesh file");
            let read = |m: &MeshFile| {
                let bytes = std::fs::read(&m.path).expect("readable");
                mesh_file::parse(&m.path, &bytes).expect("valid mesh")
            };
            let before = read(&m);
            assert_eq!(before.services.len(), 3);
            assert!(before.services.values().all(|s| s.endpoints.len() == 4));
            let mut c = m.change(1);
            for n in 2..=3 {
                m.stage().await.expect("staged").commit().expect("renamed");
                c = m.change(n);
            }
            m.stage().await.expect("staged").commit().expect("renamed");
            let after = read(&m);
            let changed: Vec<_> = after
                .services
                .iter()
                .flat_map(|(k, s)| s.endpoints.iter().map(move |e| (k, e)))
                .filter(|(_, e)| e.capacity.cpu_millis != BASE_CPU_MILLIS)
                .collect();
            assert_eq!(changed.len(), 3, "{update:?}");
            let last = changed.iter().find(|(k, _)| **k == c.service).expect("the last change").1;
            assert_eq!((last.address.to_string(), u32::from(last.port)), (c.address.clone(), c.port));
            assert_eq!(last.capacity.cpu_millis, c.cpu_millis);
            let files = std::fs::read_dir(dir.path().join("data")).expect("data dir").count();
            assert_eq!(files, if update == Update::Symlink { 2 } else { 0 }, "old versions are removed");
        }
    }
}
