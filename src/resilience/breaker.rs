//! The circuit breaker of one backend, fed by real traffic.
//!
//! States: `Closed` (passing traffic), `Open` (rejecting: the backend is not
//! eligible) and `HalfOpen` (probing: only `half_open_probes` real requests
//! pass at a time). Closed opens after `consecutive_failures` failures in a
//! row, or when over the last `window` at least `min_requests` calls ended
//! and more than `failure_rate` of them failed. Open lasts `open_for`,
//! doubling with jitter on each re-open up to `open_for_max`; then the next
//! pick is a half-open probe. Half-open closes only once `half_open_probes`
//! probes have succeeded, and re-opens on any failure.
//!
//! Time is `tokio::time::Instant`, so tests drive it with paused time. The
//! state is one mutex per backend, held only for a few arithmetic steps.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;

/// Buckets the failure-rate window is split into.
const BUCKETS: usize = 10;

/// What the breaker's state is, as exported (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Passing traffic.
    Closed = 0,
    /// Probing: a few real requests pass.
    HalfOpen = 1,
    /// Rejecting: the backend gets no traffic.
    Open = 2,
}

impl CircuitState {
    /// The `to` label of a transition.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::HalfOpen => "half_open",
            CircuitState::Open => "open",
        }
    }
}

/// One backend's circuit breaker.
pub struct Breaker {
    config: CircuitBreakerConfig,
    inner: Mutex<Inner>,
}

struct Inner {
    state: CircuitState,
    consecutive_failures: u32,
    /// Per bucket: (time slice number since `epoch`, successes, failures).
    buckets: [(u64, u32, u32); BUCKETS],
    epoch: Instant,
    opened_at: Instant,
    open_for: Duration,
    probes_in_flight: u32,
    probe_successes: u32,
}

/// A permission to send one call; tells the breaker how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A normal call while closed.
    Normal,
    /// A half-open probe.
    Probe,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        let now = Instant::now();
        Breaker {
            inner: Mutex::new(Inner {
                state: CircuitState::Closed,
                consecutive_failures: 0,
                buckets: [(u64::MAX, 0, 0); BUCKETS],
                epoch: now,
                opened_at: now,
                open_for: config.open_for,
                probes_in_flight: 0,
                probe_successes: 0,
            }),
            config,
        }
    }

    /// The settings it runs with.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current state (an open circuit whose time is up reads half-open).
    pub fn state(&self) -> CircuitState {
        let inner = self.lock();
        match inner.state {
            CircuitState::Open if inner.opened_at.elapsed() >= inner.open_for => {
                CircuitState::HalfOpen
            }
            s => s,
        }
    }

    /// Whether a pick may choose this backend now (no reservation).
    pub fn allows(&self) -> bool {
        let inner = self.lock();
        match inner.state {
            CircuitState::Closed => true,
            CircuitState::Open => inner.opened_at.elapsed() >= inner.open_for,
            CircuitState::HalfOpen => inner.probes_in_flight < self.config.half_open_probes,
        }
    }

    /// Reserves a call; `None` when the circuit rejects it. Returns the state
    /// it moved to, if any, for logging and metrics.
    pub fn admit(&self) -> (Option<Admission>, Option<CircuitState>) {
        let mut inner = self.lock();
        let mut moved = None;
        if inner.state == CircuitState::Open && inner.opened_at.elapsed() >= inner.open_for {
            inner.state = CircuitState::HalfOpen;
            inner.probes_in_flight = 0;
            inner.probe_successes = 0;
            moved = Some(CircuitState::HalfOpen);
        }
        let admission = match inner.state {
            CircuitState::Closed => Some(Admission::Normal),
            CircuitState::Open => None,
            CircuitState::HalfOpen => {
                if inner.probes_in_flight < self.config.half_open_probes {
                    inner.probes_in_flight += 1;
                    Some(Admission::Probe)
                } else {
                    None
                }
            }
        };
        (admission, moved)
    }

    /// Records how an admitted call ended; returns the state it moved to.
    pub fn record(&self, admission: Admission, failed: bool) -> Option<CircuitState> {
        let mut inner = self.lock();
        let now = Instant::now();
        match (admission, inner.state) {
            (Admission::Probe, CircuitState::HalfOpen) => {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                if failed {
                    let next = (inner.open_for * 2).min(self.config.open_for_max);
                    // Up to 10% less, so backends that failed together do
                    // not all probe at the same instant.
                    let jitter = 1.0 - fastrand::f64() * 0.1;
                    inner.open_for = next.mul_f64(jitter).max(self.config.open_for);
                    inner.open(now);
                    return Some(CircuitState::Open);
                }
                inner.probe_successes += 1;
                if inner.probe_successes >= self.config.half_open_probes {
                    inner.close(self.config.open_for);
                    return Some(CircuitState::Closed);
                }
                None
            }
            (Admission::Normal, CircuitState::Closed) => {
                let bucket = inner.bucket(now, self.config.window);
                if failed {
                    bucket.2 += 1;
                    inner.consecutive_failures += 1;
                } else {
                    bucket.1 += 1;
                    inner.consecutive_failures = 0;
                }
                let (ok, bad) = inner.totals(now, self.config.window);
                let total = ok + bad;
                let by_rate = total >= self.config.min_requests
                    && f64::from(bad) > self.config.failure_rate * f64::from(total);
                let by_streak = self.config.consecutive_failures > 0
                    && inner.consecutive_failures >= self.config.consecutive_failures;
                if failed && (by_rate || by_streak) {
                    inner.open_for = self.config.open_for;
                    inner.open(now);
                    return Some(CircuitState::Open);
                }
                None
            }
            // A call admitted before the state changed: it no longer counts.
            _ => None,
        }
    }
}

