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
/// Buffers kept per thread; beyond that they are freed.
const POOL_MAX_BUFFERS: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with at least [`BUF_INIT`] bytes of capacity, from this thread's
/// pool when it has one.
pub fn take() -> BytesMut {
    POOL.try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(BUF_INIT))
}

/// Returns a buffer to this thread's pool, or frees it. Buffers still shared
/// with live `Bytes` (a request head, a body chunk) cannot be reclaimed and
/// are simply dropped; their memory goes when the last `Bytes` does.
pub fn give(mut buf: BytesMut) {
    if buf.capacity() == 0 {
        return;
    }
    buf.clear();
    if !buf.try_reclaim(BUF_INIT) || buf.capacity() > POOL_MAX_CAPACITY {
        return;
    }
    let _ = POOL.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < POOL_MAX_BUFFERS {
                p.push(buf);
            }
        }
    });
}

/// Buffers in this thread's pool.
#[cfg(test)]
pub(crate) fn pooled() -> usize {
    POOL.with(|p| p.borrow().len())
}
