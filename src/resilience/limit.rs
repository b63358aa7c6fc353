//! Bounded in-flight limits that shed load instead of queueing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// At most `max` permits at once; `max == 0` means unlimited.
pub struct InFlightLimit {
    max: usize,
    current: Arc<AtomicUsize>,
}

/// One admitted request; dropping it frees its slot.
pub struct InFlightPermit {
    current: Arc<AtomicUsize>,
}

impl InFlightLimit {
    /// A limit of `max` (0 = unlimited).
    pub fn new(max: usize) -> Self {
        InFlightLimit {
            max,
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A limit of `max` counting on `current`, the counter of the limit it
    /// replaces: permits out under the old one still count.
    pub fn sharing(max: usize, current: Arc<AtomicUsize>) -> Self {
        InFlightLimit { max, current }
    }

    /// A permit, or `None` when `max` are already out (the caller answers
    /// 503 at once; nothing waits).
    pub fn try_acquire(&self) -> Option<InFlightPermit> {
        let prev = self.current.fetch_add(1, Ordering::AcqRel);
        if self.max != 0 && prev >= self.max {
            self.current.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlightPermit {
            current: Arc::clone(&self.current),
        })
    }

    /// The live count of permits out, for readers such as bounded load.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.current)
    }

    /// Permits currently out.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.current.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excess_is_refused_and_freed_slots_are_reused() {
        let limit = InFlightLimit::new(2);
        let a = limit.try_acquire().expect("first");
        let _b = limit.try_acquire().expect("second");
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.current(), 2);
        drop(a);
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn zero_means_unlimited() {
        let limit = InFlightLimit::new(0);
        let permits: Vec<_> = (0..1000).filter_map(|_| limit.try_acquire()).collect();
        assert_eq!(permits.len(), 1000);
    }
}
