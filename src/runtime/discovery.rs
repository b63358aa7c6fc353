//! DNS service discovery: upstreams whose backends are the A and AAAA
//! records of a name (a Kubernetes headless Service), resolved again every
//! `refresh`.
//!
//! One task per discovering upstream resolves on its interval and hands
//! each good answer to the runtime ([`Control::discovered`]), which diffs
//! it with the current set and, when it changed, swaps in a snapshot with
//! the new backend list under the same lock as reloads. Surviving addresses
//! keep their state through the registry; vanished ones are drained like
//! backends removed by a reload. A failed or empty answer keeps the last
//! good set, is logged and counted. The tasks follow reloads: an upstream
//! whose discovery settings are unchanged keeps its task, others stop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Control;
use crate::admin::metrics::Metrics;
use crate::config::{BackendConfig, Config, DiscoveryConfig};
use crate::state::Snapshot;

/// The longest one resolution may take (a shorter `refresh` bounds it too).
const RESOLVE_LIMIT: Duration = Duration::from_secs(5);

/// Why a resolution gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot set up the dns resolver")]
    Setup(#[source] ResolveError),
    #[error("resolving {name} failed")]
    Resolve {
        name: String,
        #[source]
        source: ResolveError,
    },
    #[error("resolving {name} timed out after {after:?}")]
    Timeout { name: String, after: Duration },
    #[error("{name} has no A or AAAA records")]
    Empty { name: String },
}

/// A resolver asking `servers` (the system's when empty), without a cache:
/// every refresh asks again, whatever the records' TTL.
pub fn build_resolver(servers: &[SocketAddr]) -> Result<TokioResolver, DiscoveryError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = if servers.is_empty() {
        TokioResolver::builder(provider).map_err(DiscoveryError::Setup)?
    } else {
        let mut group = NameServerConfigGroup::new();
        for server in servers {
            group.push(NameServerConfig::new(*server, Protocol::Udp));
            group.push(NameServerConfig::new(*server, Protocol::Tcp));
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), group);
        TokioResolver::builder_with_config(config, provider)
    };
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.positive_max_ttl = Some(Duration::ZERO);
    options.negative_max_ttl = Some(Duration::ZERO);
    options.timeout = Duration::from_secs(2);
    options.attempts = 1;
    Ok(builder.build())
}

/// The addresses `discovery` names now: its A and AAAA records with its
/// port, sorted. No address at all is an error too, so a Service that
/// briefly has no ready pod does not empty the upstream.
pub async fn resolve(
    resolver: &TokioResolver,
    discovery: &DiscoveryConfig,
) -> Result<Vec<SocketAddr>, DiscoveryError> {
    let name = discovery.host.clone();
    let after = discovery.refresh.min(RESOLVE_LIMIT);
    let lookup = tokio::time::timeout(after, resolver.lookup_ip(name.as_str()))
        .await
        .map_err(|_| DiscoveryError::Timeout {
            name: name.clone(),
            after,
        })?
        .map_err(|source| DiscoveryError::Resolve {
            name: name.clone(),
            source,
        })?;
    let mut addrs: Vec<SocketAddr> = lookup
        .iter()
        .map(|ip| SocketAddr::new(ip, discovery.port))
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(DiscoveryError::Empty { name });
    }
    Ok(addrs)
}

/// Backends for found addresses: weight 1, labelled `ip:port`.
pub fn backends_of(addrs: &[SocketAddr]) -> Vec<BackendConfig> {
    addrs
        .iter()
        .map(|a| BackendConfig {
            address: a.to_string(),
            socket_addr: *a,
            weight: 1,
        })
        .collect()
}

/// The discovery side of a running Sluice: the resolver for the configured
/// servers and one task per discovering upstream.
#[derive(Default)]
pub(super) struct Discovery {
    /// The resolver and the `runtime.dns_servers` it was built for.
    resolver: Option<(Vec<SocketAddr>, Arc<TokioResolver>)>,
    tasks: HashMap<String, Task>,
}

/// One upstream's discovery task; dropping it stops the task.
struct Task {
    config: DiscoveryConfig,
    resolver: Arc<TokioResolver>,
    _stop: DropGuard,
}

impl Discovery {
    /// The resolver for `servers`, built on first use or when they changed.
    fn resolver(&mut self, servers: &[SocketAddr]) -> Result<Arc<TokioResolver>, DiscoveryError> {
        if let Some((built_for, resolver)) = &self.resolver {
            if built_for == servers {
                return Ok(Arc::clone(resolver));
            }
        }
        let resolver = Arc::new(build_resolver(servers)?);
        self.resolver = Some((servers.to_vec(), Arc::clone(&resolver)));
        Ok(resolver)
    }

