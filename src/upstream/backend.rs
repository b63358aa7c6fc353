//! Per-backend state that outlives a config snapshot.
//!
//! A [`BackendState`] is keyed by [`BackendKey`] (upstream name + address,
//! not weight) and owned by the registry, so a reload that keeps a backend
//! keeps its counters and in-flight count. Snapshots point at it by `Arc`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};

use super::client::{ClientSettings, UpstreamClient};
use crate::admin::metrics::{BackendMetrics, Outcome};
use crate::config::CircuitBreakerConfig;
use crate::resilience::breaker::{Admission, Breaker, CircuitState};

/// The identity of a backend: which upstream, which `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub upstream: Arc<str>,
    pub address: Arc<str>,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.upstream, self.address)
    }
}

/// What Sluice knows about one backend, across reloads.
pub struct BackendState {
    pub key: BackendKey,
    pub addr: SocketAddr,
    /// `addr` as a URI authority, for the requests sent to it.
    pub authority: http::uri::Authority,
    in_flight: AtomicUsize,
    /// Health checks' verdict; true when unchecked.
    healthy: AtomicBool,
    /// When health checks last brought it up, in ms since `created`
    /// (`u64::MAX`: never, so no slow start applies).
    up_since_ms: AtomicU64,
    created: Instant,
    /// The circuit breaker, when the upstream configures one.
    breaker: ArcSwapOption<Breaker>,
    /// The pooled client; replaced only when its settings change.
    client: ArcSwap<UpstreamClient>,
    requests: AtomicU64,
    failures: AtomicU64,
    metrics: BackendMetrics,
}

impl BackendState {
    /// A fresh backend with zeroed counters and an empty pool.
    pub fn new(
        key: BackendKey,
        addr: SocketAddr,
        metrics: BackendMetrics,
        client: ClientSettings,
    ) -> Self {
        let authority = http::uri::Authority::try_from(addr.to_string().as_str())
            .expect("a socket address is a valid authority");
        let client = UpstreamClient::new(client, &key, addr);
        BackendState {
            key,
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            up_since_ms: AtomicU64::new(u64::MAX),
            created: Instant::now(),
            breaker: ArcSwapOption::empty(),
            client: ArcSwap::from_pointee(client),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            metrics,
        }
    }

    /// Installs the upstream's circuit breaker settings; a breaker whose
    /// settings did not change keeps its state across a reload.
    pub fn configure_breaker(&self, config: Option<&CircuitBreakerConfig>) {
        let current = self.breaker.load();
        let same = match (current.as_deref(), config) {
            (Some(b), Some(c)) => b.config() == c,
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.breaker
                .store(config.map(|c| Arc::new(Breaker::new(c.clone()))));
            self.metrics.circuit_state.set(0);
        }
    }

    /// Installs the upstream's client settings; a client whose settings did
    /// not change keeps its pooled connections across a reload.
    pub fn configure_client(&self, settings: &ClientSettings) {
        if self.client.load().settings() != settings {
            self.client.store(Arc::new(UpstreamClient::new(
                settings.clone(),
                &self.key,
                self.addr,
            )));
        }
    }

    /// The pooled client calls to this backend go through.
    pub fn client(&self) -> arc_swap::Guard<Arc<UpstreamClient>> {
        self.client.load()
    }

    /// Whether the circuit lets a pick choose this backend.
    pub fn circuit_allows(&self) -> bool {
        self.breaker.load().as_deref().is_none_or(Breaker::allows)
    }

    /// The circuit state, `None` without a breaker.
    pub fn circuit_state(&self) -> Option<CircuitState> {
        self.breaker.load().as_deref().map(Breaker::state)
    }

    fn circuit_moved(&self, to: Option<CircuitState>) {
        if let Some(state) = to {
            self.metrics.circuit(state);
            match state {
                CircuitState::Open => {
                    tracing::warn!(backend = %self.key, "circuit open: backend failing")
                }
                _ => tracing::info!(backend = %self.key, to = state.as_str(), "circuit changed"),
            }
        }
    }

    /// Whether health checks pass (always true without health checks).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Sets the health checks' verdict.
    pub fn set_healthy(&self, up: bool) {
        let was = self.healthy.swap(up, Ordering::AcqRel);
        if up && !was {
            let ms = self.created.elapsed().as_millis() as u64;
            self.up_since_ms.store(ms, Ordering::Release);
        }
        self.metrics.up.set(i64::from(up));
    }

    /// How far through a slow start of length `period` it is, from 0 to 1
    /// (1 when it has not come back up recently, or `period` is zero).
    pub fn warmth(&self, period: Duration) -> f64 {
        let since = self.up_since_ms.load(Ordering::Acquire);
        if period.is_zero() || since == u64::MAX {
            return 1.0;
        }
        let up_for = self
            .created
            .elapsed()
            .saturating_sub(Duration::from_millis(since));
        (up_for.as_secs_f64() / period.as_secs_f64()).min(1.0)
    }

    /// Counts one health check.
    pub fn record_health_check(&self, ok: bool) {
        self.metrics.health_check(ok);
    }

