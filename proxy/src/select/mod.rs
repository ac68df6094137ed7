//! Select: picks the endpoint for one request, locally, at every hop.
//!
//! For each endpoint, its utilization: the load already on it (reported by the backend
//! plus this proxy's own in-flight cost) against its capacity vector; the dominant
//! resource counts. Only endpoints where the request fits (utilization with the
//! request's cost added stays <= 1) qualify. Among them, power of two choices: two
//! endpoints sampled with probability proportional to their capacity, the less
//! utilized one wins (ties go to the first sample, so idle fleets share work in
//! proportion to capacity), and many proxies do not herd onto one backend. When
//! sampling keeps missing (most endpoints full), a full scan draws one of the endpoints
//! that fit, weighted by headroom: proxies scanning the same (stale) view would otherwise
//! all pick the same emptiest endpoint. The selection simulator (benches/) measured it:
//! p99 on the mixed-size fleet at load 0.8 went from 1250 to 1081 ms.
//!
//! Three corrections keep the comparison honest: an endpoint whose others' load is
//! unknown (its report went stale) is compared on this proxy's own in-flight cost only,
//! against the other candidate's own cost too, so it is never mistaken for idle (that
//! would herd every proxy onto it): with nothing known, sampling by capacity decides.
//! An endpoint that just failed fast carries a penalty, so quick 503s do not make it
//! look idle. A new endpoint starts cold and compares as busy until it warms up.
//!
//! Pure: the caller supplies each endpoint's load and the random numbers. It must not
//! read clocks, sockets or shared state.

pub mod endpoints;

/// Index of the capacity vector's dimensions.
pub const DIMS: usize = 3;

/// What selection needs to know about one endpoint right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Candidate {
    /// cpu millis, memory bytes, GPUs.
    pub capacity: [u64; DIMS],
    /// Load on the endpoint as this proxy estimates it, in the same units: others' load
    /// from a fresh report plus this proxy's own in-flight cost (only its own when
    /// `known` is false).
    pub used: [u64; DIMS],
    /// This proxy's own in-flight cost on the endpoint (included in `used`).
    pub own: [u64; DIMS],
    /// `used` includes a fresh report of the load others put on the endpoint.
    pub known: bool,
    /// Utilization added when comparing, after recent fast failures (0 = none).
    pub penalty: f64,
    /// Slow start, 0..=1: a new endpoint compares as at least this utilized (0 = warm).
    pub cold: f64,
    /// Ready and not ejected.
    pub eligible: bool,
}

impl Candidate {
    /// A warm endpoint with `used` known: the plain case.
    pub fn known(capacity: [u64; DIMS], used: [u64; DIMS]) -> Candidate {
        Candidate { capacity, used, known: true, eligible: true, ..Default::default() }
    }

    /// How utilized it looks when compared against another candidate: on the full
    /// estimate only when both are known, else on this proxy's own cost alone.
    fn score(&self, both_known: bool) -> f64 {
        let basis = Candidate { used: if both_known { self.used } else { self.own }, ..*self };
        utilization_after(&basis, &[0; DIMS]).unwrap_or(0.0).max(self.cold) + self.penalty
    }
}

/// Why an endpoint was chosen; goes into logs, spans and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The only eligible endpoint that fits.
    Single,
    /// The less utilized of two sampled endpoints.
    TwoChoices,
    /// Of two sampled endpoints only this one fit.
    OnlyOneFit,
    /// Sampling missed; a scan found the least utilized endpoint that fits.
    Scan,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Single => "single",
            Reason::TwoChoices => "p2c",
            Reason::OnlyOneFit => "only-fit",
            Reason::Scan => "scan",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub index: usize,
    /// Utilization of the chosen endpoint with this request placed, 0..=1.
    pub utilization: f64,
    pub reason: Reason,
}

/// Nothing fits the request now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoFit {
    pub eligible: usize,
    /// The least utilization any eligible endpoint would have with the request (above
    /// 1), or None when no eligible endpoint has the resource at all (e.g. no GPU).
    pub least_over: Option<f64>,
    /// Not even an idle endpoint could take it: waiting is pointless.
    pub too_big: bool,
}

