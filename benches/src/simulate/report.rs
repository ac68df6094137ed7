//! The results: per-run CSV rows (for the plots), the markdown tables, and the goals
//! checked against the figures.
//!
//! Pure formatting of finished runs: it must not run simulations, and it states what
//! the numbers say, met or missed, without adjusting them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::metrics::{RunMetrics, Spread};
use crate::policies::Policy;
use crate::scenarios::Scenario;

/// One finished run.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: String,
    pub load: f64,
    pub policy: Policy,
    pub seed: u64,
    pub m: RunMetrics,
}

/// Runs grouped by (scenario, load in thousandths, policy).
type Groups<'a> = BTreeMap<(String, u32, Policy), Vec<&'a RunMetrics>>;

fn group(runs: &[Run]) -> Groups<'_> {
    let mut g: Groups<'_> = BTreeMap::new();
    for r in runs {
        g.entry((r.scenario.clone(), (r.load * 1000.0).round() as u32, r.policy)).or_default().push(&r.m);
    }
    g
}

fn spread<'a>(ms: &[&'a RunMetrics], f: impl Fn(&'a RunMetrics) -> f64) -> Option<Spread> {
    Spread::of(ms.iter().map(|m| f(m)))
}

fn opt(v: Option<f64>) -> f64 {
    v.unwrap_or(f64::NAN)
}

fn num(x: f64, digits: usize) -> String {
    if x.is_finite() { format!("{x:.digits$}") } else { "-".to_string() }
}

/// "mean (min-max)" when seeds differ, else the mean.
fn ranged(s: Option<Spread>, digits: usize) -> String {
    match s {
        None => "-".to_string(),
        Some(s) if (s.max - s.min).abs() < 10f64.powi(-(digits as i32)) => num(s.mean, digits),
        Some(s) => format!("{} ({}-{})", num(s.mean, digits), num(s.min, digits), num(s.max, digits)),
    }
}

pub const CSV_HEADER: &str = "scenario,load,policy,seed,requests,p50_ms,p99_ms,p999_ms,errors,timeouts,refused,upstream,\
retries,goodput,util_max_avg,util_max_avg_class,util_avg,demand_max_avg,overloaded,failing_share,slow_share,divert_s,window_p99_ms,events,wall_s";

pub fn csv(runs: &[Run]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in runs {
        let m = &r.m;
        let divert = if m.divert_measured { m.divert_s.unwrap_or(f64::INFINITY) } else { f64::NAN };
        let _ = writeln!(
            out,
            "{},{:.2},{},{},{},{:.2},{:.2},{:.2},{:.5},{:.5},{:.5},{:.5},{:.5},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{},{:.2}",
            r.scenario,
            r.load,
            r.policy.name(),
            r.seed,
            m.requests,
            m.p50,
            m.p99,
            m.p999,
            m.errors,
            m.timeouts,
            m.refused,
            m.upstream,
            m.retries,
            m.goodput,
            m.util_max_avg,
            m.util_max_avg_class,
            m.util_avg,
            m.demand_max_avg,
            m.overloaded,
            csv_num(opt(m.failing_share)),
            csv_num(opt(m.slow_share)),
            if divert.is_infinite() { "never".to_string() } else { csv_num(divert) },
            csv_num(opt(m.window_p99)),
            m.events,
            m.wall_s
        );
    }
    out
}

fn csv_num(x: f64) -> String {
    if x.is_finite() { format!("{x:.4}") } else { String::new() }
}

/// The slowed nodes' share over time (per 0.5 s bin) for each policy, first seed.
pub fn divert_csv(runs: &[Run]) -> String {
    let mut out = String::from("policy,t_s,share_over_capacity_share\n");
    let first = runs.iter().filter(|r| r.m.divert_measured).map(|r| r.seed).min();
    for r in runs.iter().filter(|r| r.m.divert_measured && Some(r.seed) == first) {
        for (i, v) in r.m.divert_series.iter().enumerate() {
            let _ = writeln!(out, "{},{:.2},{v:.4}", r.policy.name(), (i + 1) as f64 * 0.5);
        }
    }
    out
}

/// One goal's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub goal: String,
    pub figure: String,
    pub met: Option<bool>,
}

fn mean_of(g: &Groups<'_>, scenario: &str, load: f64, policy: Policy, f: impl Fn(&RunMetrics) -> f64) -> Option<f64> {
    let ms = g.get(&(scenario.to_string(), (load * 1000.0).round() as u32, policy))?;
    spread(ms, f).map(|s| s.mean)
}

