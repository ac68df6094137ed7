//! The balancers a simulated client proxy can run: Neutrino (the proxy's own
//! `EndpointSet::pick_at`, fed by in-band and pushed load reports) and the baselines,
//! which are the peers' algorithms re-implemented here: round robin, random,
//! least-request power of two choices (Envoy's default), peak-EWMA power of two choices
//! (Linkerd's), capacity-weighted round robin (static weights, like gRPC's
//! weighted_round_robin without its load feedback) and an oracle with global knowledge.
//!
//! Each client proxy owns one `Balancer`: its own counters, its own `EndpointLoad` per
//! backend. It must not copy or change the proxy's selection logic: Neutrino's choices
//! come only from `neutrino_proxy::select`, and what it learns only through
//! `EndpointLoad`'s public calls, as the real proxy's forwarding code makes them.

use std::net::SocketAddr;
use std::sync::Arc;

use neutrino_proxy::select::endpoints::{Endpoint, EndpointLoad, EndpointSet, FAST_FAILURE, InFlight};
use neutrino_proxy::select::{DIMS, NoFit};

use crate::events::{MS, Nanos};
use crate::model::Backend;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    RoundRobin,
    Random,
    LeastRequest,
    PeakEwma,
    WeightedRr,
    Oracle,
    Neutrino,
    /// The proxy's selection code with exact, instant load reports (every backend's true
    /// declared load, given to the proxy right before each pick): what better reporting
    /// could give at most. An experiment, not a deployable configuration.
    NeutrinoExact,
}

impl Policy {
    pub const ALL: [Policy; 8] = [
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastRequest,
        Policy::PeakEwma,
        Policy::WeightedRr,
        Policy::Oracle,
        Policy::Neutrino,
        Policy::NeutrinoExact,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::Random => "random",
            Policy::LeastRequest => "least-request",
            Policy::PeakEwma => "peak-ewma",
            Policy::WeightedRr => "weighted-rr",
            Policy::Oracle => "oracle",
            Policy::Neutrino => "neutrino",
            Policy::NeutrinoExact => "neutrino-exact",
        }
    }

    /// Runs the proxy's own selection code.
    pub fn is_neutrino(self) -> bool {
        matches!(self, Policy::Neutrino | Policy::NeutrinoExact)
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// Linkerd's defaults: an endpoint with no measurement yet counts as 30 ms...
const EWMA_DEFAULT_RTT_NS: f64 = 30.0 * MS as f64;
/// ...and the estimate decays with a 10 s time constant.
const EWMA_DECAY_NS: f64 = 10_000.0 * MS as f64;

/// Peak-EWMA round-trip estimate of one endpoint (tower's `PeakEwma`, as Linkerd uses
/// it): a slower response raises it at once; faster ones pull it down with the decay;
/// reading it decays it towards 0; cost = estimate x (pending + 1).
#[derive(Debug, Clone)]
struct Ewma {
    estimate_ns: f64,
    at: Nanos,
    pending: u32,
}

impl Ewma {
    fn new(now: Nanos) -> Ewma {
        Ewma { estimate_ns: EWMA_DEFAULT_RTT_NS, at: now, pending: 0 }
    }

    fn update(&mut self, rtt_ns: f64, now: Nanos) {
        if self.estimate_ns < rtt_ns {
            self.estimate_ns = rtt_ns;
        } else {
            let decay = (-(now.saturating_sub(self.at) as f64) / EWMA_DECAY_NS).exp();
            self.estimate_ns = self.estimate_ns * decay + rtt_ns * (1.0 - decay);
        }
        self.at = now;
    }

    fn cost(&mut self, now: Nanos) -> f64 {
        self.update(0.0, now);
        self.estimate_ns * f64::from(self.pending + 1)
    }
}

/// What came back for a request sent to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// 503 from the endpoint.
    Unavailable,
    /// No response within the request timeout (the client gave up).
    Timeout,
}

/// The outcome of a pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    To(usize),
    /// Nothing fits now (Neutrino only): wait for room, or refuse.
    NoRoom(NoFit),
}

