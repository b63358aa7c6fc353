//! A per-thread pool of I/O buffers.
//!
//! Connections take a buffer only while bytes are moving and give it back
//! when they go idle, so an idle connection holds no buffer and a busy one
//! does not allocate for every read.

use std::cell::RefCell;

use bytes::BytesMut;

/// Size a pooled buffer starts with; request heads and small bodies fit in
/// one read.
pub const BUF_INIT: usize = 8 * 1024;
/// Pooled buffers larger than this are freed instead of kept.
pub const POOL_MAX_CAPACITY: usize = 32 * 1024;
/// Buffers kept per thread and size; beyond that they are freed.
const POOL_MAX_BUFFERS: usize = 32;

/// Size of the large buffers, kept apart from the rest: room for a
/// response head and a 16 KiB body chunk in one read.
pub const BUF_LARGE: usize = 17 * 1024;

/// One thread's free buffers, by size.
struct Pool {
    small: Vec<BytesMut>,
    large: Vec<BytesMut>,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            small: Vec::new(),
            large: Vec::new(),
        })
    };
}

/// Pops a free buffer from this thread's pool.
fn pop(large: bool) -> Option<BytesMut> {
    POOL.try_with(|p| {
        let mut p = p.try_borrow_mut().ok()?;
        if large {
            p.large.pop()
        } else {
            p.small.pop()
        }
    })
    .ok()
    .flatten()
}

/// A buffer with at least [`BUF_INIT`] bytes of capacity, from this thread's
/// pool when it has one.
pub fn take() -> BytesMut {
    pop(false).unwrap_or_else(|| BytesMut::with_capacity(BUF_INIT))
}

/// A buffer with at least `n` bytes of capacity, from this thread's pool
/// when it has one that large. Growing a smaller buffer instead would copy
/// its whole old allocation (`realloc` cannot know it is unused).
pub fn take_at_least(n: usize) -> BytesMut {
    if n <= BUF_INIT {
        return take();
    }
    match pop(true) {
        Some(buf) if buf.capacity() >= n => buf,
        other => {
            if let Some(buf) = other {
                give(buf);
            }
            BytesMut::with_capacity(n.max(BUF_LARGE))
        }
    }
}

/// Returns a buffer to this thread's pool, or frees it. A buffer still
/// shared with live `Bytes` (a request head, a body chunk) is kept only
/// for the room left past them, if that is enough for a read; otherwise it
/// is dropped, and its memory goes when the last `Bytes` does.
pub fn give(mut buf: BytesMut) {
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    // Reclaiming asks for a size: a buffer that was split is reclaimed to
    // just that much past where it was cut, or, when that does not fit, to
    // its whole allocation. Asking for the large size first keeps a large
    // buffer large.
    let large = buf.try_reclaim(BUF_LARGE);
    if !large && !buf.try_reclaim(BUF_INIT) || buf.capacity() > POOL_MAX_CAPACITY {
        return;
    }
    let _ = POOL.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            let list = if large { &mut p.large } else { &mut p.small };
            if list.len() < POOL_MAX_BUFFERS {
                list.push(buf);
            }
        }
    });
}

/// Buffers in this thread's pool.
#[cfg(test)]
pub(crate) fn pooled() -> usize {
    POOL.with(|p| {
        let p = p.borrow();
        p.small.len() + p.large.len()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large buffer whose bytes were split off and sent on comes back
    /// whole, so the next large read neither allocates nor grows.
    #[test]
    fn a_split_large_buffer_returns_whole() {
        let mut buf = take_at_least(BUF_LARGE);
        let start = buf.as_ptr();
        buf.extend_from_slice(&[7u8; 300]);
        let head = buf.split_to(100).freeze();
        let body = buf.split_to(200).freeze();
        drop((head, body));
        give(buf);
        let again = take_at_least(BUF_LARGE);
        assert_eq!(
            again.as_ptr(),
            start,
            "the pooled allocation was not reused"
        );
        assert!(again.capacity() >= BUF_LARGE, "{}", again.capacity());
    }

    /// A buffer still shared with live bytes and with little room left
    /// past them is freed, not pooled.
    #[test]
    fn a_shared_full_buffer_is_not_pooled() {
        let mut buf = take();
        let fill = buf.capacity() - 100;
        buf.extend_from_slice(&vec![1u8; fill]);
        let kept = buf.split_to(fill).freeze();
        let before = pooled();
        give(buf);
        assert_eq!(pooled(), before);
        assert_eq!(kept.len(), fill);
    }

    /// Small and large buffers are kept apart: a small one is never handed
    /// out for a large read, and a large read does not take it away from
    /// the small reads.
    #[test]
    fn sizes_are_kept_apart() {
        let small = take();
        let small_ptr = small.as_ptr();
        assert!(small.capacity() >= BUF_INIT);
        give(small);
        let large = take_at_least(BUF_LARGE);
        assert_ne!(large.as_ptr(), small_ptr);
        assert!(large.capacity() >= BUF_LARGE);
        assert_eq!(take().as_ptr(), small_ptr, "the small buffer left the pool");
        give(large);
        assert_eq!(take_at_least(BUF_INIT + 1).capacity(), BUF_LARGE);
    }
}