impl Inner {
    fn open(&mut self, now: Instant) {
        self.state = CircuitState::Open;
        self.opened_at = now;
        self.probes_in_flight = 0;
        self.probe_successes = 0;
    }

    fn close(&mut self, open_for: Duration) {
        self.state = CircuitState::Closed;
        self.consecutive_failures = 0;
        self.open_for = open_for;
        self.buckets = [(u64::MAX, 0, 0); BUCKETS];
    }

    /// The time slice `now` falls in: the window is `BUCKETS` slices.
    fn slice(&self, now: Instant, window: Duration) -> u64 {
        let width = (window / BUCKETS as u32).max(Duration::from_millis(1));
        (now.duration_since(self.epoch).as_nanos() / width.as_nanos()) as u64
    }

    /// The bucket for `now`, emptied if it last counted an older slice.
    fn bucket(&mut self, now: Instant, window: Duration) -> &mut (u64, u32, u32) {
        let slice = self.slice(now, window);
        let b = &mut self.buckets[(slice % BUCKETS as u64) as usize];
        if b.0 != slice {
            *b = (slice, 0, 0);
        }
        b
    }

    /// Successes and failures within the last `window`.
    fn totals(&self, now: Instant, window: Duration) -> (u32, u32) {
        let slice = self.slice(now, window);
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 + BUCKETS as u64 > slice)
            .fold((0, 0), |(ok, bad), b| (ok + b.1, bad + b.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            open_for_max: Duration::from_secs(60),
            half_open_probes: 2,
        }
    }

    fn call(b: &Breaker, failed: bool) -> Option<CircuitState> {
        let (admission, _) = b.admit();
        b.record(admission.expect("admitted"), failed)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_and_a_success_resets_the_streak() {
        let b = Breaker::new(config());
        assert_eq!(call(&b, true), None);
        assert_eq!(call(&b, true), None);
        assert_eq!(call(&b, false), None);
        assert_eq!(call(&b, true), None);
        assert_eq!(call(&b, true), None);
        assert_eq!(call(&b, true), Some(CircuitState::Open));
        assert!(!b.allows());
        assert_eq!(b.admit().0, None);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_only_its_probes_and_closes_when_all_succeed() {
        let b = Breaker::new(config());
        for _ in 0..3 {
            call(&b, true);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let (first, moved) = b.admit();
        assert_eq!(
            (first, moved),
            (Some(Admission::Probe), Some(CircuitState::HalfOpen))
        );
        let (second, _) = b.admit();
        assert_eq!(second, Some(Admission::Probe));
        assert_eq!(b.admit().0, None, "only two probes at a time");
        assert_eq!(b.record(Admission::Probe, false), None);
        assert_eq!(
            b.record(Admission::Probe, false),
            Some(CircuitState::Closed)
        );
        assert_eq!(b.admit().0, Some(Admission::Normal));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_up_to_the_maximum() {
        let b = Breaker::new(config());
        for _ in 0..3 {
            call(&b, true);
        }
        let mut last = Duration::from_secs(5);
        for _ in 0..8 {
            tokio::time::advance(last).await;
            let (probe, _) = b.admit();
            assert_eq!(
                b.record(probe.expect("probe"), true),
                Some(CircuitState::Open)
            );
            let open_for = b.lock().open_for;
            assert!(
                open_for >= last.min(Duration::from_secs(60)) * 9 / 10,
                "{open_for:?} after {last:?}"
            );
            assert!(open_for <= Duration::from_secs(60));
            // Still open just before it ends.
            tokio::time::advance(open_for - Duration::from_millis(1)).await;
            assert!(!b.allows());
            last = Duration::from_millis(1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_opens_only_with_enough_requests_in_the_window() {
        let mut c = config();
        c.consecutive_failures = 0;
        let b = Breaker::new(c);
        // 4 of 9 calls fail: under min_requests.
        for i in 0..9 {
            assert_eq!(call(&b, i % 2 == 0 && i < 8), None);
        }
        // Calls older than the window no longer count.
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..9 {
            assert_eq!(call(&b, false), None);
        }
        for _ in 0..9 {
            call(&b, true);
        }
        // 10 failures and 9 successes in the window: over 50%.
        assert_eq!(call(&b, true), Some(CircuitState::Open));
    }
}