/// Utilization of `c` after adding `cost`: the largest used/capacity over the
/// dimensions. None when the request needs a resource the endpoint does not have.
pub fn utilization_after(c: &Candidate, cost: &[u64; DIMS]) -> Option<f64> {
    let mut worst: f64 = 0.0;
    let mut any = false;
    for ((&cap, &used), &need) in c.capacity.iter().zip(&c.used).zip(cost) {
        if cap == 0 {
            if need > 0 {
                return None;
            }
            continue;
        }
        any = true;
        worst = worst.max(used.saturating_add(need) as f64 / cap as f64);
    }
    any.then_some(worst)
}

/// Cumulative sampling weights over a set of endpoints (all of a service's, or the
/// subset with some resource, e.g. GPUs), built once per endpoint set.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    cumulative: Vec<u64>,
    /// Endpoint index of each member; None when the members are 0..len.
    members: Option<Vec<u32>>,
}

fn weight(c: &[u64; DIMS]) -> u64 {
    if c[0] > 0 { c[0] } else { (c[1] >> 20).max(1) }
}

impl Weights {
    /// Weight of each endpoint: its CPU capacity (memory when it has no CPU), at least 1.
    pub fn new(capacities: impl IntoIterator<Item = [u64; DIMS]>) -> Weights {
        let mut total = 0u64;
        let cumulative = capacities
            .into_iter()
            .map(|c| {
                total = total.saturating_add(weight(&c).max(1));
                total
            })
            .collect();
        Weights { cumulative, members: None }
    }

    /// Weights over only the endpoints `keep` accepts, so requests that need a scarce
    /// resource sample among the endpoints that have it instead of missing 9 times in 10.
    pub fn subset(capacities: &[[u64; DIMS]], keep: impl Fn(&[u64; DIMS]) -> bool) -> Weights {
        let mut total = 0u64;
        let mut cumulative = Vec::new();
        let mut members = Vec::new();
        for (i, c) in capacities.iter().enumerate() {
            if keep(c) {
                total = total.saturating_add(weight(c).max(1));
                cumulative.push(total);
                members.push(i as u32);
            }
        }
        Weights { cumulative, members: Some(members) }
    }

    pub fn len(&self) -> usize {
        self.cumulative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cumulative.is_empty()
    }

    /// The endpoint index of member `pos`.
    fn index(&self, pos: usize) -> usize {
        match &self.members {
            Some(m) => m[pos] as usize,
            None => pos,
        }
    }

    /// The member a uniform random `r` lands on.
    fn sample(&self, r: u64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 {
            return 0;
        }
        let point = r % total;
        self.cumulative.partition_point(|&c| c <= point)
    }
}

/// Sampling rounds before falling back to a scan.
const ROUNDS: usize = 3;

/// Picks an endpoint for a request costing `cost`. `view(i)` gives endpoint `i`'s
/// current state; `random` yields uniform random numbers.
pub fn pick(
    weights: &Weights,
    cost: &[u64; DIMS],
    view: impl Fn(usize) -> Candidate,
    mut random: impl FnMut() -> u64,
) -> Result<Choice, NoFit> {
    let n = weights.len();
    if n == 0 {
        return Err(NoFit { eligible: 0, least_over: None, too_big: false });
    }
    // (the candidate, its utilization with the request) when the request fits.
    let fits = |i: usize| {
        let c = view(i);
        if !c.eligible {
            return None;
        }
        let after = utilization_after(&c, cost).filter(|u| *u <= 1.0)?;
        Some((c, after))
    };
    if n > 1 {
        for _ in 0..ROUNDS {
            let pa = weights.sample(random());
            let mut pb = weights.sample(random());
            if pb == pa {
                // Keep two distinct candidates without biasing toward neighbours much.
                pb = (pa + 1 + (random() as usize % (n - 1))) % n;
            }
            let (a, b) = (weights.index(pa), weights.index(pb));
            match (fits(a), fits(b)) {
                (Some(ua), Some(ub)) => {
                    let both = ua.0.known && ub.0.known;
                    let (index, utilization) = if ub.0.score(both) < ua.0.score(both) { (b, ub.1) } else { (a, ua.1) };
                    return Ok(Choice { index, utilization, reason: Reason::TwoChoices });
                }
                (Some(u), None) => return Ok(Choice { index: a, utilization: u.1, reason: Reason::OnlyOneFit }),
                (None, Some(u)) => return Ok(Choice { index: b, utilization: u.1, reason: Reason::OnlyOneFit }),
                (None, None) => {}
            }
        }
    }
    scan(weights, cost, &view, &mut random)
}

