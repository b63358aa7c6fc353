//! A request body arriving in DATA frames, and the state a stream shares
//! between the connection task and the request's handler.
//!
//! The connection pushes each DATA frame's bytes and the trailers; the body
//! hands them to whoever reads it (the upstream client, in the handler's
//! future or in a task of its own) and counts what was taken, so the
//! connection can open the client's flow-control window by that much.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::proxy::error::BoxError;

/// What the connection and the streams of one connection share.
#[derive(Default)]
pub(super) struct ConnShared {
    /// Set when a stream's body released bytes the connection should
    /// acknowledge with WINDOW_UPDATE.
    pub released: AtomicBool,
    /// The connection task, woken when bytes are released from another task.
    pub waker: AtomicWaker,
}

/// One stream's state shared with its handler.
pub(super) struct StreamShared {
    conn: Arc<ConnShared>,
    /// Set when the client reset the stream (or the connection ended): the
    /// handler's future is dropped at its next poll.
    cancelled: AtomicBool,
    /// The handler's future, woken on cancel.
    task: AtomicWaker,
    recv: Mutex<Recv>,
}

/// Wakes the body's reader, after letting go of the lock.
fn wake_reader(mut recv: MutexGuard<'_, Recv>) {
    let reader = recv.reader.take();
    drop(recv);
    if let Some(w) = reader {
        w.wake();
    }
}

#[derive(Default)]
struct Recv {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// The client sent END_STREAM.
    ended: bool,
    error: Option<&'static str>,
    /// The body was dropped: what arrives is released at once.
    dropped: bool,
    /// Bytes taken (or discarded) and not yet acknowledged.
    released: usize,
    /// Bytes left to read per the request's Content-Length.
    remaining: Option<u64>,
    reader: Option<Waker>,
}

impl Recv {
    /// Drops what is buffered, counting it as released, and releases what
    /// arrives from now on at once.
    fn discard(&mut self) {
        let buffered: usize = self.chunks.iter().map(Bytes::len).sum();
        self.chunks.clear();
        self.released += buffered;
        self.dropped = true;
    }
}

impl StreamShared {
    pub fn new(conn: Arc<ConnShared>) -> Arc<Self> {
        Arc::new(StreamShared {
            conn,
            cancelled: AtomicBool::new(false),
            task: AtomicWaker::new(),
            recv: Mutex::new(Recv::default()),
        })
    }

    fn recv(&self) -> MutexGuard<'_, Recv> {
        self.recv.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the handler should stop; registers `cx` to hear of it.
    pub fn poll_cancelled(&self, cx: &Context<'_>) -> bool {
        if self.cancelled.load(Ordering::Acquire) {
            return true;
        }
        self.task.register(cx.waker());
        self.cancelled.load(Ordering::Acquire)
    }

    /// Stops the handler and fails its body.
    pub fn cancel(&self, why: &'static str) {
        self.cancelled.store(true, Ordering::Release);
        self.task.wake();
        self.fail(why);
    }

    /// Appends a DATA frame's bytes; when the body is gone they are
    /// released at once.
    pub fn push(&self, data: Bytes) {
        let mut recv = self.recv();
        if recv.dropped || recv.error.is_some() {
            recv.released += data.len();
            drop(recv);
            self.conn.released.store(true, Ordering::Release);
            return;
        }
        if !data.is_empty() {
            recv.chunks.push_back(data);
        }
        wake_reader(recv);
    }

    /// The client ended the body, with `trailers` if it sent some.
    pub fn end(&self, trailers: Option<HeaderMap>) {
        let mut recv = self.recv();
        recv.ended = true;
        recv.trailers = trailers;
        wake_reader(recv);
    }

    /// The body cannot complete (reset, broken framing, connection gone).
    pub fn fail(&self, why: &'static str) {
        let mut recv = self.recv();
        if recv.ended && recv.chunks.is_empty() && recv.trailers.is_none() {
            return;
        }
        recv.error.get_or_insert(why);
        wake_reader(recv);
    }

    /// Takes the bytes released since the last call, counting what is
    /// still buffered as released when `discard` (the stream is closing).
    pub fn take_released(&self, discard: bool) -> usize {
        let mut recv = self.recv();
        if discard {
            recv.discard();
        }
        std::mem::take(&mut recv.released)
    }
}

/// A downstream HTTP/2 request body.
pub struct RequestBody {
    shared: Option<Arc<StreamShared>>,
    /// Content-Length, for the size hint.
    length: Option<u64>,
}

impl RequestBody {
    /// A request that came with END_STREAM on its HEADERS.
    pub(super) fn empty() -> Self {
        RequestBody {
            shared: None,
            length: Some(0),
        }
    }

    pub(super) fn streaming(shared: Arc<StreamShared>, length: Option<u64>) -> Self {
        shared.recv().remaining = length;
        RequestBody {
            shared: Some(shared),
            length,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(shared) = self.shared.as_ref() else {
            return Poll::Ready(None);
        };
        let mut recv = shared.recv();
        if let Some(chunk) = recv.chunks.pop_front() {
            recv.released += chunk.len();
            if let Some(left) = recv.remaining.as_mut() {
                *left = left.saturating_sub(chunk.len() as u64);
            }
            drop(recv);
            shared.conn.released.store(true, Ordering::Release);
            shared.conn.waker.wake();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(why) = recv.error {
            return Poll::Ready(Some(Err(why.into())));
        }
        if recv.ended {
            return Poll::Ready(recv.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        match &recv.reader {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => recv.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.shared {
            None => true,
            Some(shared) => {
                let recv = shared.recv();
                recv.ended && recv.chunks.is_empty() && recv.trailers.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.shared, self.length) {
            (None, _) => SizeHint::with_exact(0),
            (Some(shared), Some(_)) => {
                let left = shared.recv().remaining.unwrap_or(0);
                SizeHint::with_exact(left)
            }
            (Some(_), None) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let mut recv = shared.recv();
            recv.discard();
            recv.reader = None;
            drop(recv);
            shared.conn.released.store(true, Ordering::Release);
            shared.conn.waker.wake();
        }
    }
}
