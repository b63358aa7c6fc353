//! Upstreams: a named group of backends with a balancer and limits. Built
//! once per snapshot (or carried over whole when a reload leaves it
//! unchanged); the per-backend state inside, pooled client included, comes
//! from the registry and outlives the snapshot.

pub mod backend;
pub mod client;
pub mod h1;
pub mod registry;

use std::sync::Arc;

use tokio::time::Instant;

use crate::admin::metrics::{Metrics, RetryMetrics, ShedMetrics};
use crate::balance::{self, Balancer};
use crate::config::UpstreamConfig;
use crate::proxy::error::ProxyError;
use crate::resilience::limit::InFlightLimit;
use crate::resilience::retry::{RetryBudget, RetryOn};
use crate::tls::client::server_name;
use backend::{BackendKey, BackendState, RequestGuard};
use client::ClientSettings;
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
    pub shed: ShedMetrics,
}

impl Upstream {
    /// Builds the upstream, taking backend state from `registry`.
    /// `previous` is the upstream of the same name in the snapshot being
    /// replaced: its in-flight count carries over, so `max_in_flight` holds
    /// across a reload.
    pub fn from_config(
        config: &UpstreamConfig,
        previous: Option<&Upstream>,
        registry: &Registry,
        metrics: &Metrics,
    ) -> Self {
        let name: Arc<str> = Arc::from(config.name.as_str());
        let mut tls = config.tls.clone();
        if let (Some(tls), Some(discovery)) = (&mut tls, &config.discovery) {
            // Discovered backends are IP addresses: their own host is the
            // name they were found under.
            if tls.sni.is_none() {
                tls.sni = server_name(discovery.host.trim_end_matches('.')).ok();
            }
        }
        let client = ClientSettings {
            protocol: config.protocol,
            pool: config.pool.clone(),
            connect_timeout: config.timeouts.connect,
            tls,
        };
        let backends: Vec<_> = config
            .backends
            .iter()
            .map(|b| {
                let key = BackendKey {
                    upstream: Arc::clone(&name),
                    address: Arc::from(b.address.as_str()),
                };
                let state = registry.get_or_create(key, b.socket_addr, metrics, &client);
                state.configure_breaker(config.circuit_breaker.as_ref());
                state.configure_client(&client);
                state
            })
            .collect();
        let weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
        let addresses: Vec<&str> = config.backends.iter().map(|b| b.address.as_str()).collect();
        let limit = match previous {
            Some(p) => InFlightLimit::sharing(config.max_in_flight, p.limit.counter()),
            None => InFlightLimit::new(config.max_in_flight),
        };
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
    /// pick and the start is added to `tried` and another is picked. `now`
    /// is when the call starts.
    pub fn start_call(
        &self,
        key: Option<u64>,
        tried: &mut Vec<Arc<BackendState>>,
        now: Instant,
    ) -> Option<RequestGuard> {
        loop {
            let backend = Arc::clone(self.pick_excluding(key, tried)?);
            let max = self.config.max_in_flight_per_backend;
            if let Some(guard) = backend.try_start_request(max, now) {
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rustls::pki_types::ServerName;

    use super::*;
    use crate::config::BackendConfig;

    /// The server name TLS to the first backend of `upstream` uses, once
    /// `addr` is its only backend.
    fn name_for(upstream: &str, addr: &str) -> ServerName<'static> {
        let text = format!(
            "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
             [[upstream]]\nname = \"app\"\n{upstream}\n"
        );
        let mut config = crate::config::from_str(&text, "test.toml").expect("valid");
        let socket_addr: SocketAddr = addr.parse().expect("address");
        config.upstreams[0].backends = vec![BackendConfig {
            address: addr.to_owned(),
            socket_addr,
            weight: 1,
        }];
        let upstream = Upstream::from_config(
            &config.upstreams[0],
            None,
            &Registry::default(),
            &Metrics::new(),
        );
        let client = upstream.backends[0].client();
        client.tls().expect("tls").server_name()
    }

    #[tokio::test]
    async fn discovered_backends_are_verified_against_the_discovery_name() {
        let name = name_for(
            "discovery = { dns = \"app.default.svc.:8443\" }\ntls = { verify = false }",
            "10.0.0.7:8443",
        );
        assert_eq!(name, ServerName::try_from("app.default.svc").expect("name"));
        // `sni` still wins.
        let name = name_for(
            "discovery = { dns = \"app.default.svc:8443\" }\ntls = { verify = false, sni = \"app.test\" }",
            "10.0.0.7:8443",
        );
        assert_eq!(name, ServerName::try_from("app.test").expect("name"));
        // A listed IP address is its own name.
        let name = name_for(
            "backends = [\"10.0.0.7:8443\"]\ntls = { verify = false }",
            "10.0.0.7:8443",
        );
        assert_eq!(name, ServerName::try_from("10.0.0.7").expect("name"));
    }
}
