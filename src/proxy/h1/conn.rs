//! State shared by the connection task and the [`RequestBody`] of the request
//! in progress, plus the thread-local pool the read and write buffers come from.
//!
//! The transport lives here, behind one `std::sync::Mutex` that is only held
//! for the duration of a single `poll_*` call (never across an `.await`), so
//! the handler can read the request body while the connection task writes the
//! response: full duplex without `tokio::io::split`'s extra allocation, and
//! with `poll_read_ready` still reachable for the idle wait.
//!
//! [`RequestBody`]: super::RequestBody

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use bytes::BytesMut;

use super::body::Decoder;
use super::Transport;

/// What the connection task and the request body share.
pub(crate) type Shared = Arc<Mutex<Conn>>;

pub(crate) use crate::proxy::buffers::BUF_INIT;

/// The interim response written for `Expect: 100-continue`.
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Where the `100 Continue` interim response stands for the current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Continue {
    /// The client did not ask for one.
    NotExpected,
    /// Asked for; written when the body is first polled.
    Pending,
    /// Partly written: this many bytes of [`CONTINUE`] are out.
    Writing(usize),
    /// Fully written.
    Sent,
    /// Not sent because the final response started first.
    Skipped,
}

pub(crate) struct Conn {
    /// `None` once the connection task has finished or handed it to an upgrade.
    pub io: Option<Box<dyn Transport>>,
    /// Bytes read but not consumed yet. Capacity 0 (no heap) while idle.
    pub rbuf: BytesMut,
    /// Counts requests on this connection, so a `RequestBody` kept past its
    /// request can tell it is stale.
    pub seq: u64,
    /// Decoder of the current request's body.
    pub body: Decoder,
    /// A `RequestBody` handle for the current request is alive.
    pub body_alive: bool,
    /// The connection task, waiting for the body to finish or be dropped.
    pub conn_waker: Option<Waker>,
    pub cont: Continue,
    /// The first byte of the final response has been written.
    pub response_started: bool,
    /// Limits for chunked trailers (the head limits reused).
    pub max_trailer_bytes: usize,
    pub max_trailers: usize,
}

impl Conn {
    pub(crate) fn new(
        io: Box<dyn Transport>,
        max_trailer_bytes: usize,
        max_trailers: usize,
    ) -> Self {
        Conn {
            io: Some(io),
            rbuf: BytesMut::new(),
            seq: 0,
            body: Decoder::Done,
            body_alive: false,
            conn_waker: None,
            cont: Continue::NotExpected,
            response_started: false,
            max_trailer_bytes,
            max_trailers,
        }
    }

    pub(crate) fn io(&mut self) -> io::Result<Pin<&mut (dyn Transport + 'static)>> {
        match self.io.as_mut() {
            Some(io) => Ok(Pin::new(&mut **io)),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection already closed",
            )),
        }
    }

    /// Reads more bytes into `rbuf`, making room for at least `want` if
    /// it is nearly full. Ready(Ok(0)) means end of stream.
    pub(crate) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < 512 {
            if self.rbuf.capacity() == 0 && self.rbuf.is_empty() {
                self.rbuf = take_buf();
            }
            self.rbuf.reserve(want);
        }
        let Conn { io, rbuf, .. } = self;
        match io.as_mut() {
            Some(io) => tokio_util::io::poll_read_buf(Pin::new(&mut **io), cx, rbuf),
            None => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection already closed",
            ))),
        }
    }

    /// Writes the rest of `100 Continue` if it is pending and the final
    /// response has not started. Called by the body on its first poll.
    pub(crate) fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let written = match self.cont {
                Continue::Pending if self.response_started => {
                    self.cont = Continue::Skipped;
                    return Poll::Ready(Ok(()));
                }
                Continue::Pending => 0,
                Continue::Writing(n) => n,
                _ => return Poll::Ready(Ok(())),
            };
            let n = ready!(self.io()?.poll_write(cx, &CONTINUE[written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.cont = if written + n == CONTINUE.len() {
                Continue::Sent
            } else {
                Continue::Writing(written + n)
            };
        }
    }

    /// Called under the lock before the final response's first write: an
    /// interim response already on its way is completed, one not begun is
    /// dropped (RFC 9110 section 10.1.1 lets a server skip it).
    pub(crate) fn poll_start_response(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.response_started {
            return Poll::Ready(Ok(()));
        }
        if let Continue::Writing(_) = self.cont {
            ready!(self.poll_continue(cx))?;
        } else if self.cont == Continue::Pending {
            self.cont = Continue::Skipped;
        }
        self.response_started = true;
        Poll::Ready(Ok(()))
    }

    /// Wakes the connection task if it waits on the body.
    pub(crate) fn wake_conn(&mut self) {
        if let Some(w) = self.conn_waker.take() {
            w.wake();
        }
    }
}

/// Locks the shared state. A poisoned lock means a panic elsewhere while it
/// was held; the state is plain data, so carry on with it.
pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, Conn> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
pub(crate) use crate::proxy::buffers::pooled;
pub(crate) use crate::proxy::buffers::{give as give_buf, take as take_buf};
