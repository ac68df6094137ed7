//! The event queue of the discrete-event simulation: events ordered by virtual time
//! (integer nanoseconds), ties broken by the order they were scheduled, so a run is
//! deterministic.
//!
//! Pure data structure: it must not know what events mean or read any clock.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Virtual time in nanoseconds since the start of a run.
pub type Nanos = u64;

pub const MS: Nanos = 1_000_000;
pub const SEC: Nanos = 1_000_000_000;

pub fn secs(t: Nanos) -> f64 {
    t as f64 / SEC as f64
}

/// Seconds to the first nanosecond at or after them.
pub fn nanos_ceil(s: f64) -> Nanos {
    (s * SEC as f64).ceil().max(0.0) as Nanos
}

#[derive(Debug)]
struct Entry<E> {
    at: Nanos,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    /// Reversed: the heap's top is the earliest event.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Earliest event first; equal times in scheduling order.
#[derive(Debug)]
pub struct Queue<E> {
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue { heap: BinaryHeap::new(), seq: 0 }
    }
}

impl<E> Queue<E> {
    pub fn push(&mut self, at: Nanos, event: E) {
        self.seq += 1;
        self.heap.push(Entry { at, seq: self.seq, event });
    }

    pub fn pop(&mut self) -> Option<(Nanos, E)> {
        self.heap.pop().map(|e| (e.at, e.event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_ties_in_scheduling_order() {
        let mut q = Queue::default();
        q.push(30, "c");
        q.push(10, "a1");
        q.push(20, "b");
        q.push(10, "a2");
        q.push(10, "a3");
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|(_, e)| e)).collect();
        assert_eq!(order, ["a1", "a2", "a3", "b", "c"]);
        assert!(q.pop().is_none());
    }

    #[test]
    fn time_conversions_round_up() {
        assert_eq!(nanos_ceil(0.25), 250 * MS);
        assert_eq!(nanos_ceil(1e-10), 1);
        assert_eq!(secs(1_500 * MS), 1.5);
    }
}
