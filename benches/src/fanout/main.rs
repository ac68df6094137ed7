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

mod control_plane;
mod mesh;
mod proxies;
mod report;

use control_plane::*;
use mesh::*;
use proxies::*;
use report::*;

pub(crate) const NAMESPACE: &str = "bench";
/// Capacity of every endpoint that has not been changed: `{cpu: "2", memory: 4Gi}`.
pub(crate) const BASE_CPU_MILLIS: u64 = 2000;
pub(crate) const MIB: f64 = 1024.0 * 1024.0;
/// How long the idle control plane's CPU use is sampled.
pub(crate) const IDLE_WINDOW: Duration = Duration::from_secs(3);

#[derive(Debug, Parser)]
#[command(
    name = "fanout",
    about = "Control-plane fan-out benchmark: N proxies, 10,000 endpoints, one endpoint changes",
    long_about = "Control-plane fan-out benchmark. Build first with \
                  `cargo build --release -p neutrino-control-plane -p neutrino-benches`, or run \
                  `bash benches/run-fanout.sh`, which also raises the open-files limit."
)]
pub(crate) struct Args {
    /// Services in the generated mesh.
    #[arg(long, default_value_t = 500)]
    pub(crate) services: usize,
    /// Endpoints per service (10,000 endpoints in total by default).
    #[arg(long, default_value_t = 20)]
    pub(crate) endpoints_per_service: usize,
    /// Connected proxies at each step, ascending, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,500,1000,2000")]
    pub(crate) proxies: Vec<usize>,
    /// Endpoint changes measured at each step.
    #[arg(long, default_value_t = 10)]
    pub(crate) changes: usize,
    /// Proxies connected at a time; each batch is fully synced before the next starts.
    #[arg(long, default_value_t = 100)]
    pub(crate) batch: usize,
    /// Pause after every proxy has a change, before the next one (milliseconds).
    #[arg(long, default_value_t = 500)]
    pub(crate) settle_ms: u64,
    /// Give up on a batch's initial sync or on one change after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) timeout_secs: u64,
    /// The control-plane binary; default: `neutrino-control-plane` next to this binary.
    #[arg(long)]
    pub(crate) control_plane: Option<PathBuf>,
    /// How each change is made: `rename` a new file over the mesh file, or swap a
    /// `symlink` to it (as Kubernetes does for ConfigMap volumes).
    #[arg(long, value_enum, default_value_t = Update::Rename)]
    pub(crate) update: Update,
    /// The control plane's log filter; its log goes to a file whose end is shown on errors.
    #[arg(long, default_value = "info")]
    pub(crate) cp_log: String,
    /// Write the results table (markdown) here.
    #[arg(long, default_value = "benches/results/fanout.md")]
    pub(crate) out: PathBuf,
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

pub(crate) async fn run(args: Args) -> Result<()> {
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

pub(crate) fn check_args(args: &Args) -> Result<()> {
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
pub(crate) struct Baseline {
    pub(crate) rss_kib: u64,
    /// CPU use while nothing changes, in % of one core.
    pub(crate) idle_pct: f64,
}

/// One published step of the table.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) proxies: usize,
    pub(crate) sync_secs: f64,
    pub(crate) sync_cpu: f64,
    pub(crate) per_proxy_p50: Duration,
    pub(crate) per_proxy_p99: Duration,
    pub(crate) last_p50: Duration,
    pub(crate) last_p99: Duration,
    pub(crate) last_max: Duration,
    pub(crate) cp_cpu_per_change: f64,
    pub(crate) bench_cpu_per_change: f64,
    pub(crate) rss_mib: f64,
    pub(crate) mib_per_proxy: f64,
    pub(crate) cp_peak_mib: f64,
    pub(crate) bench_rss_mib: f64,
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