    /// Calls to this backend in progress.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls finished since this backend first appeared.
    pub fn requests_total(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Calls that ended in anything but success.
    pub fn failures_total(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Starts one call at `now`: in-flight goes up until the guard drops.
    pub fn start_request(self: &Arc<Self>, now: Instant) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.guard(now)
    }

    /// Starts one call if fewer than `max` are in flight (`max == 0`: no
    /// limit); the check and the increment are one atomic step, so a
    /// bulkhead is never exceeded by racing requests. `now` is when the call
    /// starts, for its duration.
    pub fn try_start_request(self: &Arc<Self>, max: usize, now: Instant) -> Option<RequestGuard> {
        if max == 0 {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        } else {
            self.in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()?;
        }
        let mut guard = self.guard(now);
        // The circuit last: a call it rejects never started.
        if let Some(breaker) = self.breaker.load_full() {
            let (admission, moved) = breaker.admit();
            self.circuit_moved(moved);
            match admission {
                Some(a) => guard.admission = Some((breaker, a)),
                None => {
                    guard.abandon();
                    return None;
                }
            }
        }
        Some(guard)
    }

    fn guard(self: &Arc<Self>, now: Instant) -> RequestGuard {
        self.metrics.in_flight.inc();
        RequestGuard {
            backend: Arc::clone(self),
            started: now,
            ended: None,
            outcome: Outcome::Reset,
            record: true,
            admission: None,
        }
    }
}

/// One call to a backend. Dropping it lowers in-flight and records the
/// outcome and duration; it is the only place those are recorded.
pub struct RequestGuard {
    backend: Arc<BackendState>,
    started: Instant,
    /// When the call ended, if the owner read the clock for it already.
    ended: Option<Instant>,
    outcome: Outcome,
    /// False once abandoned: in-flight still goes down, nothing is counted.
    record: bool,
    /// The circuit's permission, told the outcome on drop.
    admission: Option<(Arc<Breaker>, Admission)>,
}

impl RequestGuard {
    /// Sets the outcome recorded on drop (the default is `Reset`: a call that
    /// ends without a verdict was cut short).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// Ends a call that was never sent: in-flight goes down, but neither
    /// the outcome nor the duration is recorded.
    pub fn abandon(mut self) {
        self.record = false;
        if let Some((breaker, Admission::Probe)) = self.admission.take() {
            // An unused probe slot: count it as a success so it is freed.
            let moved = breaker.record(Admission::Probe, false);
            self.backend.circuit_moved(moved);
        }
    }

    /// Records `now` as the call's end, so dropping the guard reads no
    /// clock of its own.
    pub fn end_at(&mut self, now: Instant) {
        self.ended = Some(now);
    }

    /// The backend this call went to.
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.backend
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let b = &self.backend;
        b.in_flight.fetch_sub(1, Ordering::Relaxed);
        b.metrics.in_flight.dec();
        if !self.record {
            return;
        }
        if let Some((breaker, admission)) = self.admission.take() {
            let failed = self.outcome != Outcome::Success;
            let moved = breaker.record(admission, failed);
            b.circuit_moved(moved);
        }
        b.requests.fetch_add(1, Ordering::Relaxed);
        if self.outcome != Outcome::Success {
            b.failures.fetch_add(1, Ordering::Relaxed);
        }
        let ended = self.ended.unwrap_or_else(Instant::now);
        let took = ended.saturating_duration_since(self.started);
        b.metrics.record(self.outcome, took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::Metrics;

    fn backend() -> Arc<BackendState> {
        backend_in(&Metrics::new())
    }

    fn backend_in(metrics: &Metrics) -> Arc<BackendState> {
        let key = BackendKey {
            upstream: Arc::from("u"),
            address: Arc::from("127.0.0.1:1"),
        };
        Arc::new(BackendState::new(
            key,
            "127.0.0.1:1".parse().expect("addr"),
            metrics.backend("u", "127.0.0.1:1"),
            ClientSettings::default(),
        ))
    }

    #[test]
    fn the_bulkhead_admits_at_most_max_and_frees_on_drop() {
        let b = backend();
        let first = b.try_start_request(2, Instant::now()).expect("room");
        let _second = b.try_start_request(2, Instant::now()).expect("room");
        assert!(b.try_start_request(2, Instant::now()).is_none());
        assert_eq!(b.in_flight(), 2);
        drop(first);
        assert!(b.try_start_request(2, Instant::now()).is_some());
    }

    #[test]
    fn a_call_lasts_from_its_start_to_the_end_its_owner_read() {
        let metrics = Metrics::new();
        let b = backend_in(&metrics);
        let start = Instant::now();
        let mut guard = b.try_start_request(0, start).expect("unlimited");
        guard.set_outcome(Outcome::Success);
        guard.end_at(start + Duration::from_millis(2500));
        drop(guard);
        let text = metrics.encode();
        let sum = text
            .lines()
            .find(|l| l.starts_with("sluice_upstream_request_duration_seconds_sum"))
            .expect("the duration's sum");
        assert!(sum.ends_with(" 2.5"), "{sum}");
    }

    #[test]
    fn the_bulkhead_holds_under_racing_threads() {
        let b = backend();
        let admitted = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        if let Some(g) = b.try_start_request(3, Instant::now()) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            peak.fetch_max(b.in_flight(), Ordering::Relaxed);
                            drop(g);
                        }
                    }
                });
            }
        });
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert!(
            peak.load(Ordering::Relaxed) <= 3,
            "peak {}",
            peak.load(Ordering::Relaxed)
        );
        assert_eq!(b.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn warmth_ramps_linearly_after_coming_back_up() {
        let b = backend();
        let period = Duration::from_secs(10);
        assert_eq!(b.warmth(period), 1.0, "never down: fully warm");
        b.set_healthy(false);
        b.set_healthy(true);
        assert!(b.warmth(period) < 0.01);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            (b.warmth(period) - 0.5).abs() < 0.01,
            "{}",
            b.warmth(period)
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(b.warmth(period), 1.0);
        assert_eq!(b.warmth(Duration::ZERO), 1.0);
    }

    #[test]
    fn an_abandoned_call_counts_nothing() {
        let b = backend();
        b.try_start_request(0, Instant::now())
            .expect("unlimited")
            .abandon();
        assert_eq!((b.in_flight(), b.requests_total()), (0, 0));
    }
}