/// The request being placed, as a balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub declared: u64,
    /// Only the oracle knows it.
    pub true_cost: f64,
    pub avoid: Option<usize>,
}

/// One client proxy's balancer.
#[derive(Debug)]
pub struct Balancer {
    pub policy: Policy,
    /// Backends 0..known are in this proxy's endpoint list.
    known: usize,
    capacities: Vec<u64>,
    rr_next: usize,
    wrr_current: Vec<i64>,
    active: Vec<u32>,
    ewma: Vec<Ewma>,
    set: EndpointSet,
    loads: Vec<Arc<EndpointLoad>>,
    /// Load reports are handed to the proxy this much older than they are, so that they
    /// expire this much sooner than `REPORT_TTL` (0: as measured). A what-if experiment
    /// of a shorter TTL that leaves the proxy's code as it is.
    pub backdate_ms: u64,
    /// Neutrino's picks by reason (single, p2c, only-fit, scan) and no-room answers.
    pub reasons: [u64; 5],
}

/// Virtual time as the proxy's millisecond clock (never 0, which means "never"; late
/// enough that reports can be backdated).
pub fn proxy_ms(now: Nanos) -> u64 {
    10_000 + now / MS
}

fn endpoint(i: usize, capacity: u64, load: Arc<EndpointLoad>) -> Endpoint {
    Endpoint {
        addr: SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
        capacity: [capacity, 0, 0],
        ready: true,
        pod: Arc::from(format!("backend-{i}")),
        zone: Arc::from("zone-a"),
        identity: None,
        load,
        conns: Arc::default(),
    }
}

impl Balancer {
    /// `capacities` of every backend that will ever exist; the first `known` are in the
    /// endpoint list from the start.
    pub fn new(policy: Policy, capacities: &[u64], known: usize, rng: &mut Rng) -> Balancer {
        let n = capacities.len();
        let mut b = Balancer {
            policy,
            known: 0,
            capacities: capacities.to_vec(),
            rr_next: rng.below(known.max(1)),
            // Random phases, so the clients' smooth WRR sequences are not in lockstep.
            wrr_current: capacities.iter().map(|&c| -(rng.below(c.max(1) as usize) as i64)).collect(),
            active: vec![0; n],
            ewma: (0..n).map(|_| Ewma::new(0)).collect(),
            set: EndpointSet::default(),
            loads: (0..n).map(|_| Arc::new(EndpointLoad::default())).collect(),
            reasons: [0; 5],
            backdate_ms: 0,
        };
        b.learn(known, 0);
        b
    }

    /// Backends up to `known` join this proxy's endpoint list at `now` (new ones start
    /// cold: slow start, as the proxy treats endpoints that appear in a config push).
    pub fn learn(&mut self, known: usize, now: Nanos) {
        let known = known.min(self.capacities.len());
        for i in self.known..known {
            if now > 0 {
                self.loads[i] = Arc::new(EndpointLoad::starting(proxy_ms(now)));
                self.ewma[i] = Ewma::new(now);
            }
        }
        self.known = known;
        if self.policy.is_neutrino() {
            let eps = (0..known).map(|i| endpoint(i, self.capacities[i], Arc::clone(&self.loads[i]))).collect();
            self.set = EndpointSet::new(eps);
        }
    }

