//! Every Prometheus metric Sluice exports (names and labels are SPEC §5).
//!
//! One [`Metrics`] value is built by `runtime::run` and passed down; there is
//! no global registry. The data path never looks a label up by string: the
//! snapshot builder resolves label children once per listener/upstream pair
//! ([`RouteMetrics`]), once per upstream ([`ShedMetrics`], [`RetryMetrics`])
//! and once per backend ([`BackendMetrics`]), and requests only touch those
//! handles.
//!
//! Each handle set holds a lease on its label values. A reload builds the
//! new snapshot's handles before the old snapshot goes, so a label set that
//! survives the reload always has a lease; one that does not (a removed
//! backend, upstream or route) loses its last lease when the old snapshot
//! and the requests still running on it are gone, and its series are then
//! removed from /metrics instead of lingering with stale values.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::resilience::breaker::CircuitState;
use crate::resilience::retry::RetryOn;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Latency buckets in seconds, from 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `code` label values of `sluice_http_requests_total`, by status class.
const CODES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `result` label values of `sluice_health_checks_total`.
const CHECK_RESULTS: [&str; 2] = ["success", "failure"];

/// The `to` label values of `sluice_circuit_transitions_total`.
const CIRCUIT_STATES: [CircuitState; 3] = [
    CircuitState::Closed,
    CircuitState::HalfOpen,
    CircuitState::Open,
];

/// The `reason` label values of `sluice_load_shed_total`.
const SHED_REASONS: [&str; 3] = ["overloaded", "no_healthy_backend", "circuit_open"];

/// The `kind` label values of `sluice_downstream_protocol_errors_total`.
const PROTOCOL_ERRORS: [&str; 3] = ["proxy_protocol", "client_hello", "tls_handshake"];

/// The `result` label values of `sluice_tls_certificate_reloads_total`.
const RELOAD_RESULTS: [&str; 2] = ["success", "failure"];

/// The registry and every metric family in it.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    families: Arc<Families>,
}

struct Families {
    http_requests: IntCounterVec,
    http_request_duration: HistogramVec,
    upstream_requests: IntCounterVec,
    upstream_request_duration: HistogramVec,
    upstream_in_flight: IntGaugeVec,
    load_shed: IntCounterVec,
    downstream_active: IntGaugeVec,
    downstream_parked: IntGaugeVec,
    downstream_total: IntCounterVec,
    worker_connections: IntCounterVec,
    tcp_bytes: IntCounterVec,
    protocol_errors: IntCounterVec,
    tls_reloads: IntCounterVec,
    config_reloads: IntCounterVec,
    backend_up: IntGaugeVec,
    health_checks: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_transitions: IntCounterVec,
    retries: IntCounterVec,
    config_last_reload: IntGauge,
    config_last_reload_ok: IntGauge,
    access_log_dropped: IntCounter,
    discovery_failures: IntCounterVec,
    discovery_backends: IntGaugeVec,
    /// Live handle sets per label set (see the module docs).
    leases: Mutex<HashMap<LeaseKey, usize>>,
}

/// A label set whose series are kept while some handle set uses it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LeaseKey {
    Route {
        listener: Box<str>,
        upstream: Box<str>,
    },
    Backend {
        upstream: Box<str>,
        backend: Box<str>,
    },
    Shed {
        upstream: Box<str>,
    },
    Retries {
        upstream: Box<str>,
    },
    Listener {
        listener: Box<str>,
    },
}

/// Keeps one label set's series exported; when the last lease of a label
/// set drops, its series are removed from the registry.
struct Lease {
    families: Arc<Families>,
    key: LeaseKey,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = self
            .families
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(count) = leases.get_mut(&self.key) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            leases.remove(&self.key);
            // Under the lock, so a handle set being built for the same
            // labels cannot pick up a child that is about to be removed.
            self.families.remove(&self.key);
        }
    }
}

