//! The endpoints of one service as selection sees them: addresses, capacities,
//! sampling weights, and each endpoint's live load (this proxy's in-flight cost plus
//! the last pushed report).
//!
//! Load counters are atomics owned by one `EndpointLoad` per endpoint that outlives
//! config snapshots, so a config push never resets what is in flight. Requests add
//! their cost when chosen and take it back when their response ends (`InFlight` drop).
//! Nothing here blocks or locks, and nothing reads a clock: callers pass the time
//! (`now_ms` in the proxy, virtual time in the selection simulator).
//!
//! The estimate of an endpoint's load blends three signals: the newest report of what
//! others put on it (pushed by the control plane, or in band on a response, whichever
//! was measured later), plus this proxy's own in-flight cost, live.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::{Candidate, Choice, DIMS, NoFit, Weights};

/// Woken when any request releases its cost while some request waits for room.
static RELEASED: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// How many requests wait for room: releases only notify when someone listens.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// Waits until some request's cost is released (anywhere in this proxy), or until
/// `deadline`. Spurious wake-ups are expected: the caller picks again.
pub async fn released_or(deadline: tokio::time::Instant) {
    WAITING.fetch_add(1, Ordering::SeqCst);
    let _ = tokio::time::timeout_at(deadline, RELEASED.notified()).await;
    WAITING.fetch_sub(1, Ordering::SeqCst);
}

/// Milliseconds on a monotonic clock private to this process.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How long a load report counts after it was measured.
pub const REPORT_TTL: Duration = Duration::from_secs(3);

/// A new endpoint warms up over this long (slow start)...
pub const SLOW_START: Duration = Duration::from_secs(10);
/// ...starting out compared as this utilized.
const COLD_START: f64 = 0.9;

/// A 503 or 429 answered faster than this is a fast failure: it says nothing about the
/// endpoint being idle, and counts against it.
pub const FAST_FAILURE: Duration = Duration::from_millis(5);
/// Utilization added per fast failure (capped at 1)...
const PENALTY_STEP: f64 = 0.25;
/// ...halving every this long.
const PENALTY_HALF_LIFE_MS: f64 = 1000.0;

/// Passive outlier ejection: this many consecutive failures eject an endpoint...
pub const EJECT_AFTER_FAILURES: u32 = 5;
/// ...for this long times the number of times it was ejected in a row (capped).
pub const EJECT_BASE: Duration = Duration::from_secs(10);
const EJECT_MAX_FACTOR: u32 = 6;

/// Live load and health of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    in_flight: [AtomicU64; DIMS],
    /// Load the backend last reported, in capacity units (Capacity lane; 0 = none).
    reported: [AtomicU64; DIMS],
    /// When `reported` was measured (`now_ms`); 0: never.
    reported_at_ms: AtomicU64,
    /// Fast-failure penalty in parts per million of utilization, as of `penalty_at_ms`.
    penalty_ppm: AtomicU64,
    penalty_at_ms: AtomicU64,
    /// When the endpoint appeared, for slow start; 0: warm from the start.
    born_ms: AtomicU64,
    requests_in_flight: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
}

impl EndpointLoad {
    /// An endpoint that appeared at `now_ms` next to others already serving: it takes
    /// work gradually (slow start).
    pub fn starting(now_ms: u64) -> EndpointLoad {
        EndpointLoad { born_ms: AtomicU64::new(now_ms.max(1)), ..Default::default() }
    }

    /// Selection's view of the endpoint at `now_ms` (eligible unless ejected; the caller
    /// adds readiness). A stale report makes its others' load unknown, not zero.
    pub fn candidate(&self, capacity: [u64; DIMS], now_ms: u64) -> Candidate {
        let at = self.reported_at_ms.load(Ordering::Relaxed);
        let known = at != 0 && now_ms.saturating_sub(at) < REPORT_TTL.as_millis() as u64;
        let own = self.in_flight();
        let used = std::array::from_fn(|d| {
            let others = if known { self.reported[d].load(Ordering::Relaxed) } else { 0 };
            own[d].saturating_add(others)
        });
        Candidate {
            capacity,
            used,
            own,
            known,
            penalty: self.penalty(now_ms),
            cold: self.cold(now_ms),
            eligible: !self.ejected(now_ms),
        }
    }

    /// Load as `candidate` estimates it (for dumps and tests).
    pub fn used(&self, now_ms: u64) -> [u64; DIMS] {
        self.candidate([0; DIMS], now_ms).used
    }

    /// Slow start: how cold the endpoint still is, 0..=COLD_START.
    pub fn cold(&self, now_ms: u64) -> f64 {
        let born = self.born_ms.load(Ordering::Relaxed);
        let window = SLOW_START.as_millis() as u64;
        let age = now_ms.saturating_sub(born);
        if born == 0 || age >= window { 0.0 } else { COLD_START * (1.0 - age as f64 / window as f64) }
    }

