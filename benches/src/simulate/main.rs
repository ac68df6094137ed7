//! Selection simulator (issue 5): a discrete-event simulation, in virtual time and
//! seeded, of 100 backends and 20-50 client proxies, each proxy running either the
//! proxy's own selection code (`neutrino_proxy::select::endpoints::EndpointSet::pick_at`,
//! fed by in-band and pushed load reports) or a baseline (round robin, random,
//! least-request P2C, peak-EWMA P2C, capacity-weighted round robin, an oracle), under a
//! load sweep and injected faults. It writes `simulate.md` (tables and the goals),
//! `simulate.csv` (every run) and `simulate-divert.csv` to `--out`; the plots are drawn
//! from the CSV by `benches/simulate-plot.py` (`benches/run-simulate.sh` does both).
//!
//! Steps: `scenarios` describes the runs, `sim` runs one (with `model`'s backends,
//! `policies`' balancers, `events`' queue and `rng`'s numbers), `metrics` measures it,
//! `report` writes the results. The simulator must not copy or alter the proxy's
//! selection logic, and it is a benchmark: it asserts nothing about the goals, it
//! reports them.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;

mod events;
mod metrics;
mod model;
mod policies;
mod report;
mod rng;
mod scenarios;
mod sim;

use policies::Policy;
use report::Run;

#[derive(Debug, Parser)]
#[command(
    name = "simulate",
    about = "Selection simulator: Neutrino's selection code against baselines, in virtual time",
    long_about = "Selection simulator. Build with `cargo build --release -p neutrino-benches --bin simulate`, \
                  or run `bash benches/run-simulate.sh`, which also draws the plots."
)]
struct Args {
    /// Seeds per point (seeds 1..=N).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Fewer loads (0.5, 0.8, 1.2), shorter runs, one seed unless --seeds is given.
    #[arg(long)]
    quick: bool,
    /// Where simulate.md and the CSV files go.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Only these scenarios (comma-separated keys: hetero, homog, slow, failfast, cold,
    /// slowmid, stall, delay1s, delay5s, delay30s, hetero-ttl250, slow-ttl250).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these policies (comma-separated: round-robin, random, least-request,
    /// peak-ewma, weighted-rr, oracle, neutrino, neutrino-exact).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Only these loads (comma-separated).
    #[arg(long, value_delimiter = ',')]
    loads: Vec<f64>,
    /// Client proxies (20 to 50 in the issue).
    #[arg(long, default_value_t = scenarios::CLIENTS)]
    clients: usize,
    /// What-if experiment: load reports expire after this many ms instead of the
    /// proxy's REPORT_TTL (emulated by handing reports to the proxy backdated).
    #[arg(long)]
    report_ttl_ms: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, Clone)]
struct Job {
    scenario: usize,
    load: f64,
    policy: Policy,
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let seeds = if args.quick && !std::env::args().any(|a| a.starts_with("--seeds")) { 1 } else { args.seeds };
    let mut wanted_policies = Vec::new();
    for p in &args.policies {
        wanted_policies.push(Policy::parse(p).with_context(|| format!("unknown policy {p:?}"))?);
    }
    let scenarios: Vec<_> =
        scenarios::all(args.quick).into_iter().filter(|s| args.only.is_empty() || args.only.contains(&s.key)).collect();
    if scenarios.is_empty() {
        bail!("no scenario matches --only {:?}", args.only);
    }
    let mut jobs = Vec::new();
    for (i, sc) in scenarios.iter().enumerate() {
        for &load in &sc.loads {
            if !args.loads.is_empty() && !args.loads.iter().any(|l| (l - load).abs() < 1e-9) {
                continue;
            }
            for &policy in &sc.policies {
                if !wanted_policies.is_empty() && !wanted_policies.contains(&policy) {
                    continue;
                }
                for seed in 1..=seeds {
                    jobs.push(Job { scenario: i, load, policy, seed });
                }
            }
        }
    }
    // Longest first (overload and long runs), so the last runs finish together.
    jobs.sort_by(|a, b| {
        let cost = |j: &Job| j.load * scenarios[j.scenario].duration_s;
        cost(b).total_cmp(&cost(a))
    });
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    eprintln!(
        "simulate: {} runs ({} scenarios, {seeds} seed(s), {} clients) on {threads} threads",
        jobs.len(),
        scenarios.len(),
        args.clients
    );
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let results: Mutex<Vec<Run>> = Mutex::new(Vec::with_capacity(jobs.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let sc = &scenarios[job.scenario];
                    let mut setup = sc.setup(job.load, job.policy, job.seed, args.clients);
                    if args.report_ttl_ms.is_some() {
                        setup.report_ttl_ms = args.report_ttl_ms;
                    }
                    let m = sim::run(&setup);
                    let done = finished.fetch_add(1, Ordering::Relaxed) + 1;
                    eprintln!(
                        "[{done:>4}/{}] {:>6.1} s  {:<9} load {:.2} {:<13} seed {}: p50 {:>5.0} p99 {:>6.0} ms, \
                         errors {:>5.2} %, util max/avg {:.3}  ({:.1} s, {:.1} M events)",
                        jobs.len(),
                        started.elapsed().as_secs_f64(),
                        sc.key,
                        job.load,
                        job.policy.name(),
                        job.seed,
                        m.p50,
                        m.p99,
                        m.errors * 100.0,
                        m.util_max_avg,
                        m.wall_s,
                        m.events as f64 / 1e6
                    );
                    let run = Run { scenario: sc.key.clone(), load: job.load, policy: job.policy, seed: job.seed, m };
                    results.lock().expect("results lock").push(run);
                }
            });
        }
    });
    let mut runs = results.into_inner().expect("results lock");
    runs.sort_by(|a, b| {
        (&a.scenario, a.policy, a.seed).cmp(&(&b.scenario, b.policy, b.seed)).then(a.load.total_cmp(&b.load))
    });
    let took = started.elapsed().as_secs_f64();
    let header = format!(
        "{} runs, seeds 1..={seeds}, {} client proxies, {} mode; {took:.0} s on {threads} threads. \
         How it is modelled: benches/README.md, \"Selection simulator\".",
        runs.len(),
        args.clients,
        if args.quick { "quick" } else { "full" }
    );
    let md = report::markdown(&scenarios, &runs, &header);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let write = |name: &str, text: &str| -> Result<()> {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("simulate.md", &md)?;
    write("simulate.csv", &report::csv(&runs))?;
    write("simulate-divert.csv", &report::divert_csv(&runs))?;
    println!("{md}");
    eprintln!(
        "simulate: done in {took:.0} s; wrote {}/simulate.md, simulate.csv, simulate-divert.csv",
        args.out.display()
    );
    Ok(())
}
