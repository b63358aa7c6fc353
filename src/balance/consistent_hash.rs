//! Consistent hashing on a ring of virtual nodes, with optional bounded
//! load.
//!
//! # Hash
//!
//! Ring points and request keys use one named, stable 64-bit hash:
//! **FNV-1a 64** (offset basis `0xcbf29ce484222325`, prime
//! `0x100000001b3`) over the bytes, followed by the **SplitMix64 finalizer**
//! (shifts 30/27/31, multipliers `0xbf58476d1ce4e5b9`, `0x94d049bb133111eb`)
//! so that inputs differing only in their last bytes (`"…-1"`, `"…-2"`)
//! land far apart. It has no per-process seed: two Sluice processes with the
//! same config build the same ring, so replicas agree on every key. Changing
//! it remaps users; the golden test pins it.
//!
//! # Ring
//!
//! A backend of weight `w` gets `vnodes * w` points, point `v` being the
//! hash of `"{address}-{v}"`. The ring holds at most [`MAX_RING_POINTS`]:
//! for very large upstreams `vnodes` is lowered to fit, which drops only
//! each backend's highest-numbered points. Points depend only on the set of addresses,
//! and equal points are ordered by address, so the ring does not depend on
//! the order of backends in the file. The ring is a sorted
//! `Vec<(point, backend index)>` built once per snapshot from the full
//! backend list (a down backend keeps its points); a lookup is a binary
//! search.
//!
//! # Pick
//!
//! `pick(Some(key))` mixes the key with the SplitMix64 finalizer (a
//! bijection, so callers may pass any `u64`, raw or from [`hash_key`]) and
//! walks clockwise from it, skipping ineligible backends. `pick(None)`
//! starts from a random point instead, which spreads keyless calls in
//! proportion to the ring shares.
//!
//! # Bounded load
//!
//! With a balance factor `c > 0` (Mirrokni, Thorup, Zadimoghaddam 2017;
//! HAProxy's `hash-balance-factor`), a backend is full when
//! `in_flight + 1 > ceil(c * (total_in_flight + 1) / eligible_count)` and the
//! walk spills to the next distinct backend on the ring. An upstream hands
//! the ring its own in-flight total ([`ConsistentHash::with_total_in_flight`],
//! which already counts the request being placed), so a pick reads one
//! counter and stays O(log n), taking every backend as eligible for the mean;
//! without it the pick sums every backend's in-flight count, O(n). When every eligible
//! backend is full (possible only with `c < 1`) the first eligible one on
//! the walk is used. `c = 0` turns it off.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::sample::SharedRng;
use super::Balancer;
use crate::upstream::backend::BackendState;

/// Most points a ring holds (16 bytes each).
pub const MAX_RING_POINTS: u64 = 1 << 20;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The ring hash of `bytes`: FNV-1a 64 then the SplitMix64 finalizer.
/// Stable across processes, platforms and releases.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(bytes);
    h.finish()
}

/// Streaming form of [`hash_key`], so ring points need no allocation.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(FNV_OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    fn finish(&self) -> u64 {
        mix64(self.0)
    }
}

/// The SplitMix64 finalizer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The ring point of virtual node `vnode` of the backend at `address`:
/// the hash of `"{address}-{vnode}"`.
fn vnode_point(address: &str, vnode: u64) -> u64 {
    let mut h = Fnv1a::new();
    h.write(address.as_bytes());
    h.write(b"-");
    h.write(itoa::Buffer::new().format(vnode).as_bytes());
    h.finish()
}

/// A ring of virtual nodes; the same key goes to the same backend while it
/// is eligible (and, with bounded load, not full).
pub struct ConsistentHash {
    /// Sorted by point, then by address.
    ring: Box<[(u64, u32)]>,
    /// `index[j]` is the first ring position whose point has `j` as its top
    /// `index_bits` bits (`index[2^bits]` = ring length), so a lookup binary
    /// searches one small bucket instead of the whole ring: a few cache
    /// lines even for a ring of a million points.
    index: Box<[u32]>,
    index_bits: u32,
    /// Backends with points on the ring.
    backend_count: usize,
    /// The balance factor `c`; bounded load is on when it is above 0.
    bounded_load: f64,
    /// The upstream's requests in flight, including the one being placed.
    total_in_flight: Option<Arc<AtomicUsize>>,
    rng: SharedRng,
}

