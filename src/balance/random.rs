//! Weighted random: each pick is an independent draw, a backend of weight
//! `w` taking `w / total` of the picks.
//!
//! A pick draws from the full weight table (O(log n)) and redraws a few
//! times when it lands on an ineligible backend; after that it scans, so an
//! eligible backend is found whenever one exists.

use std::sync::Arc;

use super::sample::{draw_accepted, SharedRng, Weights};
use super::Balancer;
use crate::upstream::backend::BackendState;

/// Weighted random choice among the eligible backends.
pub struct Random {
    weights: Weights,
    rng: SharedRng,
}

impl Random {
    /// A balancer over backends with these weights (0 counts as 1), its
    /// draws fixed by `seed`.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        Random {
            weights: Weights::new(weights),
            rng: SharedRng::new(seed),
        }
    }
}

impl Balancer for Random {
    fn pick(
        &self,
        backends: &[Arc<BackendState>],
        _key: Option<u64>,
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Option<usize> {
        let mut rng = self.rng.local();
        draw_accepted(backends, &self.weights, &mut rng, |_, b| eligible(b))
    }
}
