//! Tests of whole runs: determinism, light load, a fast-failing node.

use super::*;
use crate::scenarios;

fn small(policy: Policy, key: &str, load: f64) -> Setup {
    let sc = scenarios::all(true).into_iter().find(|s| s.key == key).expect("scenario");
    let mut s = sc.setup(load, policy, 3, 8);
    s.duration_s = 5.0;
    s.window = (1.0, 2.0);
    s
}

#[test]
fn a_seed_gives_identical_results() {
    for p in [Policy::Neutrino, Policy::PeakEwma, Policy::Oracle] {
        let s = small(p, "slow", 0.7);
        let (mut a, mut b) = (run(&s), run(&s));
        a.wall_s = 0.0;
        b.wall_s = 0.0;
        assert_eq!(a, b, "{p:?}");
        assert!(a.requests > 3_000, "{a:?}");
    }
}

#[test]
fn light_load_is_served_at_service_time_by_every_policy() {
    for p in Policy::ALL {
        let m = run(&small(p, "hetero", 0.3));
        // A few heavy requests meeting on a 1-CPU node can still time out.
        assert!(m.errors < 0.005, "{p:?} {m:?}");
        // Median service time of the mix is about 50 ms; little queues at 30 %.
        assert!(m.p50 > 20.0 && m.p50 < 80.0, "{p:?} {m:?}");
        assert!((m.goodput - 0.3).abs() < 0.05, "{p:?} {m:?}");
    }
}

#[test]
fn a_fast_failing_node_is_retried_elsewhere() {
    let m = run(&small(Policy::RoundRobin, "failfast", 0.5));
    let share = m.failing_share.expect("measured");
    assert!(share > 0.5, "round robin keeps sending there: {share}");
    assert!(m.retries > 0.005, "{m:?}");
    let n = run(&small(Policy::Neutrino, "failfast", 0.5));
    assert!(n.failing_share.expect("measured") < share, "{n:?}");
}