/// Per seed, `f` of Neutrino over `f` of `other`.
fn per_seed_ratio(runs: &[Run], scenario: &str, load: f64, other: Policy, f: impl Fn(&RunMetrics) -> f64) -> Vec<f64> {
    let find = |p: Policy, seed: u64| {
        runs.iter().find(|r| r.scenario == scenario && (r.load - load).abs() < 1e-9 && r.policy == p && r.seed == seed)
    };
    let mut seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    seeds.into_iter().filter_map(|s| Some(f(&find(Policy::Neutrino, s)?.m) / f(&find(other, s)?.m))).collect()
}

fn list(v: &[f64], digits: usize) -> String {
    v.iter().map(|x| num(*x, digits)).collect::<Vec<_>>().join(", ")
}

pub fn goals(runs: &[Run]) -> Vec<Verdict> {
    let g = group(runs);
    let mut out = Vec::new();
    // 1. Slow nodes at load 0.8: p99 vs least-request and peak-EWMA.
    for (other, limit) in [(Policy::LeastRequest, 0.5), (Policy::PeakEwma, 0.7)] {
        let n = mean_of(&g, "slow", 0.8, Policy::Neutrino, |m| m.p99);
        let o = mean_of(&g, "slow", 0.8, other, |m| m.p99);
        let seeds = per_seed_ratio(runs, "slow", 0.8, other, |m| m.p99);
        let (figure, met) = match (n, o) {
            (Some(n), Some(o)) => (
                format!("p99 {n:.0} ms vs {o:.0} ms: {:.2}x (per seed: {})", n / o, list(&seeds, 2)),
                Some(n / o <= limit),
            ),
            _ => ("not run".to_string(), None),
        };
        out.push(Verdict {
            goal: format!("10 % slow nodes, load 0.8: p99 <= {limit} x {}", other.name()),
            figure,
            met,
        });
    }
    // 2. max/avg utilization at load >= 0.7 (heterogeneous fleet).
    let mut worst: Option<(f64, f64)> = None;
    let mut parts = Vec::new();
    for ((sc, load, p), ms) in &g {
        if sc == "hetero"
            && *p == Policy::Neutrino
            && *load >= 700
            && let Some(s) = spread(ms, |m| m.util_max_avg)
        {
            let within = spread(ms, |m| m.util_max_avg_class).map_or(f64::NAN, |s| s.max);
            parts.push(format!(
                "{:.2}: {:.3} (within a capacity class {:.3})",
                f64::from(*load) / 1000.0,
                s.max,
                within
            ));
            if worst.is_none_or(|(_, w)| s.max > w) {
                worst = Some((f64::from(*load) / 1000.0, s.max));
            }
        }
    }
    out.push(Verdict {
        goal: "max/avg utilization <= 1.05 at load 0.7 and above (heterogeneous fleet, worst seed)".to_string(),
        figure: if parts.is_empty() { "not run".to_string() } else { parts.join("; ") },
        met: worst.map(|(_, w)| w <= 1.05),
    });
    // 3. The fast-failing node's share.
    let share =
        g.get(&("failfast".to_string(), 800, Policy::Neutrino)).and_then(|ms| spread(ms, |m| opt(m.failing_share)));
    out.push(Verdict {
        goal: "a fast-failing node gets <= 0.15 x its fair share".to_string(),
        figure: share.map_or("not run".to_string(), |s| format!("{:.3} x (seeds {:.3}-{:.3})", s.mean, s.min, s.max)),
        met: share.map(|s| s.max <= 0.15),
    });
    // 4. Homogeneous fleet: within 5 % of round robin (p99 and goodput, every load).
    let mut parts = Vec::new();
    let mut all_met: Option<bool> = None;
    for (sc, load, p) in g.keys() {
        if sc != "homog" || *p != Policy::Neutrino {
            continue;
        }
        let l = f64::from(*load) / 1000.0;
        let p99 = |q: Policy| mean_of(&g, "homog", l, q, |m| m.p99);
        let good = |q: Policy| mean_of(&g, "homog", l, q, |m| m.goodput);
        if let (Some(n), Some(r), Some(gn), Some(gr)) =
            (p99(Policy::Neutrino), p99(Policy::RoundRobin), good(Policy::Neutrino), good(Policy::RoundRobin))
        {
            let ok = n <= 1.05 * r && gn >= 0.95 * gr;
            all_met = Some(all_met.unwrap_or(true) && ok);
            parts.push(format!("{l:.2}: p99 {:.2}x, goodput {:.3}x", n / r, gn / gr));
        }
    }
    out.push(Verdict {
        goal: "homogeneous fleet: within 5 % of round robin (p99 <= 1.05x, goodput >= 0.95x, every load)".to_string(),
        figure: if parts.is_empty() { "not run".to_string() } else { parts.join("; ") },
        met: all_met,
    });
    out
}

