//! Upstreams: a named group of backends with a balancer, limits and a
//! pooled client. Built once per snapshot; the per-backend state inside
//! comes from the registry and outlives the snapshot.

pub mod backend;
pub mod client;
pub mod registry;

use std::sync::Arc;

use crate::admin::metrics::{Metrics, RetryMetrics, ShedMetrics};
use crate::balance::{self, Balancer};
use crate::config::UpstreamConfig;
use crate::proxy::error::ProxyError;
use crate::resilience::limit::InFlightLimit;
use crate::resilience::retry::{RetryBudget, RetryOn};
use crate::tls::client::UpstreamTls;
use backend::{BackendKey, BackendState, RequestGuard};
use client::UpstreamClient;
use prometheus::IntCounter;
use registry::Registry;

/// One upstream of one snapshot.
pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    /// In the order of the config file.
    pub backends: Vec<Arc<BackendState>>,
    balancer: Box<dyn Balancer>,
    pub limit: InFlightLimit,
    /// Caps the retries this upstream adds.
    pub budget: RetryBudget,
    retries: RetryMetrics,
    pub client: UpstreamClient,
    pub shed: ShedMetrics,
}

impl Upstream {
    /// Builds the upstream, taking backend state from `registry`.
    pub fn from_config(config: &UpstreamConfig, registry: &Registry, metrics: &Metrics) -> Self {
        let name: Arc<str> = Arc::from(config.name.as_str());
        let backends: Vec<_> = config
            .backends
            .iter()
            .map(|b| {
                let key = BackendKey {
                    upstream: Arc::clone(&name),
                    address: Arc::from(b.address.as_str()),
                };
                let state = registry.get_or_create(key, b.socket_addr, metrics);
                state.configure_breaker(config.circuit_breaker.as_ref());
                state
            })
            .collect();
        let weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
        let addresses: Vec<&str> = config.backends.iter().map(|b| b.address.as_str()).collect();
        let limit = InFlightLimit::new(config.max_in_flight);
        let balancer = balance::build(
            config.balancer,
            &weights,
            &addresses,
            fastrand::u64(..),
            Some(limit.counter()),
        );
        Upstream {
            balancer,
            limit,
            budget: RetryBudget::new(config.retry.budget),
            retries: metrics.retries(&config.name),
            client: UpstreamClient::new(
                &config.name,
                config.protocol,
                &config.pool,
                config.timeouts.connect,
                config
                    .tls
                    .as_ref()
                    .map(|tls| Arc::new(UpstreamTls::new(tls, config.protocol, &config.backends))),
            ),
            shed: metrics.shed(&config.name),
            backends,
            name,
            config: config.clone(),
        }
    }

    /// An eligible backend for a request with this key, or `None` when no
    /// backend is eligible.
    pub fn pick(&self, key: Option<u64>) -> Option<&Arc<BackendState>> {
        self.pick_excluding(key, &[])
    }

    /// Like [`Upstream::pick`], never returning one of `tried` (a failover
    /// goes to a different backend when there is one).
    pub fn pick_excluding(
        &self,
        key: Option<u64>,
        tried: &[Arc<BackendState>],
    ) -> Option<&Arc<BackendState>> {
        let untried = |b: &BackendState| !tried.iter().any(|t| std::ptr::eq(&**t, b));
        let slow_start = self.config.slow_start;
        // A warming backend is skipped with probability 1 - warmth, which
        // scales its share of picks like its weight; if that leaves nothing,
        // it is better used than not.
        let warm = |b: &BackendState| {
            let warmth = b.warmth(slow_start);
            warmth >= 1.0 || fastrand::f64() < warmth
        };
        let i = self
            .balancer
            .pick(&self.backends, key, &|b| {
                self.admits(b) && untried(b) && warm(b)
            })
            .or_else(|| {
                self.balancer
                    .pick(&self.backends, key, &|b| self.admits(b) && untried(b))
            })?;
        self.backends.get(i)
    }

    /// The `sluice_retries_total` counter for `condition`.
    pub fn retries(&self, condition: RetryOn) -> &IntCounter {
        let i = RetryOn::ALL
            .iter()
            .position(|(c, _)| *c == condition)
            .unwrap_or(0);
        &self.retries.by_condition[i]
    }

    /// The answer when no backend is eligible, counted as shed load:
    /// `circuit_open` when some backend passes its health checks and only
    /// its open circuit keeps it out, else `no_healthy_backend`.
    pub fn no_backend(&self) -> ProxyError {
        let upstream = self.name.to_string();
        let held_by_circuit = self
            .backends
            .iter()
            .any(|b| b.is_healthy() && !b.circuit_allows());
        if held_by_circuit {
            self.shed.circuit_open.inc();
            ProxyError::CircuitOpen { upstream }
        } else {
            self.shed.no_healthy_backend.inc();
            ProxyError::NoHealthyBackend { upstream }
        }
    }

    /// Picks an eligible backend not in `tried` and starts a call on it,
    /// under the per-backend bulkhead. A backend that filled up between the
    /// pick and the start is added to `tried` and another is picked.
    pub fn start_call(
        &self,
        key: Option<u64>,
        tried: &mut Vec<Arc<BackendState>>,
    ) -> Option<RequestGuard> {
        loop {
            let backend = Arc::clone(self.pick_excluding(key, tried)?);
            let max = self.config.max_in_flight_per_backend;
            if let Some(guard) = backend.try_start_request(max) {
                return Some(guard);
            }
            tried.push(backend);
        }
    }

    /// Whether `backend` may take one more call: health checks pass and it
    /// is under its bulkhead. Circuit state will narrow this.
    fn admits(&self, backend: &BackendState) -> bool {
        let max = self.config.max_in_flight_per_backend;
        backend.is_healthy() && (max == 0 || backend.in_flight() < max) && backend.circuit_allows()
    }
}
