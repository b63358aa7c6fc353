//! Shared state: the current config snapshot and what outlives it.
//!
//! A [`Snapshot`] is everything one config file produces (routes, upstreams,
//! balancers, limits, resolved metric handles). It is immutable, built off to
//! the side and published with one `ArcSwap::store`; a request loads it once
//! and keeps that `Arc` to its end. [`Shared`] holds the swap slot and the
//! long-lived parts: the backend registry, the metrics, the access log and
//! the lifecycle flags read by /readyz.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::admin::metrics::{Metrics, RouteMetrics};
use crate::config::{Config, ListenerConfig, RouteTarget};
use crate::health::HealthChecks;
use crate::proxy::access_log::AccessLog;
use crate::proxy::route::Router;
use crate::upstream::registry::Registry;
use crate::upstream::Upstream;

/// One config generation, ready to serve.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub loaded_at: SystemTime,
    pub listeners: Vec<ListenerRuntime>,
    pub upstreams: Vec<Arc<Upstream>>,
}

/// The per-snapshot part of a listener: its routes and metric handles.
pub struct ListenerRuntime {
    pub name: Arc<str>,
    pub config: ListenerConfig,
    pub router: Router,
    /// Indexed like `Snapshot::upstreams`; `None` for upstreams this
    /// listener cannot reach.
    route_metrics: Vec<Option<Arc<RouteMetrics>>>,
    /// For requests that reached no upstream.
    pub unrouted: Arc<RouteMetrics>,
}

impl ListenerRuntime {
    /// The metric handles for requests to upstream `index`.
    pub fn route_metrics(&self, index: usize) -> &Arc<RouteMetrics> {
        self.route_metrics
            .get(index)
            .and_then(Option::as_ref)
            .unwrap_or(&self.unrouted)
    }
}

impl Snapshot {
    /// Builds a snapshot, taking backend state from `registry` (creating what
    /// is new) and resolving every metric handle the data path will touch.
    /// An upstream whose config is unchanged from `previous` (the snapshot
    /// being replaced) is carried over whole: its balancer, limits and retry
    /// budget keep going as if nothing happened.
    pub fn build(
        config: Config,
        previous: Option<&Snapshot>,
        registry: &Registry,
        metrics: &Metrics,
    ) -> Snapshot {
        let previous_by_name: HashMap<&str, &Arc<Upstream>> = previous
            .map(|p| p.upstreams.iter().map(|u| (&*u.name, u)).collect())
            .unwrap_or_default();
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous_by_name.get(u.name.as_str()).copied();
                match old {
                    Some(old) if old.config == *u => Arc::clone(old),
                    _ => Arc::new(Upstream::from_config(
                        u,
                        old.map(|o| &**o),
                        registry,
                        metrics,
                    )),
                }
            })
            .collect();
        let by_name: HashMap<&str, usize> = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.as_str(), i))
            .collect();
        let index_of = |name: &str| by_name.get(name).copied();
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let router = Router::new(&l.routes, l.upstream.as_deref(), &index_of);
                let mut route_metrics = vec![None; upstreams.len()];
                let reachable =
                    l.upstream
                        .iter()
                        .map(String::as_str)
                        .chain(l.routes.iter().flat_map(|r| match &r.target {
                            RouteTarget::Upstream(u) => vec![u.as_str()],
                            RouteTarget::Split(parts) => {
                                parts.iter().map(|(u, _)| u.as_str()).collect()
                            }
                        }));
                for name in reachable {
                    if let Some(i) = index_of(name) {
                        route_metrics[i] = Some(Arc::new(metrics.route(&l.name, name)));
                    }
                }
                ListenerRuntime {
                    name: Arc::from(l.name.as_str()),
                    config: l.clone(),
                    router,
                    route_metrics,
                    unrouted: Arc::new(metrics.route(&l.name, "")),
                }
            })
            .collect();
        Snapshot {
            config: Arc::new(config),
            loaded_at: SystemTime::now(),
            listeners,
            upstreams,
        }
    }

    /// The upstream called `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| &*u.name == name)
    }

    /// The listener a connection was accepted on: by index, checked by name
    /// (a reload may have moved it).
    pub fn listener(&self, index: usize, name: &str) -> Option<&ListenerRuntime> {
        match self.listeners.get(index) {
            Some(l) if &*l.name == name => Some(l),
            _ => self.listeners.iter().find(|l| &*l.name == name),
        }
    }
}

/// State shared by every task of a running Sluice.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub registry: Registry,
    pub metrics: Metrics,
    /// Where finished requests and sessions are logged (when
    /// `log.access_log` is on).
    pub access_log: Arc<AccessLog>,
    /// The health-check tasks of the current snapshot's backends.
    pub health: HealthChecks,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Shared {
    /// Builds the first snapshot from `config`.
    pub fn new(config: Config, metrics: Metrics) -> Shared {
        let registry = Registry::default();
        let snapshot = Snapshot::build(config, None, &registry, &metrics);
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry,
            access_log: Arc::new(AccessLog::stdout(metrics.access_log_dropped())),
            metrics,
            health: HealthChecks::default(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// Marks every listener bound.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Marks the start of a graceful shutdown: /readyz turns 503.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether /readyz should answer 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    /// Whether a graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
