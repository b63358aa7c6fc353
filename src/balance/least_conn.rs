//! Least connections: the eligible backend with the fewest calls in flight
//! (HTTP requests, or TCP sessions), relative to its weight.
//!
//! A pick scans every backend once, reading [`BackendState::in_flight`].
//! Loads are compared as `in_flight / weight` by cross-multiplication, so no
//! division and no rounding (plain counts when every weight is equal). Ties
//! are broken uniformly at random, so idle backends share the first
//! requests instead of the first one in the file taking them all: one pass
//! finds the minimum and counts the backends at it, and only when several
//! tie does a second pass take the r-th of them for one random r.

use std::sync::Arc;

use super::sample::{SharedRng, Weights};
use super::Balancer;
use crate::upstream::backend::BackendState;

/// Fewest in flight per unit of weight, ties at random.
pub struct LeastConn {
    weights: Weights,
    /// Every weight is the same: compare in-flight counts directly.
    uniform: bool,
    rng: SharedRng,
}

impl LeastConn {
    /// A balancer over backends with these weights (0 counts as 1); `seed`
    /// fixes how ties are broken.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        let first = weights.first().map(|&w| w.max(1));
        LeastConn {
            weights: Weights::new(weights),
            uniform: weights.iter().all(|&w| Some(w.max(1)) == first),
            rng: SharedRng::new(seed),
        }
    }

    /// `(in_flight, weight)` of backend `i` as a comparable load: with equal
    /// weights the weight is 1.
    fn load(&self, i: usize, b: &BackendState) -> (u64, u64) {
        let weight = if self.uniform { 1 } else { self.weights.of(i) };
        (b.in_flight() as u64, weight)
    }
}

/// `a < b` for loads `(in_flight, weight)`, compared as fractions.
fn lighter(a: (u64, u64), b: (u64, u64)) -> bool {
    u128::from(a.0) * u128::from(b.1) < u128::from(b.0) * u128::from(a.1)
}

fn same(a: (u64, u64), b: (u64, u64)) -> bool {
    u128::from(a.0) * u128::from(b.1) == u128::from(b.0) * u128::from(a.1)
}

impl Balancer for LeastConn {
    fn pick(
        &self,
        backends: &[Arc<BackendState>],
        _key: Option<u64>,
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Option<usize> {
        // The lightest load, its first backend, and how many share it.
        let mut best: Option<(usize, (u64, u64))> = None;
        let mut ties = 0u64;
        for (i, b) in backends.iter().enumerate() {
            if !eligible(b) {
                continue;
            }
            let load = self.load(i, b);
            match best {
                Some((_, best_load)) if !lighter(load, best_load) => {
                    if same(load, best_load) {
                        ties += 1;
                    }
                }
                _ => {
                    best = Some((i, load));
                    ties = 1;
                }
            }
        }
        let (first, best_load) = best?;
        if ties <= 1 {
            return Some(first);
        }
        // Loads may move meanwhile; if the r-th tie is gone, keep the first.
        let mut r = self.rng.next_u64() % ties;
        for (i, b) in backends.iter().enumerate().skip(first) {
            if eligible(b) && same(self.load(i, b), best_load) {
                if r == 0 {
                    return Some(i);
                }
                r -= 1;
            }
        }
        Some(first)
    }
}