/// A uniform random number in [0, 1).
fn unit(r: u64) -> f64 {
    (r >> 11) as f64 / (1u64 << 53) as f64
}

fn scan(
    weights: &Weights,
    cost: &[u64; DIMS],
    view: &impl Fn(usize) -> Candidate,
    random: &mut impl FnMut() -> u64,
) -> Result<Choice, NoFit> {
    let n = weights.len();
    let all_known = (0..n).all(|pos| {
        let c = view(weights.index(pos));
        !c.eligible || c.known
    });
    // Among the endpoints that fit, one drawn at random with weight = the headroom its
    // score leaves: the emptiest is likeliest, but proxies that all scan the same
    // (stale) view do not all pick the same endpoint. (index, utilization with it)
    let mut chosen: Option<(usize, f64)> = None;
    let mut total = 0.0f64;
    let mut eligible = 0usize;
    let mut least_over: Option<f64> = None;
    let mut could_fit_idle = false;
    for pos in 0..n {
        let i = weights.index(pos);
        let c = view(i);
        if !c.eligible {
            continue;
        }
        eligible += 1;
        let idle = Candidate { used: [0; DIMS], ..c };
        could_fit_idle |= utilization_after(&idle, cost).is_some_and(|u| u <= 1.0);
        match utilization_after(&c, cost) {
            Some(after) if after <= 1.0 => {
                let headroom = (1.0 - c.score(all_known)).max(0.0) + 1e-3;
                total += headroom;
                if chosen.is_none() || unit(random()) * total < headroom {
                    chosen = Some((i, after));
                }
            }
            Some(u) => least_over = Some(least_over.map_or(u, |l: f64| l.min(u))),
            None => {}
        }
    }
    match chosen {
        Some((index, utilization)) => {
            let reason = if n == 1 { Reason::Single } else { Reason::Scan };
            Ok(Choice { index, utilization, reason })
        }
        None => Err(NoFit { eligible, least_over, too_big: !could_fit_idle }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (splitmix64) so tests are reproducible.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    fn ep(cpu: u64, mem: u64, gpu: u64) -> Candidate {
        Candidate::known([cpu, mem, gpu], [0; 3])
    }

    #[test]
    fn utilization_is_the_dominant_dimension() {
        let mut c = ep(1000, 1000, 0);
        c.used = [500, 100, 0];
        assert_eq!(utilization_after(&c, &[100, 800, 0]), Some(0.9));
        assert_eq!(utilization_after(&c, &[0, 0, 1]), None, "no GPU at all");
        assert_eq!(utilization_after(&ep(0, 0, 0), &[0, 0, 0]), None);
    }

    #[test]
    fn heavy_requests_go_only_where_they_fit() {
        let eps = [ep(1000, 2 << 30, 0), ep(2000, 4 << 30, 0), ep(4000, 8 << 30, 1)];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(7);
        for _ in 0..1000 {
            let c = pick(&w, &[2000, 4 << 30, 1], |i| eps[i], &mut r).expect("fits the GPU node");
            assert_eq!(c.index, 2);
            let c = pick(&w, &[1500, 0, 0], |i| eps[i], &mut r).expect("fits the bigger two");
            assert_ne!(c.index, 0);
        }
    }

    #[test]
    fn an_idle_fleet_shares_light_work_in_proportion_to_capacity() {
        let eps = [ep(1000, 0, 0), ep(2000, 0, 0), ep(4000, 0, 0)];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(11);
        let mut hits = [0u32; 3];
        for _ in 0..7000 {
            hits[pick(&w, &[100, 0, 0], |i| eps[i], &mut r).expect("fits").index] += 1;
        }
        for (h, share) in hits.iter().zip([1000.0, 2000.0, 4000.0]) {
            let expected = share / 7000.0 * 7000.0;
            assert!((f64::from(*h) - expected).abs() < expected * 0.15, "{hits:?}");
        }
    }

    #[test]
    fn the_less_utilized_of_two_wins() {
        let mut busy = ep(1000, 0, 0);
        busy.used[0] = 900;
        let idle = ep(1000, 0, 0);
        let eps = [busy, idle];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let c = pick(&w, &[50, 0, 0], |i| eps[i], rng(1)).expect("fits");
        assert_eq!((c.index, c.reason), (1, Reason::TwoChoices));
        assert!((c.utilization - 0.05).abs() < 1e-9);
    }

    #[test]
    fn traffic_follows_capacity_and_load_evens_out() {
        // Place requests that never finish; the bigger endpoints take more, and
        // utilization stays even.
        let mut eps: Vec<Candidate> = [1000, 2000, 4000, 1000, 2000, 4000].iter().map(|&c| ep(c, 0, 0)).collect();
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(3);
        for _ in 0..1400 {
            let snapshot = eps.clone();
            let c = pick(&w, &[10, 0, 0], |i| snapshot[i], &mut r).expect("room left");
            eps[c.index].used[0] += 10;
        }
        let utils: Vec<f64> = eps.iter().map(|e| e.used[0] as f64 / e.capacity[0] as f64).collect();
        let (min, max) = utils.iter().fold((f64::MAX, 0f64), |(a, b), u| (a.min(*u), b.max(*u)));
        assert!(max - min <= 0.05, "utilization spread {utils:?}");
    }

    #[test]
    fn full_endpoints_are_skipped_and_a_scan_finds_the_last_room() {
        let mut eps: Vec<Candidate> = (0..100).map(|_| ep(1000, 0, 0)).collect();
        for e in eps.iter_mut() {
            e.used[0] = 1000;
        }
        eps[73].used[0] = 0;
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let c = pick(&w, &[500, 0, 0], |i| eps[i], rng(5)).expect("one left");
        assert_eq!(c.index, 73);
        eps[73].used[0] = 800;
        let e = pick(&w, &[500, 0, 0], |i| eps[i], rng(5)).expect_err("nothing fits");
        assert_eq!(e.eligible, 100);
        assert!((e.least_over.expect("over") - 1.3).abs() < 1e-9);
        assert!(!e.too_big, "it would fit an idle endpoint: worth waiting");
    }

    #[test]
    fn a_subset_samples_only_its_members() {
        let eps: Vec<Candidate> = (0..50).map(|i| ep(1000, 0, u64::from(i % 10 == 3))).collect();
        let caps: Vec<[u64; 3]> = eps.iter().map(|e| e.capacity).collect();
        let gpus = Weights::subset(&caps, |c| c[2] > 0);
        assert_eq!(gpus.len(), 5);
        let mut r = rng(4);
        for _ in 0..500 {
            let c = pick(&gpus, &[10, 0, 1], |i| eps[i], &mut r).expect("a GPU node");
            assert_eq!(c.index % 10, 3);
            assert_ne!(c.reason, Reason::Scan, "sampling finds GPU nodes directly");
        }
    }

    #[test]
    fn ineligible_endpoints_are_never_chosen() {
        let mut eps = [ep(1000, 0, 0), ep(1000, 0, 0), ep(1000, 0, 0)];
        eps[0].eligible = false;
        eps[2].eligible = false;
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(9);
        for _ in 0..200 {
            assert_eq!(pick(&w, &[1, 0, 0], |i| eps[i], &mut r).expect("one").index, 1);
        }
        assert_eq!(
            pick(&Weights::default(), &[1, 0, 0], |_| ep(1, 0, 0), &mut r),
            Err(NoFit { eligible: 0, least_over: None, too_big: false })
        );
    }

    #[test]
    fn a_gpu_request_with_no_gpu_anywhere_says_so() {
        let eps = [ep(1000, 0, 0), ep(1000, 0, 0)];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let e = pick(&w, &[0, 0, 1], |i| eps[i], rng(2)).expect_err("no GPU");
        assert_eq!(e, NoFit { eligible: 2, least_over: None, too_big: true });
        let one_gpu = [ep(1000, 0, 1)];
        let w = Weights::new(one_gpu.iter().map(|e| e.capacity));
        let e = pick(&w, &[0, 0, 2], |i| one_gpu[i], rng(2)).expect_err("two GPUs needed");
        assert!(e.too_big);
    }

    #[test]
    fn an_endpoint_with_unknown_load_is_not_mistaken_for_idle() {
        // Endpoint 0's report is fresh: others keep it 60 % busy. Endpoint 1's went
        // stale. Counting the stale one as idle would send everything there; comparing
        // both on this proxy's own cost (none) leaves it to capacity sampling: even.
        let fresh = Candidate { used: [600, 0, 0], ..ep(1000, 0, 0) };
        let stale = Candidate { known: false, ..ep(1000, 0, 0) };
        let eps = [fresh, stale];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(21);
        let mut hits = [0u32; 2];
        for _ in 0..2000 {
            hits[pick(&w, &[10, 0, 0], |i| eps[i], &mut r).expect("fits").index] += 1;
        }
        assert!(hits[0] > 800 && hits[1] > 800, "{hits:?}");
        // With both known, the idle one wins every time.
        let eps = [fresh, Candidate { known: true, ..stale }];
        for _ in 0..200 {
            assert_eq!(pick(&w, &[10, 0, 0], |i| eps[i], &mut r).expect("fits").index, 1);
        }
    }

    #[test]
    fn own_cost_still_separates_endpoints_whose_load_is_unknown() {
        let mine = Candidate { known: false, used: [500, 0, 0], own: [500, 0, 0], ..ep(1000, 0, 0) };
        let other = Candidate { known: false, ..ep(1000, 0, 0) };
        let eps = [mine, other];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let c = pick(&w, &[10, 0, 0], |i| eps[i], rng(3)).expect("fits");
        assert_eq!(c.index, 1);
    }

    #[test]
    fn a_fast_failing_endpoint_loses_comparisons_despite_looking_idle() {
        let failing = Candidate { penalty: 1.0, ..ep(1000, 0, 0) };
        let busy = Candidate { used: [800, 0, 0], ..ep(1000, 0, 0) };
        let eps = [failing, busy];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(8);
        for _ in 0..200 {
            assert_eq!(pick(&w, &[10, 0, 0], |i| eps[i], &mut r).expect("fits").index, 1);
        }
        // ...but it still takes work that fits nowhere else.
        let eps = [failing, Candidate { used: [1000, 0, 0], ..busy }];
        assert_eq!(pick(&w, &[10, 0, 0], |i| eps[i], &mut r).expect("fits").index, 0);
    }

    #[test]
    fn a_cold_endpoint_takes_work_only_from_busier_ones() {
        let cold = Candidate { cold: 0.5, ..ep(1000, 0, 0) };
        let eps = [cold, Candidate { used: [300, 0, 0], ..ep(1000, 0, 0) }];
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(12);
        for _ in 0..100 {
            assert_eq!(pick(&w, &[10, 0, 0], |i| eps[i], &mut r).expect("fits").index, 1);
        }
        let eps = [cold, Candidate { used: [700, 0, 0], ..ep(1000, 0, 0) }];
        for _ in 0..100 {
            assert_eq!(pick(&w, &[10, 0, 0], |i| eps[i], &mut r).expect("fits").index, 0);
        }
    }

    #[test]
    fn scans_spread_over_the_endpoints_that_fit_favouring_headroom() {
        // Nine of ten endpoints full: sampling misses, scans decide. The emptier of the
        // two with room is likelier, but not the only pick.
        let mut eps: Vec<Candidate> = (0..10).map(|_| Candidate { used: [1000, 0, 0], ..ep(1000, 0, 0) }).collect();
        eps[3].used[0] = 0;
        eps[7].used[0] = 600;
        let w = Weights::new(eps.iter().map(|e| e.capacity));
        let mut r = rng(17);
        let mut hits = [0u32; 10];
        for _ in 0..2000 {
            let c = pick(&w, &[100, 0, 0], |i| eps[i], &mut r).expect("room on two");
            hits[c.index] += 1;
        }
        assert_eq!(hits.iter().sum::<u32>(), hits[3] + hits[7], "{hits:?}");
        assert!(hits[3] > hits[7] + 100 && hits[7] > 100, "{hits:?}");
    }
}