    /// Fills in the backends of `config`'s discovering upstreams: the set
    /// `previous` had for the same upstream and name, else a resolution now
    /// (all at once). An upstream whose first resolution fails starts
    /// empty (its requests get 503) until its task finds addresses.
    pub async fn fill(
        &mut self,
        config: &mut Config,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
    ) {
        let mut pending = Vec::new();
        for (i, upstream) in config.upstreams.iter_mut().enumerate() {
            let Some(discovery) = &upstream.discovery else {
                continue;
            };
            let known = previous
                .and_then(|p| p.upstream(&upstream.name))
                .filter(|p| p.config.discovery.as_ref() == Some(discovery));
            match known {
                Some(p) => upstream.backends = p.config.backends.clone(),
                None => pending.push((i, discovery.clone())),
            }
        }
        if pending.is_empty() {
            return;
        }
        let resolver = match self.resolver(&config.runtime.dns_servers) {
            Ok(r) => r,
            Err(err) => {
                for (i, _) in &pending {
                    let name = &config.upstreams[*i].name;
                    metrics.discovery(name).failures.inc();
                    tracing::error!(upstream = %name, error = %error_chain(&err), "discovery: no resolver; the upstream has no backends");
                }
                return;
            }
        };
        let mut lookups = JoinSet::new();
        for (i, discovery) in pending {
            let resolver = Arc::clone(&resolver);
            lookups.spawn(async move { (i, resolve(&resolver, &discovery).await) });
        }
        while let Some(joined) = lookups.join_next().await {
            let Ok((i, result)) = joined else {
                continue;
            };
            let upstream = &mut config.upstreams[i];
            let handles = metrics.discovery(&upstream.name);
            match result {
                Ok(addrs) => {
                    handles.backends.set(addrs.len() as i64);
                    tracing::info!(upstream = %upstream.name, backends = addrs.len(), "discovery: first resolution");
                    upstream.backends = backends_of(&addrs);
                }
                Err(err) => {
                    handles.failures.inc();
                    tracing::warn!(upstream = %upstream.name, error = %error_chain(&err), "discovery: first resolution failed; no backends until one succeeds");
                }
            }
        }
    }

    /// Makes the running tasks match `config`: unchanged ones go on, the
    /// others stop, new ones start (their first resolution after one
    /// `refresh`, as `fill` just resolved).
    pub fn reconcile(
        &mut self,
        config: &Config,
        control: &Weak<Control>,
        metrics: &Metrics,
        parent: &CancellationToken,
    ) {
        let resolver = self.resolver(&config.runtime.dns_servers);
        let mut next = HashMap::new();
        for upstream in &config.upstreams {
            let Some(discovery) = &upstream.discovery else {
                continue;
            };
            let old = self.tasks.remove(&upstream.name);
            let same_resolver =
                |t: &Task| resolver.as_ref().is_ok_and(|r| Arc::ptr_eq(r, &t.resolver));
            let task = match old {
                Some(t) if t.config == *discovery && same_resolver(&t) => t,
                _ => {
                    // Dropping the old task (if any) stops it.
                    let resolver = match &resolver {
                        Ok(r) => Arc::clone(r),
                        Err(err) => {
                            tracing::error!(upstream = %upstream.name, error = %error_chain(err), "discovery: no resolver; backends stay as they are");
                            continue;
                        }
                    };
                    let stop = parent.child_token();
                    tokio::spawn(run(
                        Weak::clone(control),
                        upstream.name.clone(),
                        discovery.clone(),
                        Arc::clone(&resolver),
                        stop.clone(),
                    ));
                    Task {
                        config: discovery.clone(),
                        resolver,
                        _stop: stop.drop_guard(),
                    }
                }
            };
            next.insert(upstream.name.clone(), task);
        }
        for name in self.tasks.keys() {
            let still_there = config
                .upstreams
                .iter()
                .any(|u| &u.name == name && u.discovery.is_some());
            if !still_there {
                metrics.forget_discovery(name);
            }
        }
        // Dropping the rest stops them.
        self.tasks = next;
    }

    /// How many discovery tasks run.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Stops every task.
    pub fn stop(&mut self) {
        self.tasks.clear();
    }
}

/// Resolves every `refresh` until stopped, handing good answers on.
async fn run(
    control: Weak<Control>,
    upstream: String,
    discovery: DiscoveryConfig,
    resolver: Arc<TokioResolver>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(discovery.refresh) => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = resolve(&resolver, &discovery) => result,
        };
        let Some(control) = control.upgrade() else {
            return;
        };
        match result {
            Ok(addrs) => control.discovered(&upstream, &discovery, addrs).await,
            Err(err) => {
                control.shared.metrics.discovery(&upstream).failures.inc();
                tracing::warn!(upstream = %upstream, error = %error_chain(&err), "discovery: resolution failed; keeping the last good backends");
            }
        }
    }
}

/// An error and its causes on one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
