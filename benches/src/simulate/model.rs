//! The simulated world: the workload's operation classes and the backend model
//! (processor sharing against a CPU capacity, with a speed factor for slow, cold and
//! healthy nodes).
//!
//! A backend of capacity C (cpu millis) runs every request it holds at once. A request
//! of true cost c holds c millis of CPU while it runs; while the true cost of all the
//! requests it holds is at most C, each progresses at full speed, and beyond that all
//! share the CPU: each progresses at C / (total true cost) of full speed (processor
//! sharing weighted by cost, so the node never does more than C millis of work per
//! second). A slow or cold node's speed factor (below 1) scales that further. Because
//! every request on a node progresses at the same rate, one "virtual clock" per node
//! (work done by any request since the start) and a heap of finish points give each
//! completion in O(log n).
//!
//! Pure: plain values and arithmetic on virtual time (f64 seconds). It must not know
//! about clients, policies or the proxy's selection code.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// One operation class of the workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpClass {
    /// The class's relative cost (1, 4, 16, 64).
    pub class: u64,
    /// Declared cost in cpu millis (what `x-neutrino-resources` says).
    pub declared: u64,
    /// Mean service time at full speed, seconds (lognormal around it).
    pub mean_s: f64,
    /// Share of requests.
    pub share: f64,
}

/// Costs 1, 4, 16, 64 (x 10 cpu millis); mean service time 40 ms x sqrt(class) (40,
/// 80, 160, 320 ms); light requests are the most frequent.
pub const CLASSES: [OpClass; 4] = [
    OpClass { class: 1, declared: 10, mean_s: 0.040, share: 0.55 },
    OpClass { class: 4, declared: 40, mean_s: 0.080, share: 0.25 },
    OpClass { class: 16, declared: 160, mean_s: 0.160, share: 0.13 },
    OpClass { class: 64, declared: 640, mean_s: 0.320, share: 0.07 },
];
/// Shape of the lognormal service times.
pub const SERVICE_SIGMA: f64 = 0.5;
/// True cost = declared x uniform(1 - COST_ERROR, 1 + COST_ERROR).
pub const COST_ERROR: f64 = 0.3;

/// Expected work of one request, cost x service time (millis x seconds).
pub fn mean_work() -> f64 {
    CLASSES.iter().map(|c| c.share * c.declared as f64 * c.mean_s).sum()
}

/// Requests per second that make `load` of a fleet of `capacity` cpu millis in total.
pub fn arrival_rate(load: f64, capacity: f64) -> f64 {
    load * capacity / mean_work()
}

/// The class a uniform `u` in [0, 1) falls on.
pub fn class_of(u: f64) -> usize {
    let mut acc = 0.0;
    for (i, c) in CLASSES.iter().enumerate() {
        acc += c.share;
        if u < acc {
            return i;
        }
    }
    CLASSES.len() - 1
}

/// A request's place on a backend: it finishes when the node's virtual clock reaches
/// `finish`. `slot`/`serial` name the request (the simulator checks it still runs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Job {
    pub finish: f64,
    pub slot: u32,
    pub serial: u64,
}

impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    fn cmp(&self, other: &Self) -> Ordering {
        self.finish.total_cmp(&other.finish).then(self.serial.cmp(&other.serial))
    }
}

/// One backend node.
#[derive(Debug)]
pub struct Backend {
    /// cpu millis.
    pub capacity: f64,
    /// 1 = healthy; 0.2 = five times slower.
    pub speed: f64,
    /// Answers 503 to everything, at once.
    pub failing: bool,
    /// True cost of the requests it runs now.
    pub true_load: f64,
    /// Declared cost of the requests it runs now: what its proxy reports.
    pub declared_load: u64,
    pub jobs: usize,
    /// Bumped on every change; a scheduled completion with an older one is stale.
    pub generation: u64,
    /// Integral over the measurement window of min(true load, C) / C, seconds.
    pub busy: f64,
    /// Integral over the window of true load / C (above 1 when overloaded), seconds.
    pub demand: f64,
    /// Time in the window with more true load than capacity (everything slowed), seconds.
    pub overloaded: f64,
    vclock: f64,
    last: f64,
    heap: BinaryHeap<Reverse<Job>>,
    window: (f64, f64),
}

impl Backend {
    /// A healthy node; utilization is integrated over `window` (seconds).
    pub fn new(capacity: f64, window: (f64, f64)) -> Backend {
        Backend {
            capacity,
            speed: 1.0,
            failing: false,
            true_load: 0.0,
            declared_load: 0,
            jobs: 0,
            generation: 0,
            busy: 0.0,
            demand: 0.0,
            overloaded: 0.0,
            vclock: 0.0,
            last: 0.0,
            heap: BinaryHeap::new(),
            window,
        }
    }

    /// Progress per second of every request it runs now.
    pub fn rate(&self) -> f64 {
        if self.true_load <= self.capacity { self.speed } else { self.speed * self.capacity / self.true_load }
    }

