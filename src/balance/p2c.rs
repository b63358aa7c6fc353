//! Power of two choices (Mitzenmacher 2001): sample two distinct eligible
//! backends at random and send the call to the one with fewer in flight.
//!
//! Samples are drawn weighted by backend weight, so a backend of weight 3
//! is sampled three times as often as one of weight 1. The comparison then
//! uses the raw in-flight counts, so weight is not counted twice. Ties are
//! broken at random.
//!
//! Each sample is a draw from the weight table (O(log n)); a draw that lands
//! on an ineligible backend (or, for the second sample, on the first one) is
//! redrawn up to [`MAX_DRAWS`](super::sample::MAX_DRAWS) times, then a scan finds one, so an eligible
//! backend is always found when one exists. Unlike least_conn, a pick does
//! not look at every backend: that is the point of the algorithm.

use std::sync::Arc;

use super::sample::{draw_accepted, SharedRng, Weights};
use super::Balancer;
use crate::upstream::backend::BackendState;

/// The less loaded of two distinct random eligible backends.
pub struct P2c {
    weights: Weights,
    rng: SharedRng,
}

impl P2c {
    /// A balancer over backends with these weights (0 counts as 1), its
    /// draws fixed by `seed`.
    pub fn new(weights: &[u32], seed: u64) -> Self {
        P2c {
            weights: Weights::new(weights),
            rng: SharedRng::new(seed),
        }
    }

    /// One sample: an eligible index other than `exclude`, or `None` when
    /// there is none.
    fn sample(
        &self,
        backends: &[Arc<BackendState>],
        rng: &mut fastrand::Rng,
        eligible: &dyn Fn(&BackendState) -> bool,
        exclude: Option<usize>,
    ) -> Option<usize> {
        let accept = |i: usize, b: &BackendState| Some(i) != exclude && eligible(b);
        draw_accepted(backends, &self.weights, rng, accept)
    }
}

impl Balancer for P2c {
    fn pick(
        &self,
        backends: &[Arc<BackendState>],
        _key: Option<u64>,
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Option<usize> {
        let mut rng = self.rng.local();
        let first = self.sample(backends, &mut rng, eligible, None)?;
        let Some(second) = self.sample(backends, &mut rng, eligible, Some(first)) else {
            // The only eligible backend.
            return Some(first);
        };
        let (a, b) = (backends[first].in_flight(), backends[second].in_flight());
        Some(match a.cmp(&b) {
            std::cmp::Ordering::Less => first,
            std::cmp::Ordering::Greater => second,
            std::cmp::Ordering::Equal if rng.bool() => first,
            std::cmp::Ordering::Equal => second,
        })
    }
}
