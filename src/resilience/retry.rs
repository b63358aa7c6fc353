//! Retry policy pieces: which failures are retried, the backoff between
//! tries, and the budget that caps how many retries an upstream may add.
//!
//! The budget follows the shape of Finagle's and tower's: over the last ten
//! seconds, retries may add at most `budget` times the requests, plus a
//! floor of [`MIN_RETRIES_PER_WINDOW`] so that a quiet upstream can still
//! retry a lone failure. Counting is lock-free: ten one-second buckets of
//! atomics, each reset when a new second lands on it (a count racing with
//! that reset may be lost, which only makes the cap approximate by a few).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Retries allowed per ten seconds whatever the request count.
pub const MIN_RETRIES_PER_WINDOW: u64 = 10;
const BUCKETS: u64 = 10;

/// The failures a retry policy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    ConnectFailure = 1,
    Reset = 2,
    Timeout = 4,
    Status502 = 8,
    Status503 = 16,
    Status504 = 32,
}

impl RetryOn {
    /// Every condition, with its config name.
    pub const ALL: [(RetryOn, &'static str); 6] = [
        (RetryOn::ConnectFailure, "connect-failure"),
        (RetryOn::Reset, "reset"),
        (RetryOn::Timeout, "timeout"),
        (RetryOn::Status502, "502"),
        (RetryOn::Status503, "503"),
        (RetryOn::Status504, "504"),
    ];

    /// The config name (also the `reason` label of `sluice_retries_total`).
    pub fn as_str(self) -> &'static str {
        RetryOn::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("", |(_, n)| n)
    }

    /// The condition a response status stands for, if any.
    pub fn from_status(status: u16) -> Option<RetryOn> {
        match status {
            502 => Some(RetryOn::Status502),
            503 => Some(RetryOn::Status503),
            504 => Some(RetryOn::Status504),
            _ => None,
        }
    }
}

/// A set of [`RetryOn`] conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryConditions(u8);

impl RetryConditions {
    pub fn with(self, on: RetryOn) -> Self {
        RetryConditions(self.0 | on as u8)
    }

    pub fn contains(self, on: RetryOn) -> bool {
        self.0 & on as u8 != 0
    }
}

/// The wait before retry number `retry` (1 for the first retry): full
/// jitter, a uniform draw from zero to `min(max, base * 2^(retry-1))`.
pub fn backoff(base: Duration, max: Duration, retry: u32, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    exp.min(max).mul_f64(unit.clamp(0.0, 1.0))
}

/// Caps the retries of one upstream against its recent requests.
pub struct RetryBudget {
    ratio: f64,
    epoch: Instant,
    /// Per bucket: (second it counts, requests, retries).
    buckets: [(AtomicU64, AtomicU64, AtomicU64); BUCKETS as usize],
}

impl RetryBudget {
    /// A budget of `ratio` retries per request.
    pub fn new(ratio: f64) -> Self {
        RetryBudget {
            ratio,
            epoch: Instant::now(),
            buckets: std::array::from_fn(|_| {
                (
                    AtomicU64::new(u64::MAX),
                    AtomicU64::new(0),
                    AtomicU64::new(0),
                )
            }),
        }
    }

    fn now(&self) -> u64 {
        self.second(Instant::now())
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_secs()
    }

    fn bucket(&self, second: u64) -> &(AtomicU64, AtomicU64, AtomicU64) {
        let b = &self.buckets[(second % BUCKETS) as usize];
        if b.0.load(Ordering::Acquire) != second && b.0.swap(second, Ordering::AcqRel) != second {
            b.1.store(0, Ordering::Release);
            b.2.store(0, Ordering::Release);
        }
        b
    }

    /// Counts one request, made at `at` (the caller's clock reading, so
    /// the hot path reads the clock once).
    pub fn deposit(&self, at: Instant) {
        self.bucket(self.second(at))
            .1
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry if the budget allows it.
    pub fn try_withdraw(&self) -> bool {
        let now = self.now();
        let (requests, retries) = self
            .buckets
            .iter()
            .filter(|b| {
                let s = b.0.load(Ordering::Acquire);
                s != u64::MAX && s + BUCKETS > now
            })
            .fold((0u64, 0u64), |(q, r), b| {
                (
                    q + b.1.load(Ordering::Relaxed),
                    r + b.2.load(Ordering::Relaxed),
                )
            });
        let allowed = (self.ratio * requests as f64) as u64 + MIN_RETRIES_PER_WINDOW;
        if retries >= allowed {
            return false;
        }
        self.bucket(now).2.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_maximum_with_full_jitter() {
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        assert_eq!(backoff(base, max, 1, 1.0), Duration::from_millis(25));
        assert_eq!(backoff(base, max, 2, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(base, max, 4, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(base, max, 9, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(base, max, 3, 0.0), Duration::ZERO);
        assert_eq!(backoff(base, max, 3, 0.5), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_at_the_ratio_plus_the_floor() {
        let budget = RetryBudget::new(0.2);
        for _ in 0..100 {
            budget.deposit(Instant::now());
        }
        let granted = (0..1000).filter(|_| budget.try_withdraw()).count() as u64;
        assert_eq!(granted, 20 + MIN_RETRIES_PER_WINDOW);
        // Ten seconds later the old counts have left the window.
        tokio::time::advance(Duration::from_secs(11)).await;
        let granted = (0..1000).filter(|_| budget.try_withdraw()).count() as u64;
        assert_eq!(granted, MIN_RETRIES_PER_WINDOW);
    }
}