    /// Chooses a backend for `ask` at `now`.
    pub fn pick(&mut self, ask: &Ask, now: Nanos, backends: &[Backend], rng: &mut Rng) -> Pick {
        let n = self.known;
        let avoid = ask.avoid.filter(|_| n > 1);
        let other_than = |i: usize| if Some(i) == avoid { (i + 1) % n } else { i };
        match self.policy {
            Policy::RoundRobin => {
                let i = other_than(self.rr_next % n);
                self.rr_next = i + 1;
                Pick::To(i)
            }
            Policy::Random => Pick::To(other_than(rng.below(n))),
            Policy::LeastRequest => {
                let (a, b) = two_distinct(n, avoid, rng);
                Pick::To(if self.active[b] < self.active[a] { b } else { a })
            }
            Policy::PeakEwma => {
                let (a, b) = two_distinct(n, avoid, rng);
                let (ca, cb) = (self.ewma[a].cost(now), self.ewma[b].cost(now));
                Pick::To(if cb < ca { b } else { a })
            }
            Policy::WeightedRr => {
                // Smooth weighted round robin (nginx); same proportions as gRPC's EDF.
                let total: i64 = self.capacities[..n].iter().map(|&c| c as i64).sum();
                let mut best = 0;
                for i in 0..n {
                    self.wrr_current[i] += self.capacities[i] as i64;
                    if Some(i) != avoid && (self.wrr_current[i] > self.wrr_current[best] || Some(best) == avoid) {
                        best = i;
                    }
                }
                self.wrr_current[best] -= total;
                Pick::To(best)
            }
            Policy::Oracle => Pick::To(oracle(backends, n, ask, rng.below(n))),
            Policy::Neutrino | Policy::NeutrinoExact => {
                let mut random = || rng.next_u64();
                match self.set.pick_at(&[ask.declared, 0, 0], avoid, proxy_ms(now), &mut random) {
                    Ok(choice) => {
                        self.reasons[choice.reason as usize] += 1;
                        Pick::To(choice.index)
                    }
                    Err(nofit) => {
                        self.reasons[4] += 1;
                        Pick::NoRoom(nofit)
                    }
                }
            }
        }
    }

    /// The request goes to `i`; Neutrino holds its declared cost there until the
    /// returned guard is dropped (when the response ends or the request fails).
    pub fn sent(&mut self, i: usize, declared: u64) -> Option<InFlight> {
        match self.policy {
            Policy::LeastRequest => self.active[i] += 1,
            Policy::PeakEwma => self.ewma[i].pending += 1,
            Policy::Neutrino | Policy::NeutrinoExact => {
                return Some(InFlight::new(Arc::clone(&self.loads[i]), [declared, 0, 0]));
            }
            _ => {}
        }
        None
    }

    /// What came back from `i`, after `rtt`. `reported` is the endpoint's in-band load
    /// report (the declared cost in flight there from all callers, this request's
    /// already released), absent on a timeout. Call before dropping the request's guard.
    pub fn answered(&mut self, i: usize, answer: Answer, rtt: Nanos, now: Nanos, reported: Option<u64>, declared: u64) {
        match self.policy {
            Policy::LeastRequest => self.active[i] = self.active[i].saturating_sub(1),
            Policy::PeakEwma => {
                self.ewma[i].pending = self.ewma[i].pending.saturating_sub(1);
                self.ewma[i].update(rtt as f64, now);
            }
            Policy::Neutrino | Policy::NeutrinoExact => {
                let load = &self.loads[i];
                let ms = proxy_ms(now);
                if let Some(total) = reported {
                    // As the proxy's forwarding code: the load all callers put there, less
                    // what this proxy still holds there besides this request.
                    let total = quantized(total, self.capacities[i]);
                    let ours = load.in_flight()[0];
                    let others = total.saturating_sub(ours.saturating_sub(declared));
                    load.set_reported([others, 0, 0], ms - self.backdate_ms);
                }
                let fast = rtt < FAST_FAILURE.as_nanos() as Nanos;
                match answer {
                    Answer::Ok => load.record_success(),
                    Answer::Unavailable => {
                        if fast {
                            load.record_fast_failure(ms);
                        }
                        load.record_failure(ms);
                    }
                    Answer::Timeout => {
                        load.record_failure(ms);
                    }
                }
            }
            _ => {}
        }
    }

    /// A load report pushed by the control plane arrives: each backend's declared cost in
    /// flight, measured at `measured`; as the proxy applies it, less its own in-flight
    /// cost now.
    pub fn pushed(&mut self, totals: &[u64], measured: Nanos) {
        if !self.policy.is_neutrino() {
            return;
        }
        for (i, &total) in totals.iter().enumerate().take(self.known) {
            let ours = self.loads[i].in_flight()[0];
            let others = quantized(total, self.capacities[i]).saturating_sub(ours);
            let mut v = [0u64; DIMS];
            v[0] = others;
            self.loads[i].set_reported(v, proxy_ms(measured) - self.backdate_ms);
        }
    }
}

