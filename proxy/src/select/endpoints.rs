//! The endpoints of one service as selection sees them: addresses, capacities,
//! sampling weights, and each endpoint's live load (this proxy's in-flight cost plus
//! the last pushed report).
//!
//! Load counters are atomics owned by one `EndpointLoad` per endpoint that outlives
//! config snapshots, so a config push never resets what is in flight. Requests add
//! their cost when chosen and take it back when their response ends (`InFlight` drop).
//! Nothing here blocks or locks.

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

/// How long a load report counts.
pub const REPORT_TTL: Duration = Duration::from_secs(2);

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
    /// When `reported` was last set (`now_ms`); 0: never.
    reported_at_ms: AtomicU64,
    requests_in_flight: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
}

impl EndpointLoad {
    /// Load on the endpoint as this proxy knows it at `now_ms`: its own in-flight cost,
    /// plus the last report while it is fresh. A stale report counts for nothing, so a
    /// proxy that stopped sending to an endpoint (because it looked full) tries again.
    pub fn used(&self, now_ms: u64) -> [u64; DIMS] {
        let at = self.reported_at_ms.load(Ordering::Relaxed);
        let fresh = at != 0 && now_ms.saturating_sub(at) < REPORT_TTL.as_millis() as u64;
        std::array::from_fn(|d| {
            let reported = if fresh { self.reported[d].load(Ordering::Relaxed) } else { 0 };
            self.in_flight[d].load(Ordering::Relaxed).saturating_add(reported)
        })
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

    /// Records the load others put on the endpoint, as reported at `now_ms`.
    pub fn set_reported(&self, used: [u64; DIMS], now_ms: u64) {
        for (slot, v) in self.reported.iter().zip(used) {
            slot.store(v, Ordering::Relaxed);
        }
        self.reported_at_ms.store(now_ms.max(1), Ordering::Relaxed);
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
    pub load: Arc<EndpointLoad>,
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

    /// Chooses an endpoint for a request costing `cost`, with the thread's fast RNG.
    /// `avoid` (an endpoint that just failed this request) is skipped when others can
    /// take it.
    pub fn pick(&self, cost: &[u64; DIMS], avoid: Option<usize>) -> Result<Choice, NoFit> {
        let now = now_ms();
        let weights = if cost[2] > 0 { &self.gpu_weights } else { &self.weights };
        if weights.is_empty() && !self.endpoints.is_empty() {
            // It needs a resource no endpoint has: waiting will not help.
            let eligible = self.endpoints.iter().filter(|e| e.ready).count();
            return Err(NoFit { eligible, least_over: None, too_big: true });
        }
        let choose = |honour_health: bool| {
            let view = |i: usize| {
                let e = &self.endpoints[i];
                let healthy = !honour_health || (!e.load.ejected(now) && Some(i) != avoid);
                Candidate { capacity: e.capacity, used: e.load.used(now), eligible: e.ready && healthy }
            };
            super::pick(weights, cost, view, rand::random::<u64>)
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
        assert_eq!(l.used(10_000 + 1_999), [700, 0, 0]);
        assert_eq!(l.used(10_000 + 2_000), [0, 0, 0], "stale: only what we hold ourselves");
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
                    load: Arc::default(),
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
