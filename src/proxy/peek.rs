//! Looking at what a client sent first without consuming it.
//!
//! The PROXY protocol reader and the TLS ClientHello reader (for SNI
//! routing of passthrough connections) both need the same loop: peek at the bytes queued on
//! the socket, ask a parser whether it can decide, and otherwise wait for
//! more. `peek` leaves the socket readable, so waiting on readiness alone
//! would spin; between peeks that saw no new byte the loop sleeps 1 ms,
//! doubling up to 16 ms while the peer sends nothing, which keeps a message
//! arriving in pieces quick to read and bounds what a stalled peer costs.

use std::io;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

const BACKOFF_MIN: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(16);

/// A parser's verdict on the bytes seen so far.
pub enum Look<T> {
    /// Decided.
    Done(T),
    /// Everything so far is a valid prefix; more bytes are needed.
    More,
}

/// Why no verdict was reached.
#[derive(Debug)]
pub enum PeekError<E> {
    /// The parser rejected the bytes.
    Rejected(E),
    /// `timeout` passed without a verdict.
    Timeout,
    /// The peer closed before a verdict.
    Closed,
    /// `max` bytes were not enough to decide.
    TooLarge,
    Io(io::Error),
}

/// Peeks at `stream` until `decide` returns a verdict, within `timeout`,
/// looking at no more than `max` bytes. Nothing is consumed.
pub async fn peek_until<T, E>(
    stream: &TcpStream,
    timeout: Duration,
    max: usize,
    decide: impl FnMut(&[u8]) -> Result<Look<T>, E>,
) -> Result<T, PeekError<E>> {
    tokio::time::timeout(timeout, peek_loop(stream, max, decide))
        .await
        .unwrap_or(Err(PeekError::Timeout))
}

async fn peek_loop<T, E>(
    stream: &TcpStream,
    max: usize,
    mut decide: impl FnMut(&[u8]) -> Result<Look<T>, E>,
) -> Result<T, PeekError<E>> {
    let mut buf = vec![0u8; max];
    let mut seen = 0usize;
    let mut backoff = BACKOFF_MIN;
    loop {
        // Readiness first, then peek: once the peer's FIN has been seen,
        // every byte it sent before it is already in the receive buffer.
        let ready = stream
            .ready(Interest::READABLE)
            .await
            .map_err(PeekError::Io)?;
        let n = stream.peek(&mut buf).await.map_err(PeekError::Io)?;
        match decide(&buf[..n]).map_err(PeekError::Rejected)? {
            Look::Done(verdict) => return Ok(verdict),
            Look::More if n == buf.len() => return Err(PeekError::TooLarge),
            Look::More if n == 0 || ready.is_read_closed() => return Err(PeekError::Closed),
            Look::More => {}
        }
        if n > seen {
            seen = n;
            backoff = BACKOFF_MIN;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}
