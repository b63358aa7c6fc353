//! The registry of long-lived backend state, keyed by identity.
//!
//! Snapshot builds ask it for the state of each configured backend; a
//! backend that keeps its upstream name and address gets the same
//! `Arc<BackendState>` back, so health, circuit, counters, in-flight and
//! pooled connections survive a reload. Only snapshot builds take its lock,
//! never the data path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::backend::{BackendKey, BackendState};
use super::client::ClientSettings;
use crate::admin::metrics::Metrics;

/// `BackendKey -> Arc<BackendState>`.
#[derive(Default)]
pub struct Registry {
    backends: Mutex<HashMap<BackendKey, Arc<BackendState>>>,
}

impl Registry {
    /// The state for `key`, created (with its metric handles and a client
    /// built from `client`) if new. A name that now resolves to another
    /// address gets fresh state: what was learnt about the old address
    /// says nothing about the new one.
    pub fn get_or_create(
        &self,
        key: BackendKey,
        addr: SocketAddr,
        metrics: &Metrics,
        client: &ClientSettings,
    ) -> Arc<BackendState> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key) {
            Some(state) if state.addr == addr => Arc::clone(state),
            _ => {
                let handles = metrics.backend(&key.upstream, &key.address);
                let state = Arc::new(BackendState::new(
                    key.clone(),
                    addr,
                    handles,
                    client.clone(),
                ));
                map.insert(key, Arc::clone(&state));
                state
            }
        }
    }

    /// Forgets every backend for which `keep` is false and returns their
    /// keys; calls in flight on them finish on the `Arc`s they hold.
    pub fn retain(&self, keep: &dyn Fn(&Arc<BackendState>) -> bool) -> Vec<BackendKey> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = Vec::new();
        map.retain(|k, state| {
            let kept = keep(state);
            if !kept {
                removed.push(k.clone());
            }
            kept
        });
        removed
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