impl Families {
    /// Builds a handle set for `key` under a lease. Building under the
    /// lease lock orders it against a concurrent removal of the same labels.
    fn lease<T>(self: &Arc<Self>, key: LeaseKey, build: impl FnOnce(&Families) -> T) -> (T, Lease) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        *leases.entry(key.clone()).or_insert(0) += 1;
        let handles = build(self);
        (
            handles,
            Lease {
                families: Arc::clone(self),
                key,
            },
        )
    }

    /// Removes every series of `key` (a child that was never created is
    /// not an error).
    fn remove(&self, key: &LeaseKey) {
        match key {
            LeaseKey::Route { listener, upstream } => {
                let (l, u) = (&**listener, &**upstream);
                for code in CODES {
                    let _ = self.http_requests.remove_label_values(&[l, u, code]);
                }
                let _ = self.http_request_duration.remove_label_values(&[l, u]);
            }
            LeaseKey::Backend { upstream, backend } => {
                let (u, b) = (&**upstream, &**backend);
                for outcome in Outcome::ALL {
                    let _ = self
                        .upstream_requests
                        .remove_label_values(&[u, b, outcome.as_str()]);
                }
                let _ = self.upstream_request_duration.remove_label_values(&[u, b]);
                let _ = self.upstream_in_flight.remove_label_values(&[u, b]);
                let _ = self.backend_up.remove_label_values(&[u, b]);
                let _ = self.circuit_state.remove_label_values(&[u, b]);
                for result in CHECK_RESULTS {
                    let _ = self.health_checks.remove_label_values(&[u, b, result]);
                }
                for state in CIRCUIT_STATES {
                    let _ = self
                        .circuit_transitions
                        .remove_label_values(&[u, b, state.as_str()]);
                }
            }
            LeaseKey::Shed { upstream } => {
                for reason in SHED_REASONS {
                    let _ = self.load_shed.remove_label_values(&[upstream, reason]);
                }
            }
            LeaseKey::Retries { upstream } => {
                for (_, reason) in RetryOn::ALL {
                    let _ = self.retries.remove_label_values(&[upstream, reason]);
                }
            }
            LeaseKey::Listener { listener } => {
                let l = &**listener;
                let _ = self.downstream_active.remove_label_values(&[l]);
                let _ = self.downstream_parked.remove_label_values(&[l]);
                for result in ["accepted", "rejected"] {
                    let _ = self.downstream_total.remove_label_values(&[l, result]);
                }
                for direction in ["rx", "tx"] {
                    let _ = self.tcp_bytes.remove_label_values(&[l, direction]);
                }
                for kind in PROTOCOL_ERRORS {
                    let _ = self.protocol_errors.remove_label_values(&[l, kind]);
                }
                for result in RELOAD_RESULTS {
                    let _ = self.tls_reloads.remove_label_values(&[l, result]);
                }
            }
        }
    }
}

/// Handles for requests of one listener sent to one upstream.
pub struct RouteMetrics {
    /// Indexed by status class: 1xx..5xx at 0..4.
    codes: [IntCounter; 5],
    duration: Histogram,
    _lease: Lease,
}

impl RouteMetrics {
    /// Counts one finished request with `status` that took `seconds`.
    pub fn record(&self, status: u16, seconds: f64) {
        self.count(status);
        self.duration.observe(seconds);
    }

    /// Counts one request with `status` whose duration is unknown (refused
    /// by the codec before it was fully read).
    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.codes[class].inc();
    }
}

/// Outcome of one upstream call, the `outcome` label of
/// `sluice_upstream_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Http5xx,
    ConnectFailure,
    Reset,
    Timeout,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Http5xx,
        Outcome::ConnectFailure,
        Outcome::Reset,
        Outcome::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Http5xx => "http_5xx",
            Outcome::ConnectFailure => "connect_failure",
            Outcome::Reset => "reset",
            Outcome::Timeout => "timeout",
        }
    }
}

/// Handles for one backend, resolved when its state is created.
pub struct BackendMetrics {
    outcomes: [IntCounter; 5],
    duration: Histogram,
    pub in_flight: IntGauge,
    /// 1 while health checks pass (or there are none), else 0.
    pub up: IntGauge,
    /// Health checks passed and failed.
    checks: [IntCounter; 2],
    /// 0 closed, 1 half-open, 2 open.
    pub circuit_state: IntGauge,
    /// Transitions to closed, half-open and open.
    transitions: [IntCounter; 3],
    _lease: Lease,
}

