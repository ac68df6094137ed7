//! When to publish: after `quiet` without changes, but never later than `max_delay`
//! after the first unpublished change. A pure state machine over instants, so the
//! index's timing is unit-tested without clocks.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Debounce {
    quiet: Duration,
    max_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debounce {
    pub fn new(quiet: Duration, max_delay: Duration) -> Self {
        Debounce { quiet, max_delay, first: None, last: None }
    }

    /// Records a change seen at `now`.
    pub fn change(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the pending changes are due, if any are pending.
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max_delay))
    }

    /// True (and resets) when pending changes are due at `now`.
    pub fn take_due(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(d) if d <= now => {
                self.first = None;
                self.last = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn debounce() -> Debounce {
        Debounce::new(100 * MS, 1000 * MS)
    }

    #[test]
    fn nothing_pending_nothing_due() {
        let mut d = debounce();
        assert_eq!(d.deadline(), None);
        assert!(!d.take_due(Instant::now()));
    }

    #[test]
    fn publishes_after_quiet_period() {
        let t0 = Instant::now();
        let mut d = debounce();
        d.change(t0);
        assert!(!d.take_due(t0 + 99 * MS));
        assert!(d.take_due(t0 + 100 * MS));
        assert_eq!(d.deadline(), None, "reset after publishing");
    }

    #[test]
    fn each_change_extends_the_quiet_period() {
        let t0 = Instant::now();
        let mut d = debounce();
        d.change(t0);
        d.change(t0 + 80 * MS);
        assert!(!d.take_due(t0 + 150 * MS));
        assert!(d.take_due(t0 + 180 * MS));
    }

    #[test]
    fn a_steady_stream_of_changes_still_publishes_within_max_delay() {
        let t0 = Instant::now();
        let mut d = debounce();
        let mut publishes = 0;
        // A change every 50 ms for 5 s: quiet never comes, max_delay forces a publish.
        for i in 0..100u32 {
            let now = t0 + 50 * i * MS;
            if d.take_due(now) {
                publishes += 1;
            }
            d.change(now);
        }
        assert_eq!(publishes, 4, "once per second, not once per change");
        assert_eq!(d.deadline(), Some(t0 + 4000 * MS + 1000 * MS));
    }
}
