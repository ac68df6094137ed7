//! The figures of a finished run (and, with SIMULATE_DEBUG set, a diagnostic line per
//! run: latency per class, waiting, Neutrino's picks by reason, the busiest and idlest
//! nodes). It reads the run's tallies; it must not change the simulation.

use super::*;

impl Sim<'_> {
    pub(super) fn measure(&mut self) -> RunMetrics {
        let s = self.s;
        let t = &mut self.t;
        let window = s.window.1 - s.window.0;
        let total_capacity: f64 = s.capacities.iter().map(|&c| c as f64).sum();
        let share = |idx: &[usize], attempts: &[u64]| {
            let all: u64 = attempts.iter().sum();
            let cap: f64 = idx.iter().map(|&i| s.capacities[i] as f64).sum();
            let got: u64 = idx.iter().map(|&i| attempts[i]).sum();
            (got as f64 / all.max(1) as f64) / (cap / total_capacity)
        };
        let serving: Vec<usize> = (0..s.initial).filter(|&i| Some(i) != s.failing).collect();
        let busy: Vec<f64> = serving.iter().map(|&i| self.backends[i].busy / window).collect();
        let demand: Vec<f64> = serving.iter().map(|&i| self.backends[i].demand / window).collect();
        let requests = t.requests.max(1) as f64;
        if std::env::var_os("SIMULATE_DEBUG").is_some() {
            let mut line = format!("{:?} load {} seed {}:", s.policy, s.load, s.seed);
            for (k, v) in t.class_latency.iter_mut().enumerate() {
                let v = metrics::sorted(std::mem::take(v));
                let (p50, p99) = (metrics::percentile(&v, 0.5), metrics::percentile(&v, 0.99));
                line += &format!(" class {}: p50 {p50:.0} p99 {p99:.0};", CLASSES[k].class);
            }
            let w = metrics::sorted(std::mem::take(&mut t.waited));
            let waited = w.iter().filter(|&&x| x > 0.0).count() as f64 / w.len().max(1) as f64;
            line += &format!(" waited {:.2} %, wait p99 {:.0} ms", waited * 100.0, metrics::percentile(&w, 0.99));
            let mut reasons = [0u64; 5];
            for c in &self.clients {
                for (r, n) in reasons.iter_mut().zip(c.lb.reasons) {
                    *r += n;
                }
            }
            let total = reasons.iter().sum::<u64>().max(1) as f64;
            line += &format!(
                "; picks: single/p2c/only-fit/scan/no-room {:?} %",
                reasons.map(|r| (r as f64 / total * 1000.0).round() / 10.0)
            );
            eprintln!("{line}");
            let mut nodes: Vec<(f64, usize)> = serving.iter().map(|&i| (self.backends[i].demand / window, i)).collect();
            nodes.sort_by(|a, b| b.0.total_cmp(&a.0));
            let all: u64 = t.attempts.iter().sum();
            for &(d, i) in nodes.iter().take(5).chain(nodes.iter().rev().take(3)) {
                eprintln!(
                    "  node {i}: capacity {}, demand {d:.2}, busy {:.2}, overloaded {:.2}, attempts {:.4}",
                    s.capacities[i],
                    self.backends[i].busy / window,
                    self.backends[i].overloaded / window,
                    t.attempts[i] as f64 / all as f64
                );
            }
        }
        let latency = metrics::sorted(std::mem::take(&mut t.latency));
        let inject = metrics::sorted(std::mem::take(&mut t.inject_latency));
        let slowed: Vec<usize> = s.slow_mid.as_ref().map(|(_, w)| w.clone()).unwrap_or_default();
        let slowed_share: f64 = slowed.iter().map(|&i| s.capacities[i] as f64).sum::<f64>() / total_capacity;
        RunMetrics {
            requests: t.requests,
            p50: metrics::percentile(&latency, 0.50),
            p99: metrics::percentile(&latency, 0.99),
            p999: metrics::percentile(&latency, 0.999),
            errors: (t.timeouts + t.refused + t.upstream) as f64 / requests,
            timeouts: t.timeouts as f64 / requests,
            refused: t.refused as f64 / requests,
            upstream: t.upstream as f64 / requests,
            retries: t.retries as f64 / requests,
            goodput: t.good_work / window / total_capacity,
            util_max_avg: metrics::max_over_avg(&busy),
            util_max_avg_class: {
                let mut classes: Vec<u64> = serving.iter().map(|&i| s.capacities[i]).collect();
                classes.sort_unstable();
                classes.dedup();
                classes
                    .iter()
                    .map(|&c| {
                        let v: Vec<f64> = serving
                            .iter()
                            .zip(&busy)
                            .filter(|&(&i, _)| s.capacities[i] == c)
                            .map(|(_, &b)| b)
                            .collect();
                        metrics::max_over_avg(&v)
                    })
                    .fold(f64::NAN, f64::max)
            },
            util_avg: busy.iter().sum::<f64>() / busy.len().max(1) as f64,
            demand_max_avg: metrics::max_over_avg(&demand),
            overloaded: serving.iter().map(|&i| self.backends[i].overloaded).sum::<f64>()
                / (window * serving.len().max(1) as f64),
            failing_share: s.failing.map(|f| share(&[f], &t.attempts)),
            slow_share: (!s.slow_from_start.is_empty()).then(|| share(&s.slow_from_start, &t.sent_cost)),
            divert_s: metrics::divert_time(
                &t.divert_bins,
                slowed_share,
                DIVERT_THRESHOLD,
                secs(DIVERT_BIN),
                DIVERT_HOLD,
            ),
            divert_measured: s.slow_mid.is_some(),
            divert_series: t
                .divert_bins
                .iter()
                .map(|&(slow, all)| slow as f64 / all.max(1) as f64 / slowed_share.max(1e-9))
                .collect(),
            window_p99: s.inject_window.map(|_| metrics::percentile(&inject, 0.99)),
            events: t.events,
            wall_s: 0.0,
        }
    }
}