/// The load as it crosses the wire: parts per million of capacity, and back.
fn quantized(load: u64, capacity: u64) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let ppm = u128::from(load) * 1_000_000 / u128::from(capacity);
    (u128::from(capacity) * ppm / 1_000_000) as u64
}

fn two_distinct(n: usize, avoid: Option<usize>, rng: &mut Rng) -> (usize, usize) {
    if n == 1 {
        return (0, 0);
    }
    let pool = |rng: &mut Rng| loop {
        let i = rng.below(n);
        if Some(i) != avoid || n <= 2 {
            return i;
        }
    };
    let a = pool(rng);
    let mut b = pool(rng);
    for _ in 0..8 {
        if b != a {
            break;
        }
        b = pool(rng);
    }
    (a, b)
}

/// The oracle: global, true knowledge. The backend (not failing, not `avoid`) with the
/// least true utilization of its effective capacity (capacity x speed) once the request
/// is placed; it never refuses (it sends to the least bad one when all are full).
/// Scanning starts at `start`, so ties do not favour low indices.
fn oracle(backends: &[Backend], n: usize, ask: &Ask, start: usize) -> usize {
    let mut best = (f64::INFINITY, start % n.max(1));
    for k in 0..n {
        let i = (start + k) % n;
        let b = &backends[i];
        if b.failing || Some(i) == ask.avoid {
            continue;
        }
        let score = (b.true_load + ask.true_cost) / (b.capacity * b.speed);
        if score < best.0 {
            best = (score, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_rises_at_once_and_decays_slowly() {
        let mut e = Ewma::new(0);
        e.update(100.0 * MS as f64, 0);
        assert_eq!(e.estimate_ns, 100.0 * MS as f64);
        e.update(10.0 * MS as f64, 10 * 1_000 * MS);
        let expected = 100.0 * (-1f64).exp() + 10.0 * (1.0 - (-1f64).exp());
        assert!((e.estimate_ns / MS as f64 - expected).abs() < 1e-9);
        e.pending = 2;
        assert!(e.cost(10 * 1_000 * MS) > 3.0 * expected * MS as f64 - 1.0);
    }

    #[test]
    fn weighted_round_robin_follows_capacity() {
        let caps = [1000, 2000, 4000];
        let mut rng = Rng::new(1, 1);
        let mut b = Balancer::new(Policy::WeightedRr, &caps, 3, &mut rng);
        let mut hits = [0u32; 3];
        let ask = Ask { declared: 10, true_cost: 10.0, avoid: None };
        for _ in 0..700 {
            if let Pick::To(i) = b.pick(&ask, 0, &[], &mut rng) {
                hits[i] += 1;
            }
        }
        for (h, want) in hits.iter().zip([100u32, 200, 400]) {
            assert!(h.abs_diff(want) <= 2, "{hits:?}");
        }
    }

    #[test]
    fn neutrino_learns_in_band_load_and_avoids_the_busy_endpoint() {
        let caps = [1000, 1000];
        let mut rng = Rng::new(2, 2);
        let mut b = Balancer::new(Policy::Neutrino, &caps, 2, &mut rng);
        // Endpoint 0 reports 900 millis of others' load; endpoint 1 reports none.
        let g = b.sent(0, 10);
        b.answered(0, Answer::Ok, 50 * MS, 100 * MS, Some(900), 10);
        drop(g);
        let g = b.sent(1, 10);
        b.answered(1, Answer::Ok, 50 * MS, 100 * MS, Some(0), 10);
        drop(g);
        let ask = Ask { declared: 200, true_cost: 200.0, avoid: None };
        for _ in 0..50 {
            assert_eq!(b.pick(&ask, 110 * MS, &[], &mut rng), Pick::To(1));
        }
    }

    #[test]
    fn wire_quantization_is_close() {
        assert_eq!(quantized(640, 1000), 640);
        assert!(quantized(333, 4000).abs_diff(333) <= 1);
    }
}
