//! Least connections: the eligible backend with the fewest calls in flight
//! (HTTP requests, or TCP sessions), relative to its weight.
//!
//! A pick scans every backend once, reading [`BackendState::in_flight`].
//! Loads are compared as `in_flight / weight` by cross-multiplication, so no
//! division and no rounding. Ties are broken uniformly at random (reservoir
//! sampling over the minima), so idle backends share the first requests
//! instead of the first one in the file taking them all.

use std::cmp::Ordering;
use std::sync::Arc;

use super::sample::{SharedRng, Weights};
use super::Balancer;
use crate::upstream::backend::BackendState;

/// Fewest in flight per unit of weight, ties at random.
pub struct LeastConn {
    weights: Weights,
    rng: SharedRng,
}

impl LeastConn {
    /// A balancer over backends with these weights (0 counts as 1); `seed`
    /// fixes how ties are broken.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        LeastConn {
            weights: Weights::new(weights),
            rng: SharedRng::new(seed),
        }
    }
}

impl Balancer for LeastConn {
    fn pick(
        &self,
        backends: &[Arc<BackendState>],
        _key: Option<u64>,
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Option<usize> {
        // The best so far: index, in flight, weight; and how many tie with it.
        let mut best: Option<(usize, u128, u128)> = None;
        let mut ties = 0u64;
        let mut rng: Option<fastrand::Rng> = None;
        for (i, b) in backends.iter().enumerate() {
            if !eligible(b) {
                continue;
            }
            let load = b.in_flight() as u128;
            let weight = u128::from(self.weights.of(i));
            let order = match best {
                None => Ordering::Less,
                // load / weight against best_load / best_weight.
                Some((_, best_load, best_weight)) => {
                    (load * best_weight).cmp(&(best_load * weight))
                }
            };
            match order {
                Ordering::Less => {
                    best = Some((i, load, weight));
                    ties = 1;
                }
                Ordering::Equal => {
                    ties += 1;
                    // Keep each of the `ties` minima with probability 1/ties.
                    let rng = rng.get_or_insert_with(|| self.rng.local());
                    if rng.u64(..ties) == 0 {
                        best = Some((i, load, weight));
                    }
                }
                Ordering::Greater => {}
            }
        }
        best.map(|(i, _, _)| i)
    }
}
