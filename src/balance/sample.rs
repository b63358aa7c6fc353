//! Randomness and weighted sampling shared by the random, p2c and
//! least_conn balancers.
//!
//! Randomness is injected: each balancer owns a [`SharedRng`] built from a
//! seed given to its constructor. A pick costs one atomic `fetch_add` on that
//! state (a SplitMix64 counter) and then draws from a pick-local
//! [`fastrand::Rng`] seeded from it, so concurrent picks never take a lock
//! and a single-threaded run with the same seed repeats exactly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::upstream::backend::BackendState;

/// The SplitMix64 increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// A seedable, lock-free source of per-pick random generators.
pub(crate) struct SharedRng {
    state: AtomicU64,
}

impl SharedRng {
    /// A generator whose sequence is fixed by `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        SharedRng {
            state: AtomicU64::new(seed),
        }
    }

    /// The next SplitMix64 output.
    pub(crate) fn next_u64(&self) -> u64 {
        let s = self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        splitmix_finalize(s)
    }

    /// A generator for the draws of one pick.
    pub(crate) fn local(&self) -> fastrand::Rng {
        fastrand::Rng::with_seed(self.next_u64())
    }
}

/// The SplitMix64 output function (Steele, Lea, Flood 2014).
fn splitmix_finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Backend weights as a cumulative table, for O(log n) weighted draws.
/// A weight of 0 counts as 1, as in round robin.
pub(crate) struct Weights {
    /// `cumulative[i]` is the sum of the weights of `0..=i`.
    cumulative: Box<[u64]>,
}

impl Weights {
    pub(crate) fn new(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w.max(1));
                sum
            })
            .collect();
        Weights { cumulative }
    }

    /// The weight of backend `i`; backends the table does not know weigh 1.
    pub(crate) fn of(&self, i: usize) -> u64 {
        match i {
            0 => self.cumulative.first().copied().unwrap_or(1),
            _ => match (self.cumulative.get(i), self.cumulative.get(i - 1)) {
                (Some(hi), Some(lo)) => hi - lo,
                _ => 1,
            },
        }
    }

    /// One index drawn with probability proportional to its weight,
    /// ignoring eligibility; `None` when the table is empty.
    pub(crate) fn draw(&self, rng: &mut fastrand::Rng) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let r = rng.u64(..total);
        Some(self.cumulative.partition_point(|&c| c <= r))
    }
}

/// Draws per pick before [`draw_accepted`] falls back to a scan.
pub const MAX_DRAWS: usize = 8;

/// A weighted random index among the backends for which `accept` holds:
/// up to [`MAX_DRAWS`] draws from the full table (O(log n) each), then a
/// scan, so one is found whenever one exists.
pub(crate) fn draw_accepted(
    backends: &[Arc<BackendState>],
    weights: &Weights,
    rng: &mut fastrand::Rng,
    accept: impl Fn(usize, &BackendState) -> bool,
) -> Option<usize> {
    for _ in 0..MAX_DRAWS {
        let Some(i) = weights.draw(rng) else {
            break;
        };
        if backends.get(i).is_some_and(|b| accept(i, b)) {
            return Some(i);
        }
    }
    weighted_scan(backends, weights, rng, accept)
}

/// A weighted draw among the backends for which `accept` holds, by scanning
/// all of them: the fallback when random draws keep missing. `None` only
/// when no backend is accepted.
fn weighted_scan(
    backends: &[Arc<BackendState>],
    weights: &Weights,
    rng: &mut fastrand::Rng,
    accept: impl Fn(usize, &BackendState) -> bool,
) -> Option<usize> {
    let total: u64 = backends
        .iter()
        .enumerate()
        .filter(|(i, b)| accept(*i, b))
        .map(|(i, _)| weights.of(i))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = rng.u64(..total);
    let mut last = None;
    for (i, b) in backends.iter().enumerate() {
        if !accept(i, b) {
            continue;
        }
        let w = weights.of(i);
        if r < w {
            return Some(i);
        }
        r -= w;
        // Eligibility is live state and may change between the two passes;
        // then the last accepted backend of this pass is the answer.
        last = Some(i);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let a = SharedRng::new(7);
        let b = SharedRng::new(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(SharedRng::new(8).next_u64(), xs[0]);
    }

    #[test]
    fn weights_report_each_entry_and_default_to_one() {
        let w = Weights::new(&[3, 0, 5]);
        assert_eq!((w.of(0), w.of(1), w.of(2), w.of(3)), (3, 1, 5, 1));
        assert_eq!(Weights::new(&[]).of(0), 1);
    }

    #[test]
    fn weighted_draws_follow_the_weights() {
        let w = Weights::new(&[1, 3]);
        let mut rng = fastrand::Rng::with_seed(1);
        let heavy = (0..40_000).filter(|_| w.draw(&mut rng) == Some(1)).count();
        assert!((29_000..31_000).contains(&heavy), "{heavy}");
        assert_eq!(Weights::new(&[]).draw(&mut rng), None);
    }
}
