//! Every Prometheus metric Sluice exports (names and labels are SPEC §5).
//!
//! One [`Metrics`] value is built by `runtime::run` and passed down; there is
//! no global registry. The data path never looks a label up by string: the
//! snapshot builder resolves label children once per listener/upstream pair
//! ([`RouteMetrics`]) and once per backend ([`BackendMetrics`]), and requests
//! only touch those handles.

use crate::resilience::breaker::CircuitState;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Latency buckets in seconds, from 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The registry and every metric family in it.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    http_requests: IntCounterVec,
    http_request_duration: HistogramVec,
    upstream_requests: IntCounterVec,
    upstream_request_duration: HistogramVec,
    upstream_in_flight: IntGaugeVec,
    load_shed: IntCounterVec,
    downstream_active: IntGaugeVec,
    downstream_total: IntCounterVec,
    tcp_bytes: IntCounterVec,
    protocol_errors: IntCounterVec,
    config_reloads: IntCounterVec,
    backend_up: IntGaugeVec,
    health_checks: IntCounterVec,
    circuit_state: IntGaugeVec,
    circuit_transitions: IntCounterVec,
    retries: IntCounterVec,
    config_last_reload: IntGauge,
    discovery_failures: IntCounterVec,
    discovery_backends: IntGaugeVec,
}

/// Handles for requests of one listener sent to one upstream.
pub struct RouteMetrics {
    /// Indexed by status class: 1xx..5xx at 0..4.
    codes: [IntCounter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    /// Counts one finished request with `status` that took `seconds`.
    pub fn record(&self, status: u16, seconds: f64) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.codes[class].inc();
        self.duration.observe(seconds);
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

/// Handles for load shedding on one upstream.
pub struct ShedMetrics {
    pub overloaded: IntCounter,
    pub no_healthy_backend: IntCounter,
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
        let metrics = Metrics {
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
                "Backend calls in progress",
                &["upstream", "backend"],
            ),
            load_shed: counter(
                "sluice_load_shed_total",
                "Requests answered 503 without a backend call",
                &["upstream", "reason"],
            ),
            downstream_active: gauge(
                "sluice_downstream_connections_active",
                "Client connections open",
                &["listener"],
            ),
            downstream_total: counter(
                "sluice_downstream_connections_total",
                "Client connections accepted or rejected at accept",
                &["listener", "result"],
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
                "Configuration reloads, by result",
                &["result"],
            ),
            config_last_reload: {
                let g = IntGauge::new(
                    "sluice_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful configuration load",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
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
            registry: registry.clone(),
        };
        let build = gauge("sluice_build_info", "Sluice version", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let process = prometheus::process_collector::ProcessCollector::for_self();
        // Not every platform has process metrics; the rest still works.
        let _ = registry.register(Box::new(process));
        metrics
    }

    /// Handles for requests of `listener` sent to `upstream` (empty when the
    /// request never reached an upstream).
    pub fn route(&self, listener: &str, upstream: &str) -> RouteMetrics {
        let code = |c: &str| {
            self.http_requests
                .with_label_values(&[listener, upstream, c])
        };
        RouteMetrics {
            codes: [
                code("1xx"),
                code("2xx"),
                code("3xx"),
                code("4xx"),
                code("5xx"),
            ],
            duration: self
                .http_request_duration
                .with_label_values(&[listener, upstream]),
        }
    }

    /// Handles for one backend of one upstream.
    pub fn backend(&self, upstream: &str, backend: &str) -> BackendMetrics {
        BackendMetrics {
            outcomes: Outcome::ALL.map(|o| {
                self.upstream_requests
                    .with_label_values(&[upstream, backend, o.as_str()])
            }),
            duration: self
                .upstream_request_duration
                .with_label_values(&[upstream, backend]),
            in_flight: self
                .upstream_in_flight
                .with_label_values(&[upstream, backend]),
            up: {
                let up = self.backend_up.with_label_values(&[upstream, backend]);
                up.set(1);
                up
            },
            checks: [
                self.health_checks
                    .with_label_values(&[upstream, backend, "success"]),
                self.health_checks
                    .with_label_values(&[upstream, backend, "failure"]),
            ],
            circuit_state: self.circuit_state.with_label_values(&[upstream, backend]),
            transitions: [
                CircuitState::Closed,
                CircuitState::HalfOpen,
                CircuitState::Open,
            ]
            .map(|s| {
                self.circuit_transitions
                    .with_label_values(&[upstream, backend, s.as_str()])
            }),
        }
    }

    /// Drops the series of a backend that left its upstream, so a fleet
    /// whose addresses churn (pods) does not grow the exposition forever.
    /// Handles still held by its last calls keep working, unexported.
    pub fn forget_backend(&self, upstream: &str, backend: &str) {
        for o in Outcome::ALL {
            let _ = self
                .upstream_requests
                .remove_label_values(&[upstream, backend, o.as_str()]);
        }
        let _ = self
            .upstream_request_duration
            .remove_label_values(&[upstream, backend]);
        let _ = self
            .upstream_in_flight
            .remove_label_values(&[upstream, backend]);
        let _ = self.backend_up.remove_label_values(&[upstream, backend]);
        let _ = self.circuit_state.remove_label_values(&[upstream, backend]);
        for result in ["success", "failure"] {
            let _ = self
                .health_checks
                .remove_label_values(&[upstream, backend, result]);
        }
        for to in [
            CircuitState::Closed,
            CircuitState::HalfOpen,
            CircuitState::Open,
        ] {
            let _ = self
                .circuit_transitions
                .remove_label_values(&[upstream, backend, to.as_str()]);
        }
    }

    /// Handles for the DNS discovery of one upstream.
    pub fn discovery(&self, upstream: &str) -> DiscoveryMetrics {
        DiscoveryMetrics {
            failures: self.discovery_failures.with_label_values(&[upstream]),
            backends: self.discovery_backends.with_label_values(&[upstream]),
        }
    }

    /// Drops the discovery series of an upstream that no longer uses it.
    pub fn forget_discovery(&self, upstream: &str) {
        let _ = self.discovery_failures.remove_label_values(&[upstream]);
        let _ = self.discovery_backends.remove_label_values(&[upstream]);
    }

    /// The retry counter of one upstream for one reason.
    pub fn retry(&self, upstream: &str, reason: &str) -> IntCounter {
        self.retries.with_label_values(&[upstream, reason])
    }

    /// Handles for load shedding on one upstream.
    pub fn shed(&self, upstream: &str) -> ShedMetrics {
        ShedMetrics {
            overloaded: self.load_shed.with_label_values(&[upstream, "overloaded"]),
            no_healthy_backend: self
                .load_shed
                .with_label_values(&[upstream, "no_healthy_backend"]),
        }
    }

    /// Handles for one listener's connections.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            active: self.downstream_active.with_label_values(&[listener]),
            accepted: self
                .downstream_total
                .with_label_values(&[listener, "accepted"]),
            rejected: self
                .downstream_total
                .with_label_values(&[listener, "rejected"]),
            bytes_rx: self.tcp_bytes.with_label_values(&[listener, "rx"]),
            bytes_tx: self.tcp_bytes.with_label_values(&[listener, "tx"]),
            proxy_protocol_errors: self
                .protocol_errors
                .with_label_values(&[listener, "proxy_protocol"]),
            client_hello_errors: self
                .protocol_errors
                .with_label_values(&[listener, "client_hello"]),
        }
    }

    /// Counts a configuration load; a success also sets the timestamp gauge.
    pub fn config_loaded(&self, success: bool, unix_seconds: i64) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[result]).inc();
        if success {
            self.config_last_reload.set(unix_seconds);
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
