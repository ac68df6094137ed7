//! What one run measured, and the same figures over a set of seeds.
//!
//! Pure: numbers in, numbers out. It must not run simulations or format reports.

/// Nearest-rank percentile (`q` in 0..=1) of sorted samples; NaN for none.
pub fn percentile(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sorts latencies for `percentile`.
pub fn sorted(mut v: Vec<f32>) -> Vec<f32> {
    v.sort_unstable_by(f32::total_cmp);
    v
}

/// The figures of one run (one scenario, load, policy and seed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunMetrics {
    /// Requests that arrived in the measurement window.
    pub requests: u64,
    /// Latency of the successful ones, milliseconds (arrival at the client proxy to the
    /// end of the response: waiting for room, retries and service).
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// Share of requests that failed: timed out, refused for lack of room, or a 503
    /// from a backend after retries.
    pub errors: f64,
    pub timeouts: f64,
    pub refused: f64,
    pub upstream: f64,
    /// Retries sent per request.
    pub retries: f64,
    /// Work completed by successful requests (true cost x service time) per second, as
    /// a share of the fleet's capacity: equals the load when nothing fails.
    pub goodput: f64,
    /// Time-averaged busy share (min(in-flight, C) / C) of the most utilized node over
    /// the average node (healthy, serving nodes only).
    pub util_max_avg: f64,
    /// The same within each capacity class (1x, 2x, 4x), the largest of them.
    pub util_max_avg_class: f64,
    pub util_avg: f64,
    /// The same with the uncapped demand (in-flight true cost / C).
    pub demand_max_avg: f64,
    /// Share of node-time (serving nodes, measurement window) with more true cost in
    /// flight than capacity, so that every request there ran slowed down.
    pub overloaded: f64,
    /// Share of attempts sent to the fast-failing node over its capacity share.
    pub failing_share: Option<f64>,
    /// Share of the work (declared cost) sent to the slow nodes over their capacity share.
    pub slow_share: Option<f64>,
    /// Seconds from the mid-run slowdown until the slowed nodes' share of new work
    /// (declared cost sent) fell below half their capacity share and stayed there over
    /// the next 2 s together (None: within the run it never did).
    pub divert_s: Option<f64>,
    /// Whether this scenario measures diverting at all.
    pub divert_measured: bool,
    /// The slowed nodes' share of new work over their capacity share, per divert bin.
    pub divert_series: Vec<f64>,
    /// p99 of the requests that arrived during the injection's window (cold nodes'
    /// warm-up, control-plane stall), milliseconds.
    pub window_p99: Option<f64>,
    /// Simulated events, and wall-clock seconds the run took.
    pub events: u64,
    pub wall_s: f64,
}

/// Mean, minimum and maximum of one figure over seeds (NaN-free inputs only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread { mean, min, max })
    }
}

/// Max over mean of per-node values.
pub fn max_over_avg(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let avg = values.iter().sum::<f64>() / values.len() as f64;
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if avg > 0.0 { max / avg } else { f64::NAN }
}

/// Divert time: bins of `bin_s` seconds from the slowdown on, each (work sent to the
/// slowed nodes, all work sent). The end of the first bin that starts a run of `hold`
/// bins over which, together, their share stayed below `threshold` x their capacity
/// share (diverted, and staying diverted rather than swinging back).
pub fn divert_time(bins: &[(u64, u64)], capacity_share: f64, threshold: f64, bin_s: f64, hold: usize) -> Option<f64> {
    (0..bins.len().saturating_sub(hold - 1))
        .find(|&i| {
            let (slow, all) = bins[i..i + hold].iter().fold((0, 0), |(s, a), &(x, y)| (s + x, a + y));
            all > 0 && (slow as f64 / all as f64) < threshold * capacity_share
        })
        .map(|i| (i + 1) as f64 * bin_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v = sorted((1..=1000).rev().map(|x| x as f32).collect());
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&v, 1.0), 1000.0);
        assert_eq!(percentile(&[7.0], 0.999), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn spreads_and_ratios() {
        let s = Spread::of([1.0, 2.0, f64::NAN, 6.0]).expect("values");
        assert_eq!(s, Spread { mean: 3.0, min: 1.0, max: 6.0 });
        assert!(Spread::of([f64::NAN]).is_none());
        assert_eq!(max_over_avg(&[0.5, 0.5, 1.0, 1.0]), 1.0 / 0.75);
    }

    #[test]
    fn divert_is_the_first_bin_below_the_threshold() {
        // Capacity share 10 %: 12 %, 9 %, 4 % of attempts.
        let bins = [(12, 100), (9, 100), (4, 100), (1, 100)];
        assert_eq!(divert_time(&bins, 0.1, 0.5, 0.5, 1), Some(1.5));
        assert_eq!(divert_time(&bins[..2], 0.1, 0.5, 0.5, 1), None);
        // Swinging back does not count: 4 % then 12 % is 8 % over the pair.
        let swing = [(12, 100), (4, 100), (12, 100), (2, 100), (3, 100)];
        assert_eq!(divert_time(&swing, 0.1, 0.5, 0.5, 2), Some(2.0));
    }
}