impl ConsistentHash {
    /// A ring over `addresses` (the backend keys, in the order the snapshot
    /// keeps the backends) with `vnodes` points per unit of weight (0 counts
    /// as 1, as does a weight of 0 or a missing weight). `bounded_load` is
    /// the balance factor `c` (0 = off); `seed` fixes the starting points of
    /// keyless picks.
    pub fn new(
        addresses: &[&str],
        weights: &[u32],
        vnodes: u32,
        bounded_load: f64,
        seed: u64,
    ) -> Self {
        let total_weight: u64 = (0..addresses.len())
            .map(|i| u64::from(weights.get(i).copied().unwrap_or(1).max(1)))
            .sum();
        let vnodes = u64::from(vnodes.max(1)).min((MAX_RING_POINTS / total_weight.max(1)).max(1));
        let mut ring = Vec::new();
        for (i, address) in addresses.iter().enumerate() {
            let Ok(index) = u32::try_from(i) else { break };
            let weight = u64::from(weights.get(i).copied().unwrap_or(1).max(1));
            ring.extend((0..vnodes * weight).map(|v| (vnode_point(address, v), index)));
        }
        // Order equal points by address, not by position in the file.
        ring.sort_unstable_by(|a, b| {
            let addr = |i: u32| addresses.get(i as usize).copied().unwrap_or_default();
            (a.0, addr(a.1), a.1).cmp(&(b.0, addr(b.1), b.1))
        });
        let (index, index_bits) = bucket_index(&ring);
        ConsistentHash {
            ring: ring.into_boxed_slice(),
            index,
            index_bits,
            backend_count: addresses.len().min(u32::MAX as usize),
            bounded_load,
            total_in_flight: None,
            rng: SharedRng::new(seed),
        }
    }

    /// Bounded load reads the upstream's in-flight total from `total` (which
    /// counts the request being placed) instead of summing the backends.
    pub fn with_total_in_flight(mut self, total: Arc<AtomicUsize>) -> Self {
        self.total_in_flight = Some(total);
        self
    }

    /// The first ring position whose point is at least `point` (the ring
    /// length when there is none: the walk wraps to the start).
    pub(crate) fn position(&self, point: u64) -> usize {
        let bucket = (point >> (64 - self.index_bits)) as usize;
        let (lo, hi) = match (self.index.get(bucket), self.index.get(bucket + 1)) {
            (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
            _ => (0, self.ring.len()),
        };
        lo + self.ring[lo..hi].partition_point(|&(p, _)| p < point)
    }

    /// The ring, sorted: `(point, backend index)`.
    pub fn points(&self) -> &[(u64, u32)] {
        &self.ring
    }

    /// The most in flight a backend may have before taking one more, or
    /// `None` when bounded load is off; `Err(())` when nothing is eligible.
    fn capacity(
        &self,
        backends: &[Arc<BackendState>],
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Result<Option<f64>, ()> {
        if self.bounded_load.is_nan() || self.bounded_load <= 0.0 {
            return Ok(None);
        }
        if let Some(total) = &self.total_in_flight {
            let total = total.load(Ordering::Relaxed).max(1);
            let count = backends.len().max(1);
            return Ok(Some(
                (self.bounded_load * total as f64 / count as f64).ceil(),
            ));
        }
        let (total, count) = backends
            .iter()
            .filter(|b| eligible(b))
            .fold((0usize, 0usize), |(t, c), b| (t + b.in_flight(), c + 1));
        if count == 0 {
            return Err(());
        }
        Ok(Some(
            (self.bounded_load * (total as f64 + 1.0) / count as f64).ceil(),
        ))
    }
}

impl Balancer for ConsistentHash {
    fn pick(
        &self,
        backends: &[Arc<BackendState>],
        key: Option<u64>,
        eligible: &dyn Fn(&BackendState) -> bool,
    ) -> Option<usize> {
        let Ok(capacity) = self.capacity(backends, eligible) else {
            return None;
        };
        let start = match key {
            Some(key) => mix64(key),
            None => self.rng.next_u64(),
        };
        let len = self.ring.len();
        let from = self.position(start);
        // Allocated on the first rejected backend only: the common pick
        // takes the first point it meets.
        let mut visited: Option<Vec<bool>> = None;
        let mut seen = 0;
        let mut first_full = None;
        for step in 0..len {
            let i = self.ring[(from + step) % len].1 as usize;
            if visited.as_ref().is_some_and(|v| v[i]) {
                continue;
            }
            if let Some(b) = backends.get(i) {
                if eligible(b) {
                    match capacity {
                        Some(cap) if (b.in_flight() + 1) as f64 > cap => {
                            first_full.get_or_insert(i);
                        }
                        _ => return Some(i),
                    }
                }
            }
            visited.get_or_insert_with(|| vec![false; self.backend_count])[i] = true;
            seen += 1;
            if seen == self.backend_count {
                break;
            }
        }
        // Every backend on the ring is full or ineligible; backends beyond
        // the ring (a caller passing more than it built with) come last.
        first_full.or_else(|| backends.iter().position(|b| eligible(b)))
    }
}

/// Builds the bucket index of a sorted ring: about one bucket per point, at
/// least 16 and at most 2^16 buckets.
fn bucket_index(ring: &[(u64, u32)]) -> (Box<[u32]>, u32) {
    let bits = (usize::BITS - ring.len().leading_zeros()).clamp(4, 16);
    let buckets = 1usize << bits;
    let mut index = Vec::with_capacity(buckets + 1);
    let mut pos = 0usize;
    for j in 0..buckets {
        let floor = (j as u64) << (64 - bits);
        while pos < ring.len() && ring[pos].0 < floor {
            pos += 1;
        }
        index.push(pos as u32);
    }
    index.push(ring.len() as u32);
    (index.into_boxed_slice(), bits)
}