impl BackendMetrics {
    /// Records a circuit transition to `state`.
    pub fn circuit(&self, state: CircuitState) {
        self.circuit_state.set(state as i64);
        self.transitions[state as usize].inc();
    }

    /// Counts one health check.
    pub fn health_check(&self, ok: bool) {
        self.checks[usize::from(!ok)].inc();
    }

    /// Counts one finished upstream call.
    pub fn record(&self, outcome: Outcome, seconds: f64) {
        self.outcomes[outcome as usize].inc();
        self.duration.observe(seconds);
    }
}

/// Handles for load shedding on one upstream, by reason.
pub struct ShedMetrics {
    pub overloaded: IntCounter,
    pub no_healthy_backend: IntCounter,
    pub circuit_open: IntCounter,
    _lease: Lease,
}

/// The retry counters of one upstream, indexed like [`RetryOn::ALL`].
pub struct RetryMetrics {
    pub by_condition: [IntCounter; 6],
    _lease: Lease,
}

/// Handles for the DNS discovery of one upstream.
pub struct DiscoveryMetrics {
    /// Resolutions that failed (the last good set was kept).
    pub failures: IntCounter,
    /// Backends the last good resolution found.
    pub backends: IntGauge,
}

/// Handles for one listener's connections.
pub struct ListenerMetrics {
    pub active: IntGauge,
    /// Of `active`, the idle connections parked (see `proxy::park`).
    pub parked: IntGauge,
    pub accepted: IntCounter,
    pub rejected: IntCounter,
    /// TCP listeners: bytes received from clients.
    pub bytes_rx: IntCounter,
    /// TCP listeners: bytes sent to clients.
    pub bytes_tx: IntCounter,
    /// Connections closed for a malformed PROXY protocol header.
    pub proxy_protocol_errors: IntCounter,
    /// TLS passthrough connections closed for a missing or malformed
    /// ClientHello.
    pub client_hello_errors: IntCounter,
    /// TLS listeners: connections whose handshake failed or timed out.
    pub tls_handshake_errors: IntCounter,
    /// TLS listeners: certificate files reloaded after a change.
    pub tls_reloaded: IntCounter,
    /// TLS listeners: changed certificate files that did not load (the
    /// certificates in use were kept).
    pub tls_reload_failed: IntCounter,
    _lease: Lease,
}

