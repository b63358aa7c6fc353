//! Smooth weighted round robin (the algorithm nginx uses), made lock-free.
//!
//! The smooth sequence for one full cycle is computed once when the snapshot
//! is built; a pick is one atomic increment and a table lookup. Weights are
//! divided by their greatest common divisor first, so equal weights give a
//! table as long as the backend list. When the reduced weights add up to
//! more than [`MAX_TABLE`], the sequence is computed on the fly under a
//! per-upstream mutex instead (a rare configuration: thousands of heavily
//! weighted backends).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::Balancer;
use crate::upstream::backend::BackendState;

/// Longest precomputed cycle.
pub const MAX_TABLE: u64 = 1 << 16;

/// Weighted round robin with no bursts: a backend of weight 3 among three of
/// weight 1 is picked as `a b a c a d`, never `a a a b c d`.
pub struct RoundRobin {
    table: SmoothTable,
}

impl RoundRobin {
    /// A balancer over backends with these weights (each at least 1).
    pub fn new(weights: &[u32]) -> Self {
        RoundRobin {
            table: SmoothTable::new(weights),
        }
    }
}

impl Balancer for RoundRobin {
    fn pick(
        &self,
        backends: &[Arc<BackendState>],
        _key: Option<u64>,
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Option<usize> {
        self.table
            .next_where(|i| backends.get(i).is_some_and(|b| eligible(b)))
    }
}

/// An endless smooth weighted sequence of indices `0..weights.len()`.
///
/// Shared by the round robin balancer and by weighted route splits.
pub struct SmoothTable {
    cursor: AtomicUsize,
    kind: TableKind,
}

enum TableKind {
    Empty,
    Precomputed(Box<[u32]>),
    Live(Mutex<LiveState>),
}

struct LiveState {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl LiveState {
    /// One step of smooth weighted round robin: every entry gains its weight,
    /// the largest is chosen and loses the total.
    fn step(&mut self) -> usize {
        let mut best = 0;
        for i in 0..self.current.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        best
    }
}

impl SmoothTable {
    /// A table for these weights; a weight of 0 is treated as 1.
    pub fn new(weights: &[u32]) -> Self {
        let kind = if weights.is_empty() {
            TableKind::Empty
        } else {
            let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
            let divisor = weights.iter().copied().fold(0, gcd);
            let reduced: Vec<i64> = weights.iter().map(|&w| (w / divisor) as i64).collect();
            let total: i64 = reduced.iter().sum();
            let mut live = LiveState {
                current: vec![0; reduced.len()],
                weights: reduced,
                total,
            };
            if total as u64 <= MAX_TABLE {
                let table: Box<[u32]> = (0..total).map(|_| live.step() as u32).collect();
                TableKind::Precomputed(table)
            } else {
                TableKind::Live(Mutex::new(live))
            }
        };
        SmoothTable {
            cursor: AtomicUsize::new(0),
            kind,
        }
    }

    /// The next index in the sequence.
    pub fn next(&self) -> Option<usize> {
        self.next_where(|_| true)
    }

    /// The next index in the sequence for which `accept` holds, skipping the
    /// others; `None` when no index is accepted.
    pub fn next_where(&self, accept: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.kind {
            TableKind::Empty => None,
            TableKind::Precomputed(table) => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                let len = table.len();
                let first = table[start % len] as usize;
                if accept(first) {
                    return Some(first);
                }
                // Walk on from here: one full cycle visits every index.
                (1..len)
                    .map(|step| table[(start + step) % len] as usize)
                    .find(|&i| accept(i))
            }
            TableKind::Live(state) => {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                let len = state.total as usize;
                (0..len).map(|_| state.step()).find(|&i| accept(i))
            }
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle(weights: &[u32], picks: usize) -> Vec<usize> {
        let table = SmoothTable::new(weights);
        (0..picks).filter_map(|_| table.next()).collect()
    }

    #[test]
    fn smooth_sequence_interleaves_the_heavy_backend() {
        assert_eq!(cycle(&[5, 1, 1], 7), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(cycle(&[3, 1, 1, 1], 6), vec![0, 1, 0, 2, 3, 0]);
    }

    #[test]
    fn equal_weights_rotate_in_order() {
        assert_eq!(cycle(&[2, 2, 2], 6), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn every_cycle_gives_each_index_its_weight() {
        let weights = [4, 1, 3, 2];
        let picks = cycle(&weights, 10 * 3);
        for chunk in picks.chunks(10) {
            for (i, &w) in weights.iter().enumerate() {
                assert_eq!(chunk.iter().filter(|&&p| p == i).count(), w as usize);
            }
        }
    }

    #[test]
    fn rejected_indices_are_skipped_and_none_when_all_rejected() {
        let table = SmoothTable::new(&[1, 1, 1]);
        for _ in 0..10 {
            assert_ne!(table.next_where(|i| i != 1), Some(1));
        }
        assert_eq!(table.next_where(|_| false), None);
    }

    proptest::proptest! {
        /// Every full cycle gives each backend exactly its weight, and a
        /// weight-1 backend is never picked twice in a row while others
        /// exist (across cycle boundaries too).
        #[test]
        fn each_cycle_gives_exact_shares_and_no_weight_one_repeats(
            weights in proptest::collection::vec(1u32..12, 1..9),
        ) {
            let total: usize = weights.iter().map(|&w| w as usize).sum();
            let picks = cycle(&weights, total * 3);
            for chunk in picks.chunks(total) {
                for (i, &w) in weights.iter().enumerate() {
                    proptest::prop_assert_eq!(chunk.iter().filter(|&&p| p == i).count(), w as usize);
                }
            }
            if weights.len() > 1 {
                for pair in picks.windows(2) {
                    let repeated = pair[0] == pair[1] && weights[pair[0]] == 1;
                    proptest::prop_assert!(!repeated, "weight-1 backend {} twice in a row", pair[0]);
                }
            }
        }
    }

    #[test]
    fn huge_weight_sums_use_the_live_sequence_with_the_same_shares() {
        let weights = [70_000, 1, 70_001];
        let table = SmoothTable::new(&weights);
        assert!(matches!(table.kind, TableKind::Live(_)));
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        let mut counts = [0usize; 3];
        for _ in 0..total {
            counts[table.next().expect("non-empty")] += 1;
        }
        assert_eq!(counts, [70_000, 1, 70_001]);
    }
}
