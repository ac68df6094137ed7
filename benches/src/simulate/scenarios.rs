//! The experiments: fleets, injected faults, loads and policies, and the concrete setup
//! of one run (which nodes are slow, which fails, when things happen), drawn from the
//! seed so every policy faces the same world.
//!
//! Pure: it describes runs; it must not run them or report on them.

use crate::policies::Policy;
use crate::rng::Rng;

pub const LOADS: [f64; 7] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.2];
pub const QUICK_LOADS: [f64; 3] = [0.5, 0.8, 1.2];
/// Client proxies in every run.
pub const CLIENTS: usize = 32;
/// 100 backends: 40 of 1x (1 CPU), 40 of 2x, 20 of 4x.
pub const HETERO: [(u64, usize); 3] = [(1000, 40), (2000, 40), (4000, 20)];
/// 100 backends of 2x.
pub const HOMOG: [(u64, usize); 1] = [(2000, 100)];
/// Slow nodes are this many times slower.
pub const SLOW_FACTOR: f64 = 5.0;
pub const SLOW_SHARE: f64 = 0.10;
/// Cold nodes: this many join, serving at START_SPEED at first and warming up linearly
/// to full speed over WARM_S seconds.
pub const COLD_NODES: usize = 10;
pub const COLD_START_SPEED: f64 = 0.25;
pub const COLD_WARM_S: f64 = 20.0;
/// The control plane's stall.
pub const STALL_S: f64 = 60.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fleet {
    Hetero,
    Homog,
}

/// What is injected into a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Injection {
    None,
    /// 10 % of the nodes are 5x slower from the start.
    SlowNodes,
    /// 10 % of the nodes become 5x slower a third of the way into the measurement.
    SlowMidRun,
    /// One 2x node answers 503 to everything in 0.5 ms.
    FailFast,
    /// 10 nodes join cold a third of the way into the measurement.
    ColdJoin,
    /// Slow nodes, and the control plane pushes nothing for 60 s.
    Stall,
    /// Slow nodes, and pushed reports arrive this many seconds late.
    PushDelay(f64),
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub key: String,
    pub title: String,
    pub fleet: Fleet,
    pub injection: Injection,
    pub loads: Vec<f64>,
    pub policies: Vec<Policy>,
    /// Simulated seconds, and the warm-up not measured.
    pub duration_s: f64,
    pub warmup_s: f64,
    /// What-if: load reports expire after this long instead of `REPORT_TTL`.
    pub report_ttl_ms: Option<u64>,
}

/// Every scenario of the sweep (`quick`: fewer loads, shorter runs).
pub fn all(quick: bool) -> Vec<Scenario> {
    let loads: Vec<f64> = if quick { QUICK_LOADS.to_vec() } else { LOADS.to_vec() };
    let (duration_s, warmup_s) = if quick { (25.0, 5.0) } else { (60.0, 10.0) };
    let stall_duration = if quick { 50.0 } else { warmup_s + 5.0 + STALL_S + 20.0 };
    let all_policies = Policy::ALL.to_vec();
    let peers: Vec<Policy> = Policy::ALL.into_iter().filter(|p| *p != Policy::NeutrinoExact).collect();
    let s = |key: &str, title: &str, fleet, injection, loads: Vec<f64>, policies: Vec<Policy>, duration_s| Scenario {
        key: key.to_string(),
        title: title.to_string(),
        fleet,
        injection,
        loads,
        policies,
        duration_s,
        warmup_s,
        report_ttl_ms: None,
    };
    let mut out = vec![
        s(
            "hetero",
            "heterogeneous fleet (40x1, 40x2, 20x4 CPUs)",
            Fleet::Hetero,
            Injection::None,
            loads.clone(),
            all_policies.clone(),
            duration_s,
        ),
        s("homog", "homogeneous fleet (100x2 CPUs)", Fleet::Homog, Injection::None, loads.clone(), peers, duration_s),
        s(
            "slow",
            "10 % of nodes 5x slower (heterogeneous)",
            Fleet::Hetero,
            Injection::SlowNodes,
            loads,
            all_policies.clone(),
            duration_s,
        ),
        s(
            "failfast",
            "one 2x node fails fast (503 in 0.5 ms)",
            Fleet::Hetero,
            Injection::FailFast,
            vec![0.8],
            all_policies.clone(),
            duration_s,
        ),
        s(
            "cold",
            "10 nodes join cold (1/4 speed, warming over 20 s)",
            Fleet::Hetero,
            Injection::ColdJoin,
            vec![0.8],
            all_policies.clone(),
            duration_s,
        ),
        s(
            "slowmid",
            "10 % of nodes turn 5x slower mid-run",
            Fleet::Hetero,
            Injection::SlowMidRun,
            vec![0.8],
            all_policies,
            duration_s,
        ),
    ];
    let stall_title = if quick {
        "slow nodes + control plane stalled (quick: 32 s)"
    } else {
        "slow nodes + control plane stalled 60 s"
    };
    out.push(s(
        "stall",
        stall_title,
        Fleet::Hetero,
        Injection::Stall,
        vec![0.8],
        vec![Policy::Neutrino],
        stall_duration,
    ));
    for d in [1.0, 5.0, 30.0] {
        let key = format!("delay{d:.0}s");
        let title = format!("slow nodes + pushed reports {d:.0} s late");
        out.push(s(
            &key,
            &title,
            Fleet::Hetero,
            Injection::PushDelay(d),
            vec![0.8],
            vec![Policy::Neutrino],
            duration_s,
        ));
    }
    // What-if: the proxy's REPORT_TTL cut from 3 s to 250 ms (reports handed over backdated).
    for (key, title, injection) in [
        ("hetero-ttl250", "what-if: heterogeneous fleet, reports expire after 250 ms", Injection::None),
        ("slow-ttl250", "what-if: 10 % slow nodes, reports expire after 250 ms", Injection::SlowNodes),
    ] {
        let mut sc = s(key, title, Fleet::Hetero, injection, vec![0.8], vec![Policy::Neutrino], duration_s);
        sc.report_ttl_ms = Some(250);
        out.push(sc);
    }
    out
}