    /// Brings the node's clocks to `t`.
    pub fn advance(&mut self, t: f64) {
        if t <= self.last {
            return;
        }
        let (a, b) = (self.last.max(self.window.0), t.min(self.window.1));
        if b > a {
            self.busy += (b - a) * self.true_load.min(self.capacity) / self.capacity;
            self.demand += (b - a) * self.true_load / self.capacity;
            if self.true_load > self.capacity * (1.0 + 1e-9) {
                self.overloaded += b - a;
            }
        }
        self.vclock += self.rate() * (t - self.last);
        self.last = t;
    }

    /// Starts a request needing `work` seconds at full speed.
    pub fn start(&mut self, t: f64, slot: u32, serial: u64, work: f64, true_cost: f64, declared: u64) {
        self.advance(t);
        self.heap.push(Reverse(Job { finish: self.vclock + work, slot, serial }));
        self.true_load += true_cost;
        self.declared_load += declared;
        self.jobs += 1;
        self.generation += 1;
    }

    /// A request stops holding the node (finished, or cancelled by its client's
    /// timeout: a cancelled request's heap entry stays and is skipped when due).
    pub fn stop(&mut self, t: f64, true_cost: f64, declared: u64) {
        self.advance(t);
        self.jobs -= 1;
        self.true_load = if self.jobs == 0 { 0.0 } else { (self.true_load - true_cost).max(0.0) };
        self.declared_load = self.declared_load.saturating_sub(declared);
        self.generation += 1;
    }

    pub fn set_speed(&mut self, t: f64, speed: f64) {
        self.advance(t);
        self.speed = speed;
        self.generation += 1;
    }

    /// When the next request will finish if nothing changes (seconds).
    pub fn next_done(&self) -> Option<f64> {
        let Reverse(top) = self.heap.peek()?;
        Some(self.last + (top.finish - self.vclock).max(0.0) / self.rate())
    }

    /// A request whose work is done by now (call `advance` first), if any.
    pub fn pop_due(&mut self) -> Option<Job> {
        let Reverse(top) = self.heap.peek()?;
        if top.finish <= self.vclock + 1e-9 { self.heap.pop().map(|Reverse(j)| j) } else { None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Backend {
        Backend::new(1000.0, (0.0, 100.0))
    }

    #[test]
    fn under_capacity_requests_run_at_full_speed() {
        let mut b = node();
        b.start(0.0, 1, 1, 0.1, 400.0, 400);
        b.start(0.0, 2, 2, 0.2, 500.0, 500);
        assert!((b.next_done().expect("jobs") - 0.1).abs() < 1e-12);
        b.advance(0.1);
        let j = b.pop_due().expect("first done");
        assert_eq!(j.slot, 1);
        b.stop(0.1, 400.0, 400);
        assert!((b.next_done().expect("one left") - 0.2).abs() < 1e-12);
    }

    #[test]
    fn over_capacity_requests_share_the_cpu() {
        // 2000 millis of work on a 1000-millis node: everything runs at half speed.
        let mut b = node();
        b.start(0.0, 1, 1, 0.1, 1000.0, 1000);
        b.start(0.0, 2, 2, 0.1, 1000.0, 1000);
        assert!((b.rate() - 0.5).abs() < 1e-12);
        assert!((b.next_done().expect("jobs") - 0.2).abs() < 1e-12);
        // The first leaves early (cancelled at 0.1 s, half done): the other speeds up and
        // finishes its remaining 0.05 s of work at full speed.
        b.stop(0.1, 1000.0, 1000);
        assert!((b.next_done().expect("jobs") - 0.15).abs() < 1e-12);
        b.advance(0.15);
        assert_eq!(b.pop_due().map(|j| j.slot), Some(1), "the cancelled one's entry comes due first");
        assert_eq!(b.pop_due().map(|j| j.slot), Some(2));
        b.stop(0.15, 1000.0, 1000);
        assert_eq!((b.jobs, b.true_load, b.declared_load), (0, 0.0, 0));
    }

    #[test]
    fn a_slow_node_takes_longer_and_utilization_is_integrated() {
        let mut b = node();
        b.set_speed(0.0, 0.2);
        b.start(0.0, 1, 1, 0.1, 500.0, 500);
        assert!((b.next_done().expect("job") - 0.5).abs() < 1e-12);
        b.advance(0.5);
        assert!(b.pop_due().is_some());
        b.stop(0.5, 500.0, 500);
        b.advance(1.0);
        assert!((b.busy - 0.25).abs() < 1e-12, "half busy for half a second: {}", b.busy);
    }

    #[test]
    fn workload_means() {
        let w = mean_work();
        assert!((w - 18.684).abs() < 1e-9, "{w}");
        assert_eq!(class_of(0.0), 0);
        assert_eq!(class_of(0.56), 1);
        assert_eq!(class_of(0.999_999), 3);
        assert!((CLASSES.iter().map(|c| c.share).sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
