//! Reloading: a new config file into a new snapshot, or the old one kept.
//!
//! read -> parse -> validate -> bind new listener addresses -> resolve new
//! discovery names -> build (reusing backend state from the registry) ->
//! swap -> reconcile the registry, the health checkers, the discovery tasks
//! and the accept loops. Everything that can fail happens before the swap:
//! on any failure the old snapshot keeps serving, the error is logged with
//! its location and `sluice_config_reloads_total{result="failure"}` counts
//! it. `admin.listen`, `runtime.workers`, `runtime.busy_poll` and
//! `log.format` are fixed at start; a reload that changes them is refused
//! as a whole.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use super::discovery::backends_of;
use super::listeners::{self, BindFailure, Source};
use super::{unix_now, Control, Inner};
use crate::config::{self, Config, ConfigErrors, DiscoveryConfig};
use crate::state::Snapshot;
use crate::upstream::backend::BackendState;

/// Why a reload kept the old snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("invalid config:\n{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("{0} changed: it takes effect only at restart")]
    NeedsRestart(&'static str),
    #[error(transparent)]
    Bind(#[from] BindFailure),
    #[error("config validation did not finish")]
    Aborted,
    #[error("shutting down")]
    ShuttingDown,
}

impl Control {
    /// Reloads the file the running config came from (what SIGHUP does),
    /// whether or not it changed. Counted and logged either way.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let mut inner = self.inner.lock().await;
        let path = self.shared.snapshot.load().config.source.path.clone();
        let result = match read(&path).await {
            Ok(text) => {
                inner.last_tried = Some(config::content_hash(&text));
                self.load_and_apply(&mut inner, text, &path).await
            }
            Err(err) => Err(err),
        };
        self.record(&path, &result);
        result
    }

    /// Reloads the file if its text differs from the running config's and
    /// from the text last tried; `None` when it does not. The file watcher
    /// calls this: one edit can fire several events, and an invalid text
    /// should be reported once, not once per event.
    pub async fn reload_if_changed(&self) -> Option<Result<(), ReloadError>> {
        let mut inner = self.inner.lock().await;
        let running = self.shared.snapshot.load_full();
        let path = running.config.source.path.clone();
        let text = match read(&path).await {
            Ok(text) => text,
            Err(err) => {
                let result = Err(err);
                self.record(&path, &result);
                return Some(result);
            }
        };
        let hash = config::content_hash(&text);
        if hash == running.config.source.hash || inner.last_tried.as_deref() == Some(&hash) {
            return None;
        }
        inner.last_tried = Some(hash);
        let result = self.load_and_apply(&mut inner, text, &path).await;
        self.record(&path, &result);
        Some(result)
    }

    /// Applies an already validated config as a reload. Counted and logged.
    pub async fn apply(&self, config: Config) -> Result<(), ReloadError> {
        let mut inner = self.inner.lock().await;
        let path = config.source.path.clone();
        let result = self.apply_locked(&mut inner, config).await;
        self.record(&path, &result);
        result
    }

    async fn load_and_apply(
        &self,
        inner: &mut Inner,
        text: String,
        path: &Path,
    ) -> Result<(), ReloadError> {
        let file = path.display().to_string();
        // Validation resolves backend host names: keep it off the workers.
        let config = off_workers(move || config::from_str(&text, &file))
            .await
            .ok_or(ReloadError::Aborted)??;
        self.apply_locked(inner, config).await
    }

    /// Counts and logs one reload's outcome.
    fn record(&self, path: &Path, result: &Result<(), ReloadError>) {
        self.shared
            .metrics
            .config_loaded(result.is_ok(), unix_now());
        let path = path.display();
        match result {
            Ok(()) => {
                let snapshot = self.shared.snapshot.load();
                tracing::info!(path = %path, hash = %snapshot.config.source.hash, "config reloaded");
            }
            Err(ReloadError::Invalid(errors)) => {
                for error in &errors.0 {
                    tracing::error!(path = %path, "invalid config: {error}");
                }
                tracing::error!(path = %path, errors = errors.0.len(), "config reload failed, keeping the running config");
            }
            Err(err) => {
                let cause = std::error::Error::source(err).map(ToString::to_string);
                tracing::error!(path = %path, error = %err, cause = cause.as_deref().unwrap_or("-"), "config reload failed, keeping the running config");
            }
        }
    }

    /// Swaps in a snapshot built from `new`, or changes nothing.
    async fn apply_locked(&self, inner: &mut Inner, mut new: Config) -> Result<(), ReloadError> {
        if inner.closed {
            return Err(ReloadError::ShuttingDown);
        }
        let old = self.shared.snapshot.load_full();
        if old.config.admin.listen != new.admin.listen {
            return Err(ReloadError::NeedsRestart("admin.listen"));
        }
        if old.config.runtime.workers != new.runtime.workers {
            return Err(ReloadError::NeedsRestart("runtime.workers"));
        }
        if old.config.runtime.busy_poll_interval != new.runtime.busy_poll_interval {
            return Err(ReloadError::NeedsRestart("runtime.busy_poll_interval"));
        }
        if old.config.runtime.busy_poll != new.runtime.busy_poll {
            return Err(ReloadError::NeedsRestart("runtime.busy_poll"));
        }
        if old.config.log.format != new.log.format {
            return Err(ReloadError::NeedsRestart("log.format"));
        }
        // Every bind first: a reload that cannot bind changes nothing.
        let plan = listeners::plan(&inner.listeners, &new.listeners, self.workers.len()).await?;
        inner
            .discovery
            .fill(&mut new, Some(&old), &self.shared.metrics)
            .await;
        let snapshot = {
            let (shared, previous) = (Arc::clone(&self.shared), Arc::clone(&old));
            off_workers(move || {
                Arc::new(Snapshot::build(
                    new,
                    Some(&previous),
                    &shared.registry,
                    &shared.metrics,
                ))
            })
            .await
            .ok_or(ReloadError::Aborted)?
        };

        // A removed listener stops before the swap: after it, requests on
        // its connections would find no listener in the snapshot.
        let mut old_listeners: Vec<Option<_>> = std::mem::take(&mut inner.listeners)
            .into_iter()
            .map(Some)
            .collect();
        for (i, close) in &plan.stopped {
            let removed = old_listeners[*i].as_ref().is_some_and(|l| {
                !snapshot
                    .config
                    .listeners
                    .iter()
                    .any(|n| n.name == l.config.name)
            });
            if let Some(l) = old_listeners[*i].take_if(|_| removed) {
                l.stop(*close);
            }
        }
        self.publish(Arc::clone(&snapshot), old).await;
        inner.discovery.reconcile(
            &snapshot.config,
            &self.me,
            &self.shared.metrics,
            &self.background,
        );

        let mut running = Vec::with_capacity(plan.sources.len());
        for (index, (config, source)) in snapshot
            .config
            .listeners
            .iter()
            .zip(plan.sources)
            .enumerate()
        {
            match source {
                Source::Keep(i) => {
                    if let Some(mut l) = old_listeners[i].take() {
                        l.config = config.clone();
                        running.push(l);
                    }
                }
                Source::Start {
                    socket,
                    addr,
                    active,
                    ..
                } => {
                    tracing::info!(listener = %config.name, addr = %addr, "listener started");
                    running.push(self.start_listener(index, config, socket, addr, active));
                }
            }
        }
        // The replaced loops stop once their successors accept.
        for (i, close) in &plan.stopped {
            if let Some(l) = old_listeners[*i].take() {
                l.stop(*close);
            }
        }
        self.publish_addresses(&running);
        inner.listeners = running;
        Ok(())
    }

    /// Takes a good DNS answer for `upstream`: when its set of addresses
    /// changed, swaps in a snapshot with the new backends.
    pub(super) async fn discovered(
        &self,
        upstream: &str,
        discovery: &DiscoveryConfig,
        mut addrs: Vec<SocketAddr>,
    ) {
        let inner = self.inner.lock().await;
        if inner.closed {
            return;
        }
        let old = self.shared.snapshot.load_full();
        // A reload may have changed or removed the upstream meanwhile.
        let Some(index) = old
            .config
            .upstreams
            .iter()
            .position(|u| u.name == upstream && u.discovery.as_ref() == Some(discovery))
        else {
            return;
        };
        self.shared
            .metrics
            .discovery(upstream)
            .backends
            .set(addrs.len() as i64);
        addrs.sort();
        let mut current: Vec<SocketAddr> = old.config.upstreams[index]
            .backends
            .iter()
            .map(|b| b.socket_addr)
            .collect();
        current.sort();
        if current == addrs {
            return;
        }
        let added = addrs.iter().filter(|a| !current.contains(a)).count();
        let removed = current.iter().filter(|a| !addrs.contains(a)).count();
        let backends = backends_of(&addrs);
        let (shared, previous) = (Arc::clone(&self.shared), Arc::clone(&old));
        let built = off_workers(move || {
            let mut config = (*previous.config).clone();
            config.upstreams[index].backends = backends;
            let mut snapshot =
                Snapshot::build(config, Some(&previous), &shared.registry, &shared.metrics);
            // The file was not loaded again.
            snapshot.loaded_at = previous.loaded_at;
            Arc::new(snapshot)
        })
        .await;
        let Some(snapshot) = built else {
            return;
        };
        self.publish(snapshot, old).await;
        tracing::info!(
            upstream,
            added,
            removed,
            backends = addrs.len(),
            "discovery: backends changed"
        );
    }

    /// Swaps `snapshot` in for `old`, then lets go of the backends it no
    /// longer has (they drain: no new picks, calls in flight finish on their
    /// `Arc`) and makes the health checkers follow it.
    async fn publish(&self, snapshot: Arc<Snapshot>, old: Arc<Snapshot>) {
        let shared = Arc::clone(&self.shared);
        let done = off_workers(move || {
            shared.snapshot.store(Arc::clone(&snapshot));
            // By identity of the state: a name that resolved to a new
            // address got new state, and the old one must go.
            let keep: HashSet<*const BackendState> = snapshot
                .upstreams
                .iter()
                .flat_map(|u| u.backends.iter().map(Arc::as_ptr))
                .collect();
            let removed = shared
                .registry
                .retain(&|state| keep.contains(&Arc::as_ptr(state)));
            for key in &removed {
                tracing::debug!(backend = %key, "backend removed: draining");
            }
            if !removed.is_empty() {
                tracing::info!(backends = removed.len(), "backends removed: draining");
            }
            shared.health.reconcile(&snapshot);
            // Often the last owner of the removed backends' state: freed
            // here too.
            drop(old);
        })
        .await;
        if done.is_none() {
            tracing::error!("swapping in the new config did not finish");
        }
    }
}

/// The text of the config file, read on the blocking pool.
async fn read(path: &Path) -> Result<String, ReloadError> {
    let path = path.to_path_buf();
    off_workers(move || config::read_file(&path))
        .await
        .ok_or(ReloadError::Aborted)?
        .map_err(ReloadError::from)
}

/// Runs `work` on the blocking pool and waits for it: building and retiring
/// the snapshots of a large config is CPU work that must not stall the
/// workers serving requests. `None` if it did not finish (a panic, or the
/// runtime shutting down).
async fn off_workers<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(work).await.ok()
}
