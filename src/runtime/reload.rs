//! Reloading the config file into a new snapshot.
//!
//! read -> parse -> validate -> build (reusing backend state from the
//! registry) -> swap. On any failure the old snapshot keeps serving, the
//! error is logged with its location and counted. Listener sockets, the
//! admin socket and the worker count are fixed at start: a reload that
//! changes them is refused as a whole for now.

use std::collections::HashSet;
use std::sync::Arc;

use crate::config::{self, Config, ConfigErrors, ListenerConfig, ListenerTlsConfig};
use crate::state::{Shared, Snapshot};
use crate::upstream::backend::BackendKey;

/// Why a reload kept the old snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("invalid config:\n{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("{0} changed: listener addresses, protocols, limits, timeouts and tls, [admin] and [runtime] take effect only at restart")]
    NeedsRestart(&'static str),
}

/// Reloads the file the current snapshot came from.
pub fn reload(shared: &Shared) -> Result<(), ReloadError> {
    let path = shared.snapshot.load().config.source.path.clone();
    let result = config::load_file(&path)
        .map_err(ReloadError::from)
        .and_then(|new| apply(shared, new));
    shared
        .metrics
        .config_loaded(result.is_ok(), super::unix_now());
    match &result {
        Ok(()) => tracing::info!(path = %path.display(), "config reloaded"),
        Err(err) => {
            tracing::error!(path = %path.display(), "config reload failed, keeping the running config: {err}")
        }
    }
    result
}

/// Swaps in a snapshot built from `new`, if only reloadable parts changed.
pub fn apply(shared: &Shared, new: Config) -> Result<(), ReloadError> {
    let old = shared.snapshot.load_full();
    let fixed = |l: &ListenerConfig| {
        (
            l.name.clone(),
            l.listen,
            l.protocol,
            l.max_connections,
            l.timeouts.client_header,
            l.timeouts.idle,
            // Set up when the listener starts; the files' contents are
            // reloaded by the listener itself when they change.
            l.tls.as_ref().map(ListenerTlsConfig::setup),
        )
    };
    let old_listeners: Vec<_> = old.config.listeners.iter().map(fixed).collect();
    let new_listeners: Vec<_> = new.listeners.iter().map(fixed).collect();
    if old_listeners != new_listeners {
        return Err(ReloadError::NeedsRestart("a listener"));
    }
    if old.config.admin.listen != new.admin.listen {
        return Err(ReloadError::NeedsRestart("admin.listen"));
    }
    if old.config.runtime.workers != new.runtime.workers {
        return Err(ReloadError::NeedsRestart("runtime.workers"));
    }
    let keep: HashSet<BackendKey> = new
        .upstreams
        .iter()
        .flat_map(|u| {
            let upstream: Arc<str> = Arc::from(u.name.as_str());
            u.backends.iter().map(move |b| BackendKey {
                upstream: Arc::clone(&upstream),
                address: Arc::from(b.address.as_str()),
            })
        })
        .collect();
    let snapshot = Arc::new(Snapshot::build(new, &shared.registry, &shared.metrics));
    shared.snapshot.store(Arc::clone(&snapshot));
    shared.health.restart(&snapshot);
    shared.registry.retain(&|k| keep.contains(k));
    Ok(())
}