/// The markdown report: goals, then one table per scenario.
pub fn markdown(scenarios: &[Scenario], runs: &[Run], header: &str) -> String {
    let g = group(runs);
    let mut out = String::new();
    let _ = writeln!(out, "# Selection simulator results\n\n{header}\n\n## Goals\n");
    let _ = writeln!(out, "| goal | figure | verdict |\n|---|---|---|");
    for v in goals(runs) {
        let verdict = match v.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "-",
        };
        let _ = writeln!(out, "| {} | {} | {verdict} |", v.goal, v.figure);
    }
    for sc in scenarios {
        let rows: Vec<_> = g.iter().filter(|((k, _, _), _)| *k == sc.key).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n## {}: {}\n", sc.key, sc.title);
        let _ = writeln!(
            out,
            "Mean over seeds (min-max where they differ). Latency in ms, of successful requests.\n\n\
             | load | policy | p50 | p99 | p99.9 | errors % | goodput | util max/avg | demand max/avg | {} |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            extra_header(sc)
        );
        for ((_, load, p), ms) in rows {
            let _ = writeln!(
                out,
                "| {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                f64::from(*load) / 1000.0,
                p.name(),
                num(spread(ms, |m| m.p50).map_or(f64::NAN, |s| s.mean), 0),
                ranged(spread(ms, |m| m.p99), 0),
                num(spread(ms, |m| m.p999).map_or(f64::NAN, |s| s.mean), 0),
                ranged(spread(ms, |m| m.errors * 100.0), 2),
                num(spread(ms, |m| m.goodput).map_or(f64::NAN, |s| s.mean), 3),
                ranged(spread(ms, |m| m.util_max_avg), 3),
                num(spread(ms, |m| m.demand_max_avg).map_or(f64::NAN, |s| s.mean), 2),
                extra(sc, ms)
            );
        }
    }
    out
}

fn extra_header(sc: &Scenario) -> &'static str {
    match sc.key.as_str() {
        "failfast" => "failing node's share / fair share",
        "slow" | "stall" | "delay1s" | "delay5s" | "delay30s" | "slow-ttl250" => "slow nodes' share / capacity share",
        "slowmid" => "divert time, s",
        "cold" => "p99 during warm-up",
        _ => "timeouts % / refused %",
    }
}

fn extra(sc: &Scenario, ms: &[&RunMetrics]) -> String {
    match sc.key.as_str() {
        "failfast" => ranged(spread(ms, |m| opt(m.failing_share)), 3),
        "slow" | "delay1s" | "delay5s" | "delay30s" | "slow-ttl250" => ranged(spread(ms, |m| opt(m.slow_share)), 2),
        "stall" => format!(
            "{}; p99 during the stall {}",
            ranged(spread(ms, |m| opt(m.slow_share)), 2),
            num(spread(ms, |m| opt(m.window_p99)).map_or(f64::NAN, |s| s.mean), 0)
        ),
        "slowmid" => ms
            .iter()
            .map(|m| m.divert_s.map_or("never".to_string(), |d| format!("{d:.1}")))
            .collect::<Vec<_>>()
            .join(", "),
        "cold" => ranged(spread(ms, |m| opt(m.window_p99)), 0),
        _ => format!(
            "{} / {}",
            num(spread(ms, |m| m.timeouts * 100.0).map_or(f64::NAN, |s| s.mean), 2),
            num(spread(ms, |m| m.refused * 100.0).map_or(f64::NAN, |s| s.mean), 2)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, load: f64, policy: Policy, seed: u64, p99: f64) -> Run {
        Run { scenario: scenario.to_string(), load, policy, seed, m: RunMetrics { p99, ..RunMetrics::default() } }
    }

    #[test]
    fn the_slow_node_goal_compares_means_and_lists_seeds() {
        let runs = [
            run("slow", 0.8, Policy::Neutrino, 1, 100.0),
            run("slow", 0.8, Policy::Neutrino, 2, 200.0),
            run("slow", 0.8, Policy::LeastRequest, 1, 400.0),
            run("slow", 0.8, Policy::LeastRequest, 2, 200.0),
        ];
        let v = &goals(&runs)[0];
        assert_eq!(v.met, Some(true), "150 / 300 = 0.5");
        assert!(v.figure.contains("0.25, 1.00"), "{}", v.figure);
        assert_eq!(goals(&runs)[1].met, None, "peak-EWMA not run");
    }
}
