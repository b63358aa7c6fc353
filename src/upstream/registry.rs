//! The registry of long-lived backend state, keyed by identity.
//!
//! Snapshot builds ask it for the state of each configured backend; a
//! backend that keeps its upstream name and address gets the same
//! `Arc<BackendState>` back, so counters and in-flight survive a reload.
//! Only snapshot builds take its lock, never the data path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::backend::{BackendKey, BackendState};
use crate::admin::metrics::Metrics;

/// `BackendKey -> Arc<BackendState>`.
#[derive(Default)]
pub struct Registry {
    backends: Mutex<HashMap<BackendKey, Arc<BackendState>>>,
}

impl Registry {
    /// The state for `key`, created (with its metric handles) if new.
    pub fn get_or_create(
        &self,
        key: BackendKey,
        addr: SocketAddr,
        metrics: &Metrics,
    ) -> Arc<BackendState> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(key.clone()).or_insert_with(|| {
            let handles = metrics.backend(&key.upstream, &key.address);
            Arc::new(BackendState::new(key, addr, handles))
        }))
    }

    /// Forgets every backend not in `keep`; calls in flight on them finish
    /// on the `Arc`s they hold.
    pub fn retain(&self, keep: &dyn Fn(&BackendKey) -> bool) {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| keep(k));
    }

    /// How many backends are known.
    pub fn len(&self) -> usize {
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no backend is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
