//! Percentiles, progress lines and the results table.

use super::*;

/// Nearest-rank percentile; zero for no samples.
pub(crate) fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) started: Instant,
}

impl Progress {
    pub(crate) fn say(&self, line: String) {
        eprintln!("[{:>7.1} s] {line}", self.started.elapsed().as_secs_f64());
    }
}

pub(crate) fn report(args: &Args, base: &Baseline, sizes: &str, rows: &[Row], took: Duration) -> String {
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