    /// The fast-failure penalty at `now_ms`, decayed.
    pub fn penalty(&self, now_ms: u64) -> f64 {
        let ppm = self.penalty_ppm.load(Ordering::Relaxed);
        if ppm == 0 {
            return 0.0;
        }
        let age = now_ms.saturating_sub(self.penalty_at_ms.load(Ordering::Relaxed)) as f64;
        ppm as f64 / 1e6 * 0.5f64.powf(age / PENALTY_HALF_LIFE_MS)
    }

    /// Counts a fast failure (a 503 or 429 answered within `FAST_FAILURE`).
    pub fn record_fast_failure(&self, now_ms: u64) {
        let next = (self.penalty(now_ms) + PENALTY_STEP).min(1.0);
        self.penalty_ppm.store((next * 1e6) as u64, Ordering::Relaxed);
        self.penalty_at_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> [u64; DIMS] {
        std::array::from_fn(|d| self.in_flight[d].load(Ordering::Relaxed))
    }

    pub fn requests_in_flight(&self) -> u64 {
        self.requests_in_flight.load(Ordering::Relaxed)
    }

    /// Ejected endpoints take no new requests until their ejection ends.
    pub fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure (connect error, reset, 502/503/504 from the upstream itself);
    /// returns true when this failure ejected the endpoint.
    pub fn record_failure(&self, now_ms: u64) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < EJECT_AFTER_FAILURES || self.ejected(now_ms) {
            return false;
        }
        let times = (self.ejections.fetch_add(1, Ordering::Relaxed) + 1).min(EJECT_MAX_FACTOR);
        let until = now_ms + EJECT_BASE.as_millis() as u64 * u64::from(times);
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }

    /// Records the load others put on the endpoint, as measured at `at_ms`, unless a
    /// newer report is already held (the pushed view lags the in-band header).
    pub fn set_reported(&self, others: [u64; DIMS], at_ms: u64) {
        let at_ms = at_ms.max(1);
        if self.reported_at_ms.load(Ordering::Relaxed) > at_ms {
            return;
        }
        for (slot, v) in self.reported.iter().zip(others) {
            slot.store(v, Ordering::Relaxed);
        }
        self.reported_at_ms.store(at_ms, Ordering::Relaxed);
    }
}

/// Holds a request's cost on its endpoint until dropped (when the response ends or
/// the request fails).
#[derive(Debug)]
pub struct InFlight {
    load: Arc<EndpointLoad>,
    cost: [u64; DIMS],
}

impl InFlight {
    pub fn new(load: Arc<EndpointLoad>, cost: [u64; DIMS]) -> Self {
        for (slot, c) in load.in_flight.iter().zip(cost) {
            slot.fetch_add(c, Ordering::Relaxed);
        }
        load.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { load, cost }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for (slot, c) in self.load.in_flight.iter().zip(self.cost) {
            slot.fetch_sub(c, Ordering::Relaxed);
        }
        self.load.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
        if WAITING.load(Ordering::SeqCst) > 0 {
            RELEASED.notify_waiters();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub capacity: [u64; DIMS],
    pub ready: bool,
    pub pod: Arc<str>,
    pub zone: Arc<str>,
    /// The SPIFFE id the endpoint's proxy presents; `None`: not meshed (plaintext).
    pub identity: Option<Arc<str>>,
    pub load: Arc<EndpointLoad>,
    /// Its idle upstream connections: forward's, carried here so that a request finds
    /// them through its chosen endpoint. Selection never looks at them.
    pub conns: Arc<crate::forward::pool::EndpointConns>,
}

/// A service's endpoints, compiled once per `Endpoints` version.
#[derive(Debug, Clone, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    weights: Weights,
    /// Only the endpoints with GPUs: where GPU requests sample.
    gpu_weights: Weights,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        let caps: Vec<[u64; DIMS]> = endpoints.iter().map(|e| e.capacity).collect();
        let weights = Weights::new(caps.iter().copied());
        let gpu_weights = Weights::subset(&caps, |c| c[2] > 0);
        EndpointSet { endpoints, weights, gpu_weights }
    }

    /// Chooses an endpoint for a request costing `cost`, now, with the thread's RNG.
    /// `avoid` (an endpoint that just failed this request) is skipped when others can
    /// take it.
    pub fn pick(&self, cost: &[u64; DIMS], avoid: Option<usize>) -> Result<Choice, NoFit> {
        self.pick_at(cost, avoid, now_ms(), rand::random::<u64>)
    }