/// Everything one run needs, concrete.
#[derive(Debug, Clone)]
pub struct Setup {
    pub capacities: Vec<u64>,
    /// Backends 0..initial are in the endpoint lists from the start; the rest join.
    pub initial: usize,
    pub clients: usize,
    pub load: f64,
    pub policy: Policy,
    pub seed: u64,
    pub duration_s: f64,
    /// Requests arriving in [window.0, window.1) are measured; utilization too.
    pub window: (f64, f64),
    pub slow_from_start: Vec<usize>,
    /// (when, which) nodes slow down mid-run.
    pub slow_mid: Option<(f64, Vec<usize>)>,
    pub failing: Option<usize>,
    /// When the cold nodes (initial..) join.
    pub join_at: Option<f64>,
    /// The control plane pushes nothing in [from, to).
    pub stall: Option<(f64, f64)>,
    /// Pushed reports arrive this late (plus up to 250 ms of jitter).
    pub push_delay_s: f64,
    /// Where `window_p99` is measured, if anywhere.
    pub inject_window: Option<(f64, f64)>,
    /// What-if: load reports expire after this long instead of `REPORT_TTL`.
    pub report_ttl_ms: Option<u64>,
}

/// Requests still running at the end of a run are not measured: the window ends this
/// long before it (the request timeout plus the queue timeout).
pub const TAIL_S: f64 = 3.0;

impl Scenario {
    pub fn setup(&self, load: f64, policy: Policy, seed: u64, clients: usize) -> Setup {
        let mut rng = Rng::new(seed, 0x5EED_F1EE7);
        let spec: &[(u64, usize)] = match self.fleet {
            Fleet::Hetero => &HETERO,
            Fleet::Homog => &HOMOG,
        };
        let mut capacities: Vec<u64> = spec.iter().flat_map(|&(c, n)| std::iter::repeat_n(c, n)).collect();
        for i in (1..capacities.len()).rev() {
            capacities.swap(i, rng.below(i + 1));
        }
        let n = capacities.len();
        let measured = (self.warmup_s, self.duration_s - TAIL_S);
        let third = measured.0 + (measured.1 - measured.0) / 3.0;
        let mut pick = |count: usize| -> Vec<usize> {
            let mut all: Vec<usize> = (0..n).collect();
            for i in 0..count {
                all.swap(i, i + rng.below(n - i));
            }
            all.truncate(count);
            all
        };
        let slow = pick((n as f64 * SLOW_SHARE).round() as usize);
        let failing = capacities.iter().position(|&c| c == 2000);
        let mut s = Setup {
            capacities,
            initial: n,
            clients,
            load,
            policy,
            seed,
            duration_s: self.duration_s,
            window: measured,
            slow_from_start: vec![],
            slow_mid: None,
            failing: None,
            join_at: None,
            stall: None,
            push_delay_s: 0.25,
            inject_window: None,
            report_ttl_ms: self.report_ttl_ms,
        };
        match self.injection {
            Injection::None => {}
            Injection::SlowNodes => s.slow_from_start = slow,
            Injection::SlowMidRun => s.slow_mid = Some((third, slow)),
            Injection::FailFast => s.failing = failing,
            Injection::ColdJoin => {
                s.initial = n - COLD_NODES;
                s.join_at = Some(third);
                s.inject_window = Some((third, third + COLD_WARM_S));
            }
            Injection::Stall => {
                s.slow_from_start = slow;
                let from = self.warmup_s + 5.0;
                let to = (from + STALL_S).min(measured.1 - 5.0);
                s.stall = Some((from, to));
                s.inject_window = Some((from, to));
            }
            Injection::PushDelay(d) => {
                s.slow_from_start = slow;
                s.push_delay_s = d;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_are_drawn_from_the_seed_alone() {
        let sc = all(true).into_iter().find(|s| s.key == "slow").expect("slow scenario");
        let a = sc.setup(0.8, Policy::Neutrino, 1, 32);
        let b = sc.setup(0.8, Policy::RoundRobin, 1, 32);
        assert_eq!(a.slow_from_start, b.slow_from_start, "same world for every policy");
        assert_eq!(a.capacities, b.capacities);
        assert_eq!(a.slow_from_start.len(), 10);
        assert_ne!(sc.setup(0.8, Policy::Neutrino, 2, 32).slow_from_start, a.slow_from_start);
        assert_eq!(a.capacities.iter().sum::<u64>(), 200_000);
    }
}
