//! The retry budget: retries may add at most a fixed share of the requests sent (plus
//! a small reserve), so a struggling service is not flattened by retry storms. A token
//! bucket on one atomic; no locks, no clock.

use std::sync::atomic::{AtomicI64, Ordering};

/// Milli-tokens each request deposits: 200 = retries may add 20 % of traffic.
const DEPOSIT: i64 = 200;
const COST: i64 = 1000;
/// Retries in reserve at start and at most saved up.
const RESERVE: i64 = 10 * COST;
const CAP: i64 = 100 * COST;

#[derive(Debug)]
pub struct RetryBudget {
    tokens: AtomicI64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { tokens: AtomicI64::new(RESERVE) }
    }
}

impl RetryBudget {
    /// Called once per request.
    pub fn deposit(&self) {
        let _ = self.tokens.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some((t + DEPOSIT).min(CAP)));
    }

    /// True if a retry may be sent now (and pays for it).
    pub fn withdraw(&self) -> bool {
        self.tokens.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| (t >= COST).then_some(t - COST)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_a_share_of_requests() {
        let b = RetryBudget::default();
        let mut retries = 0;
        // 1000 requests, each failing: at most the reserve plus 20 % get a retry.
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        assert!(retries <= 10 + 200, "{retries}");
        assert!(retries >= 200, "{retries}");
    }

    #[test]
    fn the_reserve_allows_a_few_retries_at_start() {
        let b = RetryBudget::default();
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
    }
}
