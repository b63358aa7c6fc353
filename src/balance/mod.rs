//! Balancers: which backend of an upstream takes the next request or session.
//!
//! One trait, one file per algorithm. A balancer knows nothing about HTTP:
//! the caller hashes whatever key it wants and passes a `u64`. It is built
//! once per snapshot from the upstream's full backend list (so positions do
//! not move while a backend is merely down), skips ineligible backends
//! itself, and returns `None` only when none is eligible.

mod round_robin;

pub use round_robin::{RoundRobin, SmoothTable};

use std::sync::Arc;

use crate::config::BalancerKind;
use crate::upstream::backend::BackendState;

/// Picks a backend for one request or session.
pub trait Balancer: Send + Sync {
    /// Picks one backend index; never one for which `eligible` returns
    /// false. `None` means no backend is eligible.
    fn pick(
        &self,
        backends: &[Arc<BackendState>],
        key: Option<u64>,
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Option<usize>;
}

/// Builds the balancer `kind` for backends with these weights (in the order
/// the snapshot keeps them).
pub fn build(kind: BalancerKind, weights: &[u32]) -> Box<dyn Balancer> {
    match kind {
        BalancerKind::RoundRobin => Box::new(RoundRobin::new(weights)),
    }
}
