//! Balancers: which backend of an upstream takes the next request or session.
//!
//! One trait, one file per algorithm. A balancer knows nothing about HTTP:
//! the caller hashes whatever key it wants and passes a `u64`. It is built
//! once per snapshot from the upstream's full backend list (so positions do
//! not move while a backend is merely down), skips ineligible backends
//! itself, and returns `None` only when none is eligible.

mod consistent_hash;
mod least_conn;
mod p2c;
mod random;
mod round_robin;
mod sample;
#[cfg(test)]
mod tests;

pub use consistent_hash::{hash_key, ConsistentHash};
pub use least_conn::LeastConn;
pub use p2c::P2c;
pub use random::Random;
pub use round_robin::{RoundRobin, SmoothTable};

use std::sync::atomic::AtomicUsize;
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

/// Builds the balancer `kind` for backends with these weights and
/// addresses (both in the order the snapshot keeps the backends). The
/// addresses are the consistent-hash ring keys; `seed` fixes the random
/// draws of the balancers that make them; `total_in_flight` is the
/// upstream's own in-flight count, which bounded load reads.
pub fn build(
    kind: BalancerKind,
    weights: &[u32],
    addresses: &[&str],
    seed: u64,
    total_in_flight: Option<Arc<AtomicUsize>>,
) -> Box<dyn Balancer> {
    match kind {
        BalancerKind::RoundRobin => Box::new(RoundRobin::new(weights)),
        BalancerKind::LeastConn => Box::new(LeastConn::new(weights, seed)),
        BalancerKind::P2c => Box::new(P2c::new(weights, seed)),
        BalancerKind::ConsistentHash {
            vnodes,
            bounded_load,
        } => {
            let ring = ConsistentHash::new(addresses, weights, vnodes, bounded_load, seed);
            match total_in_flight {
                Some(total) => Box::new(ring.with_total_in_flight(total)),
                None => Box::new(ring),
            }
        }
        BalancerKind::Random => Box::new(Random::new(weights, seed)),
    }
}