impl Metrics {
    /// Builds every family and registers it, with `sluice_build_info` and the
    /// process collector.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let single_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let families = Families {
            http_requests: counter(
                "sluice_http_requests_total",
                "HTTP requests answered, by listener, upstream and status class",
                &["listener", "upstream", "code"],
            ),
            http_request_duration: histogram(
                "sluice_http_request_duration_seconds",
                "Time from request head to the end of the response",
                &["listener", "upstream"],
            ),
            upstream_requests: counter(
                "sluice_upstream_requests_total",
                "Calls to backends, by outcome",
                &["upstream", "backend", "outcome"],
            ),
            upstream_request_duration: histogram(
                "sluice_upstream_request_duration_seconds",
                "Time of one backend call, to the end of its response",
                &["upstream", "backend"],
            ),
            upstream_in_flight: gauge(
                "sluice_upstream_in_flight",
                "Backend calls (http) or sessions (tcp) in progress",
                &["upstream", "backend"],
            ),
            load_shed: counter(
                "sluice_load_shed_total",
                "Requests and sessions refused without a backend call",
                &["upstream", "reason"],
            ),
            downstream_active: gauge(
                "sluice_downstream_connections_active",
                "Client connections open",
                &["listener"],
            ),
            downstream_parked: gauge(
                "sluice_downstream_connections_parked",
                "Idle HTTP/1 keep-alive client connections parked without a task or buffer",
                &["listener"],
            ),
            downstream_total: counter(
                "sluice_downstream_connections_total",
                "Client connections accepted or rejected at accept",
                &["listener", "result"],
            ),
            worker_connections: counter(
                "sluice_worker_connections_total",
                "Client connections accepted and served, by the worker thread that took them",
                &["worker"],
            ),
            tcp_bytes: counter(
                "sluice_tcp_bytes_total",
                "Bytes moved by TCP listeners: rx from clients, tx to clients",
                &["listener", "direction"],
            ),
            protocol_errors: counter(
                "sluice_downstream_protocol_errors_total",
                "Client connections closed before proxying for malformed protocol input",
                &["listener", "kind"],
            ),
            tls_reloads: counter(
                "sluice_tls_certificate_reloads_total",
                "Reloads of a TLS listener's changed certificate files, by result",
                &["listener", "result"],
            ),
            retries: counter(
                "sluice_retries_total",
                "Requests sent again after a failure, by the failure",
                &["upstream", "reason"],
            ),
            circuit_state: gauge(
                "sluice_backend_circuit_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                &["upstream", "backend"],
            ),
            circuit_transitions: counter(
                "sluice_circuit_transitions_total",
                "Circuit breaker transitions, by the state entered",
                &["upstream", "backend", "to"],
            ),
            backend_up: gauge(
                "sluice_backend_up",
                "1 while the backend's health checks pass (or it has none), else 0",
                &["upstream", "backend"],
            ),
            health_checks: counter(
                "sluice_health_checks_total",
                "Active health checks, by result",
                &["upstream", "backend", "result"],
            ),
            config_reloads: counter(
                "sluice_config_reloads_total",
                "Configuration loads, by result",
                &["result"],
            ),
            config_last_reload: single_gauge(
                "sluice_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load",
            ),
            config_last_reload_ok: single_gauge(
                "sluice_config_last_reload_successful",
                "1 if the last configuration load succeeded, else 0",
            ),
            access_log_dropped: {
                let c = IntCounter::new(
                    "sluice_access_log_dropped_total",
                    "Access log lines dropped because the log writer fell behind",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            leases: Mutex::new(HashMap::new()),
            discovery_failures: counter(
                "sluice_discovery_failures_total",
                "DNS discovery resolutions that failed; the last good backend set was kept",
                &["upstream"],
            ),
            discovery_backends: gauge(
                "sluice_discovery_backends",
                "Backends found by the last good DNS discovery resolution",
                &["upstream"],
            ),
        };
        // Both results exist from the start, so that rate() and increase()
        // see the first failure.
        for result in ["success", "failure"] {
            families.config_reloads.with_label_values(&[result]);
        }
        let build = gauge("sluice_build_info", "Sluice version", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let process = prometheus::process_collector::ProcessCollector::for_self();
        // Not every platform has process metrics; the rest still works.
        let _ = registry.register(Box::new(process));
        Metrics {
            registry,
            families: Arc::new(families),
        }
    }

    /// `sluice_worker_connections_total` of worker `worker`. Workers are
    /// fixed for the process's life, so their series are never removed.
    pub fn worker_connections(&self, worker: usize) -> IntCounter {
        self.families
            .worker_connections
            .with_label_values(&[&worker.to_string()])
    }

    /// Handles for requests of `listener` sent to `upstream` (empty when the
    /// request never reached an upstream).
    pub fn route(&self, listener: &str, upstream: &str) -> RouteMetrics {
        let key = LeaseKey::Route {
            listener: listener.into(),
            upstream: upstream.into(),
        };
        let ((codes, duration), lease) = self.families.lease(key, |f| {
            (
                CODES.map(|c| f.http_requests.with_label_values(&[listener, upstream, c])),
                f.http_request_duration
                    .with_label_values(&[listener, upstream]),
            )
        });
        RouteMetrics {
            codes,
            duration,
            _lease: lease,
        }
    }

    /// Handles for one backend of one upstream.
    pub fn backend(&self, upstream: &str, backend: &str) -> BackendMetrics {
        let key = LeaseKey::Backend {
            upstream: upstream.into(),
            backend: backend.into(),
        };
        let (handles, lease) = self.families.lease(key, |f| {
            let pair = [upstream, backend];
            let up = f.backend_up.with_label_values(&pair);
            up.set(1);
            BackendHandles {
                outcomes: Outcome::ALL.map(|o| {
                    f.upstream_requests
                        .with_label_values(&[upstream, backend, o.as_str()])
                }),
                duration: f.upstream_request_duration.with_label_values(&pair),
                in_flight: f.upstream_in_flight.with_label_values(&pair),
                up,
                checks: CHECK_RESULTS
                    .map(|r| f.health_checks.with_label_values(&[upstream, backend, r])),
                circuit_state: f.circuit_state.with_label_values(&pair),
                transitions: CIRCUIT_STATES.map(|s| {
                    f.circuit_transitions
                        .with_label_values(&[upstream, backend, s.as_str()])
                }),
            }
        });
        BackendMetrics {
            outcomes: handles.outcomes,
            duration: handles.duration,
            in_flight: handles.in_flight,
            up: handles.up,
            checks: handles.checks,
            circuit_state: handles.circuit_state,
            transitions: handles.transitions,
            _lease: lease,
        }
    }

    /// The retry counters of one upstream.
    pub fn retries(&self, upstream: &str) -> RetryMetrics {
        let key = LeaseKey::Retries {
            upstream: upstream.into(),
        };
        let (by_condition, lease) = self.families.lease(key, |f| {
            RetryOn::ALL.map(|(_, reason)| f.retries.with_label_values(&[upstream, reason]))
        });
        RetryMetrics {
            by_condition,
            _lease: lease,
        }
    }

    /// Handles for the DNS discovery of one upstream.
    pub fn discovery(&self, upstream: &str) -> DiscoveryMetrics {
        DiscoveryMetrics {
            failures: self
                .families
                .discovery_failures
                .with_label_values(&[upstream]),
            backends: self
                .families
                .discovery_backends
                .with_label_values(&[upstream]),
        }
    }

    /// Drops the discovery series of an upstream that no longer uses it.
    pub fn forget_discovery(&self, upstream: &str) {
        let _ = self
            .families
            .discovery_failures
            .remove_label_values(&[upstream]);
        let _ = self
            .families
            .discovery_backends
            .remove_label_values(&[upstream]);
    }

    /// Handles for load shedding on one upstream.
    pub fn shed(&self, upstream: &str) -> ShedMetrics {
        let key = LeaseKey::Shed {
            upstream: upstream.into(),
        };
        let ([overloaded, no_healthy_backend, circuit_open], lease) =
            self.families.lease(key, |f| {
                SHED_REASONS.map(|r| f.load_shed.with_label_values(&[upstream, r]))
            });
        ShedMetrics {
            overloaded,
            no_healthy_backend,
            circuit_open,
            _lease: lease,
        }
    }

    /// Handles for one listener's connections.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let key = LeaseKey::Listener {
            listener: listener.into(),
        };
        let (handles, lease) = self.families.lease(key, |f| {
            (
                f.downstream_active.with_label_values(&[listener]),
                f.downstream_parked.with_label_values(&[listener]),
                ["accepted", "rejected"]
                    .map(|r| f.downstream_total.with_label_values(&[listener, r])),
                ["rx", "tx"].map(|d| f.tcp_bytes.with_label_values(&[listener, d])),
                PROTOCOL_ERRORS.map(|k| f.protocol_errors.with_label_values(&[listener, k])),
                RELOAD_RESULTS.map(|r| f.tls_reloads.with_label_values(&[listener, r])),
            )
        });
        let (active, parked, [accepted, rejected], [bytes_rx, bytes_tx], errors, reloads) = handles;
        let [proxy_protocol_errors, client_hello_errors, tls_handshake_errors] = errors;
        let [tls_reloaded, tls_reload_failed] = reloads;
        ListenerMetrics {
            active,
            parked,
            accepted,
            rejected,
            bytes_rx,
            bytes_tx,
            proxy_protocol_errors,
            client_hello_errors,
            tls_handshake_errors,
            tls_reloaded,
            tls_reload_failed,
            _lease: lease,
        }
    }

    /// The counter of access log lines dropped because the writer fell
    /// behind.
    pub fn access_log_dropped(&self) -> IntCounter {
        self.families.access_log_dropped.clone()
    }

    /// Counts a configuration load; a success also sets the timestamp gauge.
    pub fn config_loaded(&self, success: bool, unix_seconds: i64) {
        let f = &self.families;
        let result = if success { "success" } else { "failure" };
        f.config_reloads.with_label_values(&[result]).inc();
        f.config_last_reload_ok.set(i64::from(success));
        if success {
            f.config_last_reload.set(unix_seconds);
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The handles of [`BackendMetrics`] before the lease is attached.
struct BackendHandles {
    outcomes: [IntCounter; 5],
    duration: Histogram,
    in_flight: IntGauge,
    up: IntGauge,
    checks: [IntCounter; 2],
    circuit_state: IntGauge,
    transitions: [IntCounter; 3],
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_with(metrics: &Metrics, needle: &str) -> usize {
        metrics
            .encode()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .count()
    }

    #[test]
    fn a_backends_series_go_when_its_last_handle_set_drops() {
        let metrics = Metrics::new();
        let first = metrics.backend("app", "10.0.0.1:80");
        first.record(Outcome::Success, 0.01);
        let second = metrics.backend("app", "10.0.0.1:80");
        let needle = "backend=\"10.0.0.1:80\"";
        // 5 outcomes, 18 histogram lines (16 buckets, sum, count),
        // in-flight, up, 2 checks,
        // circuit state, 3 transitions.
        assert_eq!(lines_with(&metrics, needle), 5 + 18 + 1 + 1 + 2 + 1 + 3);
        drop(first);
        assert!(
            lines_with(&metrics, needle) > 0,
            "a surviving handle set keeps the series (and its counts)"
        );
        assert!(metrics
            .encode()
            .contains("sluice_upstream_requests_total{backend=\"10.0.0.1:80\",outcome=\"success\",upstream=\"app\"} 1"));
        drop(second);
        assert_eq!(lines_with(&metrics, needle), 0);
        // Coming back starts from zero, fully registered again.
        let again = metrics.backend("app", "10.0.0.1:80");
        again.record(Outcome::Timeout, 0.5);
        let text = metrics.encode();
        assert!(text.contains("sluice_upstream_requests_total{backend=\"10.0.0.1:80\",outcome=\"success\",upstream=\"app\"} 0"), "{text}");
        assert!(text.contains("sluice_upstream_requests_total{backend=\"10.0.0.1:80\",outcome=\"timeout\",upstream=\"app\"} 1"), "{text}");
    }

    #[test]
    fn route_upstream_and_listener_series_go_with_their_handles() {
        let metrics = Metrics::new();
        let route = metrics.route("web", "api");
        let shed = metrics.shed("api");
        let retries = metrics.retries("api");
        let listener = metrics.listener("web");
        route.record(200, 0.001);
        shed.circuit_open.inc();
        retries.by_condition[0].inc();
        listener.accepted.inc();
        let text = metrics.encode();
        for want in [
            "sluice_http_requests_total{code=\"2xx\",listener=\"web\",upstream=\"api\"} 1",
            "sluice_load_shed_total{reason=\"circuit_open\",upstream=\"api\"} 1",
            "sluice_retries_total{reason=\"connect-failure\",upstream=\"api\"} 1",
            "sluice_downstream_connections_total{listener=\"web\",result=\"accepted\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        drop((route, shed, retries, listener));
        let text = metrics.encode();
        assert!(!text.contains("upstream=\"api\""), "{text}");
        assert!(!text.contains("listener=\"web\""), "{text}");
    }

    #[test]
    fn histograms_are_in_seconds_from_half_a_millisecond_to_thirty_seconds() {
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.0005));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&30.0));
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        let metrics = Metrics::new();
        let _route = metrics.route("web", "app");
        let text = metrics.encode();
        assert!(text.contains(
            "sluice_http_request_duration_seconds_bucket{listener=\"web\",upstream=\"app\",le=\"0.0005\"} 0"
        ));
        assert!(text.contains(
            "sluice_http_request_duration_seconds_bucket{listener=\"web\",upstream=\"app\",le=\"30\"} 0"
        ));
    }

    #[test]
    fn a_failed_load_turns_the_success_gauge_off_and_keeps_the_timestamp() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        assert!(text.contains("sluice_config_reloads_total{result=\"failure\"} 0"));
        metrics.config_loaded(true, 1_700_000_000);
        metrics.config_loaded(false, 1_700_000_100);
        let text = metrics.encode();
        assert!(
            text.contains("sluice_config_last_reload_successful 0"),
            "{text}"
        );
        assert!(text.contains("sluice_config_last_reload_success_timestamp_seconds 1700000000"));
        assert!(text.contains("sluice_config_reloads_total{result=\"failure\"} 1"));
    }
}