    /// `pick` at time `now` with the random numbers `random` yields.
    pub fn pick_at(
        &self,
        cost: &[u64; DIMS],
        avoid: Option<usize>,
        now: u64,
        mut random: impl FnMut() -> u64,
    ) -> Result<Choice, NoFit> {
        let weights = if cost[2] > 0 { &self.gpu_weights } else { &self.weights };
        if weights.is_empty() && !self.endpoints.is_empty() {
            // It needs a resource no endpoint has: waiting will not help.
            let eligible = self.endpoints.iter().filter(|e| e.ready).count();
            return Err(NoFit { eligible, least_over: None, too_big: true });
        }
        let mut choose = |honour_health: bool| {
            let view = |i: usize| {
                let e = &self.endpoints[i];
                let c = e.load.candidate(e.capacity, now);
                let healthy = !honour_health || (c.eligible && Some(i) != avoid);
                Candidate { eligible: e.ready && healthy, ..c }
            };
            super::pick(weights, cost, view, &mut random)
        };
        match choose(true) {
            // Ejection and avoidance never empty a service: if they leave nothing
            // eligible, every ready endpoint is eligible again.
            Err(nofit) if nofit.eligible == 0 => choose(false),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_count_while_fresh_and_then_expire() {
        let l = EndpointLoad::default();
        let _ours = InFlight::new(Arc::new(EndpointLoad::default()), [1, 0, 0]);
        l.set_reported([700, 0, 0], 10_000);
        assert_eq!(l.used(10_000 + 2_999), [700, 0, 0]);
        let stale = l.candidate([1000, 0, 0], 10_000 + 3_000);
        assert_eq!((stale.used, stale.known), ([0, 0, 0], false), "stale: unknown, only what we hold ourselves");
    }

    #[test]
    fn the_newest_report_wins_and_own_cost_adds_live() {
        let l = Arc::new(EndpointLoad::default());
        l.set_reported([300, 0, 0], 5_000);
        l.set_reported([900, 0, 0], 4_000); // an older pushed view arriving late
        let _mine = InFlight::new(Arc::clone(&l), [50, 0, 0]);
        let c = l.candidate([1000, 0, 0], 5_100);
        assert_eq!((c.used, c.own, c.known), ([350, 0, 0], [50, 0, 0], true));
    }

    #[test]
    fn fast_failures_add_a_decaying_penalty() {
        let l = EndpointLoad::default();
        assert_eq!(l.penalty(0), 0.0);
        for _ in 0..10 {
            l.record_fast_failure(1_000);
        }
        assert!((l.penalty(1_000) - 1.0).abs() < 1e-6, "capped at 1");
        assert!((l.penalty(2_000) - 0.5).abs() < 1e-3, "halves in a second");
        assert!(l.penalty(11_000) < 0.001);
    }

    #[test]
    fn new_endpoints_warm_up_and_initial_ones_start_warm() {
        let l = EndpointLoad::starting(1_000);
        assert!((l.cold(1_000) - COLD_START).abs() < 1e-9);
        assert!(l.cold(1_000 + SLOW_START.as_millis() as u64 / 2) < COLD_START / 2.0 + 1e-9);
        assert_eq!(l.cold(1_000 + SLOW_START.as_millis() as u64), 0.0);
        assert_eq!(EndpointLoad::default().cold(1_000), 0.0);
    }

    #[test]
    fn consecutive_failures_eject_and_success_forgives() {
        let l = EndpointLoad::default();
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            assert!(!l.record_failure(1000));
        }
        l.record_success();
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            assert!(!l.record_failure(1000));
        }
        assert!(l.record_failure(1000), "the fifth in a row ejects");
        assert!(l.ejected(1000 + 9_999));
        assert!(!l.ejected(1000 + 10_000));
        // Ejected again right away: twice as long.
        for _ in 0..EJECT_AFTER_FAILURES {
            l.record_failure(20_000);
        }
        assert!(l.ejected(20_000 + 19_999));
    }

    fn set(n: usize) -> EndpointSet {
        EndpointSet::new(
            (0..n)
                .map(|i| Endpoint {
                    addr: SocketAddr::from(([10, 0, 0, i as u8], 80)),
                    capacity: [1000, 0, 0],
                    ready: true,
                    pod: Arc::from(""),
                    zone: Arc::from(""),
                    identity: None,
                    load: Arc::default(),
                    conns: Arc::default(),
                })
                .collect(),
        )
    }

    #[test]
    fn ejected_and_avoided_endpoints_are_skipped_but_never_all() {
        let s = set(3);
        let now = now_ms();
        for _ in 0..EJECT_AFTER_FAILURES {
            s.endpoints[0].load.record_failure(now);
        }
        for _ in 0..200 {
            let c = s.pick(&[1, 0, 0], Some(1)).expect("one left");
            assert_eq!(c.index, 2);
        }
        for e in &s.endpoints {
            for _ in 0..EJECT_AFTER_FAILURES {
                e.load.record_failure(now);
            }
        }
        assert!(s.pick(&[1, 0, 0], None).is_ok(), "all ejected: all eligible again");
    }

    #[test]
    fn a_gpu_request_with_no_gpu_endpoint_is_too_big_not_unavailable() {
        let e = set(3).pick(&[1, 0, 1], None).expect_err("no GPUs");
        assert_eq!(e, NoFit { eligible: 3, least_over: None, too_big: true });
    }
}
