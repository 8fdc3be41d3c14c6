//! Retries of idempotent reads: how many, how far apart, and a budget that keeps them from
//! multiplying the load on a failing downstream.

use std::time::Duration;

/// Attempts of one idempotent read, the first included.
pub const MAX_ATTEMPTS: u32 = 3;
/// The first retry waits about this long (with jitter); each further one twice as long.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Retries allowed per first attempt, over time: retries add at most this share of load to a
/// failing downstream.
pub const RETRY_RATIO: f64 = 0.2;
/// Retries that may be spent at once (and the budget a fresh process starts with).
pub const RETRY_RESERVE: f64 = 10.0;

/// Between `base` and 1.5 × `base`, so retrying callers do not move in step.
pub(crate) fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// The pause before retry number `retry` (1 for the first).
pub(crate) fn backoff(retry: u32) -> Duration {
    jitter(BACKOFF_BASE * 2u32.saturating_pow(retry.saturating_sub(1)))
}

/// A retry budget shared by all calls to the downstreams: each first attempt earns
/// [`RETRY_RATIO`] of a retry, each retry spends one, and at most [`RETRY_RESERVE`] can be
/// saved up — so a failing downstream sees at most about 20 % more calls, not three times as
/// many.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    balance: std::sync::Mutex<f64>,
}

impl RetryBudget {
    pub(crate) fn new() -> Self {
        Self {
            balance: std::sync::Mutex::new(RETRY_RESERVE),
        }
    }

    /// A first attempt is made: earn a share of a retry.
    pub(crate) fn deposit(&self) {
        if let Ok(mut balance) = self.balance.lock() {
            *balance = (*balance + RETRY_RATIO).min(RETRY_RESERVE);
        }
    }

    /// Spend one retry, if the budget has one.
    pub(crate) fn try_withdraw(&self) -> bool {
        match self.balance.lock() {
            Ok(mut balance) if *balance >= 1.0 => {
                *balance -= 1.0;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget starts with the reserve, earns a fifth of a retry per call and never saves
    /// more than the reserve.
    #[test]
    fn retry_budget() {
        let budget = RetryBudget::new();
        let spent = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(spent, RETRY_RESERVE as usize);
        for _ in 0..100 {
            budget.deposit();
        }
        let spent = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(spent, RETRY_RESERVE as usize, "capped at the reserve");
        for _ in 0..5 {
            budget.deposit();
        }
        assert!(budget.try_withdraw(), "five calls earn one retry");
        assert!(!budget.try_withdraw());
    }

    /// Each retry waits about twice as long as the one before, never less than the base.
    #[test]
    fn backoff_doubles() {
        for retry in 1..=4 {
            let base = BACKOFF_BASE * 2u32.pow(retry - 1);
            let pause = backoff(retry);
            assert!(
                pause >= base && pause <= base.mul_f64(1.5),
                "{retry}: {pause:?}"
            );
        }
    }
}
