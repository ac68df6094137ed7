//! Stats: per-operation request counters and latency histograms, lock-free.
//!
//! Each (service, OpenAPI operation) owns one `RouteStats`, created when the route table
//! is compiled and carried across config snapshots (like endpoint load counters), so a
//! push never resets a counter. The request path only does relaxed atomic adds on the
//! operation it already holds: no map lookup, no lock, no allocation. Labels are
//! attached when `/metrics` is scraped (`telemetry::metrics`). It must not allocate or
//! block on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::select::Reason;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// Status classes as labelled: 1xx..5xx, and "error" when no response head was sent.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Which side of the pod a request crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From this pod's app to a service.
    Outbound,
    /// From another pod (or an unmeshed client) to this pod's app.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Requests of one direction: counts by status class and a latency histogram.
#[derive(Debug, Default)]
pub struct Traffic {
    by_class: [AtomicU64; 6],
    /// Not cumulative: bucket i counts latencies in (BUCKETS_US[i-1], BUCKETS_US[i]];
    /// the last one everything above the largest bound.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

/// What a scrape reads from a `Traffic`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficSnapshot {
    pub by_class: [u64; 6],
    /// (upper bound in seconds, count in that bucket alone), +Inf last. Not
    /// cumulative: prometheus-client's encoder accumulates them.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

/// The class index of an HTTP status, or of "no response" (`None`).
pub fn class_of(status: Option<u16>) -> usize {
    match status {
        Some(s @ 100..=599) => usize::from(s / 100) - 1,
        _ => 5,
    }
}

/// The bucket a latency falls in.
pub fn bucket_of(latency_us: u64) -> usize {
    BUCKETS_US.partition_point(|&b| b < latency_us)
}

impl Traffic {
    pub fn record(&self, status: Option<u16>, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        self.by_class[class_of(status)].fetch_add(1, Ordering::Relaxed);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> TrafficSnapshot {
        let by_class = std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed));
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let bound = BUCKETS_US.get(i).map_or(f64::INFINITY, |&us| us as f64 / 1e6);
                (bound, b.load(Ordering::Relaxed))
            })
            .collect();
        TrafficSnapshot {
            by_class,
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Everything counted for one operation of one service.
#[derive(Debug, Default)]
pub struct RouteStats {
    pub outbound: Traffic,
    pub inbound: Traffic,
    /// Selections by reason (`Reason as usize`).
    reasons: [AtomicU64; 4],
    /// Requests that had to wait for room.
    queued: AtomicU64,
    /// Requests refused with 503 because nothing had room in time.
    shed: AtomicU64,
}

fn reason_index(r: Reason) -> usize {
    match r {
        Reason::Single => 0,
        Reason::TwoChoices => 1,
        Reason::OnlyOneFit => 2,
        Reason::Scan => 3,
    }
}

/// The reasons in index order, as labelled.
pub const REASONS: [Reason; 4] = [Reason::Single, Reason::TwoChoices, Reason::OnlyOneFit, Reason::Scan];

impl RouteStats {
    pub fn traffic(&self, d: Direction) -> &Traffic {
        match d {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    pub fn chose(&self, reason: Reason) {
        self.reasons[reason_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn queued(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reasons(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.reasons[i].load(Ordering::Relaxed))
    }

    pub fn queued_count(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn shed_count(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_into_classes() {
        assert_eq!(CLASSES[class_of(Some(204))], "2xx");
        assert_eq!(CLASSES[class_of(Some(503))], "5xx");
        assert_eq!(CLASSES[class_of(Some(101))], "1xx");
        assert_eq!(CLASSES[class_of(None)], "error");
        assert_eq!(CLASSES[class_of(Some(99))], "error");
    }

    #[test]
    fn latencies_fall_into_buckets_with_inclusive_upper_bounds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(100), 0);
        assert_eq!(bucket_of(101), 1);
        assert_eq!(bucket_of(10_000_000), BUCKETS_US.len() - 1);
        assert_eq!(bucket_of(10_000_001), BUCKETS_US.len());
    }

    #[test]
    fn snapshots_count_per_bucket_and_sum_up() {
        let t = Traffic::default();
        t.record(Some(200), Duration::from_micros(80));
        t.record(Some(200), Duration::from_micros(300));
        t.record(Some(503), Duration::from_secs(20));
        let s = t.snapshot();
        assert_eq!(s.by_class, [0, 2, 0, 0, 1, 0]);
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[2], (0.0005, 1));
        assert_eq!(s.buckets.last().copied(), Some((f64::INFINITY, 1)));
        assert!((s.sum_seconds - 20.00038).abs() < 1e-9);
    }
}
