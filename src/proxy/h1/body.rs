//! The request body: [`RequestBody`] streams it from the connection, and
//! [`Decoder`] undoes its framing (Content-Length or strict chunked,
//! RFC 9112 sections 6 and 7). The connection task drives the same decoder
//! to drain a body the handler left unread.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use super::conn::{lock, Conn, Shared};

/// How much room a body read asks for; also bounds each data frame.
const BODY_READ: usize = 16 * 1024;
/// Longest chunk extension accepted on one chunk-size line.
const MAX_CHUNK_EXT: usize = 1024;
/// Hex digits accepted in a chunk size (leading zeros included): 16 fit a u64.
const MAX_CHUNK_DIGITS: u8 = 16;

/// Why a request body could not be read to its end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    #[error("client connection failed while reading the request body")]
    Io(#[source] io::Error),
    #[error("client closed the connection before the request body ended")]
    Incomplete,
    #[error("invalid chunked encoding: {0}")]
    InvalidChunk(&'static str),
    #[error("request trailers too large")]
    TrailersTooLarge,
    #[error("request body abandoned: the connection was closed")]
    Aborted,
}

/// Decoding state of the current request body.
#[derive(Debug)]
pub(crate) enum Decoder {
    Length {
        remaining: u64,
    },
    Chunked(Chunk),
    /// The body ended; any further bytes belong to the next request.
    Done,
    /// The body failed; the connection cannot be reused.
    Failed,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Chunk {
    /// Reading the hex size.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size: only a chunk extension may follow.
    SizeBws {
        size: u64,
    },
    /// Inside a chunk extension, up to the CR.
    Ext {
        size: u64,
        len: usize,
    },
    /// After the CR of the size line.
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: the trailer section up to its empty line.
    Trailers,
}

impl Decoder {
    pub(crate) fn chunked() -> Self {
        Decoder::Chunked(Chunk::Size { size: 0, digits: 0 })
    }

    /// True once every byte of the body has been consumed.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length { remaining: 0 })
    }
}

impl Conn {
    /// Polls the next frame of the current request body.
    pub(crate) fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let res = ready!(self.poll_body_inner(cx));
        match &res {
            Some(Ok(_)) => {}
            None => self.body = Decoder::Done,
            Some(Err(_)) => self.body = Decoder::Failed,
        }
        Poll::Ready(res)
    }

    /// Reads more input for the body; end of stream is an error here.
    fn poll_body_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BodyError>> {
        match ready!(self.poll_fill(cx, BODY_READ)) {
            Ok(0) => Poll::Ready(Err(BodyError::Incomplete)),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                Poll::Ready(Err(BodyError::Aborted))
            }
            Err(e) => Poll::Ready(Err(BodyError::Io(e))),
        }
    }

    fn poll_body_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let chunk = match &mut self.body {
                Decoder::Done | Decoder::Length { remaining: 0 } => return Poll::Ready(None),
                Decoder::Failed => return Poll::Ready(Some(Err(BodyError::Aborted))),
                Decoder::Length { remaining } => {
                    let remaining = *remaining;
                    if self.rbuf.is_empty() {
                        if let Err(e) = ready!(self.poll_body_fill(cx)) {
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    let n = clamp(remaining, self.rbuf.len());
                    let data = self.rbuf.split_to(n).freeze();
                    self.body = Decoder::Length {
                        remaining: remaining - n as u64,
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Chunked(chunk) => *chunk,
            };
            if let Chunk::Data { remaining } = chunk {
                if self.rbuf.is_empty() {
                    if let Err(e) = ready!(self.poll_body_fill(cx)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                let n = clamp(remaining, self.rbuf.len());
                let data = self.rbuf.split_to(n).freeze();
                let left = remaining - n as u64;
                self.body = Decoder::Chunked(if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data { remaining: left }
                });
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if let Chunk::Trailers = chunk {
                return match ready!(self.poll_trailers(cx)) {
                    Ok(None) => Poll::Ready(None),
                    Ok(Some(t)) => {
                        self.body = Decoder::Done;
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    Err(e) => Poll::Ready(Some(Err(e))),
                };
            }
            if self.rbuf.is_empty() {
                if let Err(e) = ready!(self.poll_body_fill(cx)) {
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let (state, used) = match frame(chunk, &self.rbuf) {
                Ok(done) => done,
                Err(e) => return Poll::Ready(Some(Err(BodyError::InvalidChunk(e)))),
            };
            self.rbuf.advance(used);
            self.body = Decoder::Chunked(state);
        }
    }

    /// Parses the trailer section once it is complete in the buffer.
    /// `Ok(None)`: no trailers, the body is done.
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, BodyError>> {
        loop {
            if self.rbuf.len() >= 2 && &self.rbuf[..2] == b"\r\n" {
                self.rbuf.advance(2);
                self.body = Decoder::Done;
                return Poll::Ready(Ok(None));
            }
            if let Some(end) = find(&self.rbuf, b"\r\n\r\n") {
                let len = end + 4;
                if len > self.max_trailer_bytes {
                    return Poll::Ready(Err(BodyError::TrailersTooLarge));
                }
                let map = parse_trailers(&self.rbuf[..len], self.max_trailers)?;
                self.rbuf.advance(len);
                return Poll::Ready(Ok(Some(map)));
            }
            if self.rbuf.len() > self.max_trailer_bytes {
                return Poll::Ready(Err(BodyError::TrailersTooLarge));
            }
            ready!(self.poll_body_fill(cx))?;
        }
    }
}

/// Reads framing bytes (sizes, extensions, CRLFs) from `buf` from `state`
/// until chunk data or the trailer section begins, or `buf` runs out.
/// Returns the new state and the bytes used. One byte at a time: there
/// are few per chunk.
pub(crate) fn frame(mut state: Chunk, buf: &[u8]) -> Result<(Chunk, usize), &'static str> {
    let mut used = 0;
    for &b in buf {
        used += 1;
        state = step(state, b)?;
        if matches!(state, Chunk::Data { .. } | Chunk::Trailers) {
            break;
        }
    }
    Ok((state, used))
}

/// One framing byte of the chunked coding (sizes, extensions, CRLFs).
fn step(state: Chunk, b: u8) -> Result<Chunk, &'static str> {
    Ok(match state {
        Chunk::Size { size, digits } => match hex(b) {
            Some(d) => {
                if digits >= MAX_CHUNK_DIGITS {
                    return Err("chunk size too long");
                }
                Chunk::Size {
                    size: size.checked_mul(16).ok_or("chunk size overflows")? | u64::from(d),
                    digits: digits + 1,
                }
            }
            None if digits == 0 => return Err("chunk size is not hexadecimal"),
            None => after_size(size, b)?,
        },
        Chunk::SizeBws { size } => match b {
            b' ' | b'\t' => Chunk::SizeBws { size },
            b';' => Chunk::Ext { size, len: 1 },
            _ => return Err("whitespace after chunk size without an extension"),
        },
        Chunk::Ext { size, len } => match b {
            b'\r' => Chunk::SizeLf { size },
            b'\t' | b' '..=b'~' | 0x80..=0xff if len < MAX_CHUNK_EXT => {
                Chunk::Ext { size, len: len + 1 }
            }
            b'\t' | b' '..=b'~' | 0x80..=0xff => return Err("chunk extension too long"),
            _ => return Err("invalid byte in chunk extension"),
        },
        Chunk::SizeLf { size } => match b {
            b'\n' if size == 0 => Chunk::Trailers,
            b'\n' => Chunk::Data { remaining: size },
            _ => return Err("chunk size line not ended by CRLF"),
        },
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            _ => return Err("chunk data not followed by CRLF"),
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Size { size: 0, digits: 0 },
            _ => return Err("chunk data not followed by CRLF"),
        },
        // Handled by the caller; reaching here is a decoder bug, reported as bad input.
        Chunk::Data { .. } | Chunk::Trailers => return Err("internal chunk state"),
    })
}

fn after_size(size: u64, b: u8) -> Result<Chunk, &'static str> {
    Ok(match b {
        b'\r' => Chunk::SizeLf { size },
        b';' => Chunk::Ext { size, len: 1 },
        b' ' | b'\t' => Chunk::SizeBws { size },
        _ => return Err("chunk size is not hexadecimal"),
    })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

pub(crate) fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Header fields that must not arrive as trailers: framing, routing and
/// hop-by-hop fields (RFC 9110 section 6.5.1). They are dropped.
fn is_forbidden_trailer(name: &HeaderName) -> bool {
    use http::header::*;
    [
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        HOST,
        CONNECTION,
        TE,
        TRAILER,
        UPGRADE,
        EXPECT,
        CONTENT_TYPE,
        CONTENT_ENCODING,
        AUTHORIZATION,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

pub(crate) fn parse_trailers(block: &[u8], max: usize) -> Result<HeaderMap, BodyError> {
    let mut headers = vec![httparse::EMPTY_HEADER; max.min(1024)];
    let parsed = match httparse::parse_headers(block, &mut headers) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        Ok(httparse::Status::Partial) => {
            return Err(BodyError::InvalidChunk("incomplete trailers"))
        }
        Err(httparse::Error::TooManyHeaders) => return Err(BodyError::TrailersTooLarge),
        Err(_) => return Err(BodyError::InvalidChunk("invalid trailer field")),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BodyError::InvalidChunk("invalid trailer name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| BodyError::InvalidChunk("invalid trailer value"))?;
        if !is_forbidden_trailer(&name) {
            map.append(name, value);
        }
    }
    Ok(map)
}

/// The body of a request read by [`serve_connection`](super::serve_connection).
///
/// It streams from the client connection: data frames are slices of the
/// connection's read buffer (at most 16 KiB each), so memory does not grow
/// with the body size. A chunked body's trailers arrive as a final trailers
/// frame (framing and hop-by-hop fields removed). `size_hint` is exact for a
/// Content-Length body. Errors (client gone, bad chunked coding) are returned
/// from `poll_frame`; after an error or the end the body yields `None`.
///
/// The first poll of a body whose request carried `Expect: 100-continue`
/// writes `HTTP/1.1 100 Continue` (unless the final response started first).
/// The body may be moved to another task and outlive the handler; the
/// connection waits a short time for it to finish or be dropped before it
/// reads the next request, and if the connection closes first, further polls
/// fail with [`BodyError::Aborted`].
pub struct RequestBody {
    inner: Inner,
}

enum Inner {
    Empty,
    Stream {
        conn: Shared,
        /// Which request of the connection this body belongs to.
        seq: u64,
        /// Bytes still to come for a Content-Length body.
        remaining: Option<u64>,
        done: bool,
    },
}

impl RequestBody {
    /// A body with no bytes (also what requests without framing get).
    pub fn empty() -> Self {
        RequestBody {
            inner: Inner::Empty,
        }
    }

    pub(crate) fn stream(conn: Shared, seq: u64, length: Option<u64>) -> Self {
        RequestBody {
            inner: Inner::Stream {
                conn,
                seq,
                remaining: length,
                done: false,
            },
        }
    }
}

impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::empty()
    }
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Empty => f.write_str("RequestBody(empty)"),
            Inner::Stream {
                remaining, done, ..
            } => f
                .debug_struct("RequestBody")
                .field("remaining", remaining)
                .field("done", done)
                .finish(),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Inner::Stream {
            conn,
            seq,
            remaining,
            done,
        } = &mut self.get_mut().inner
        else {
            return Poll::Ready(None);
        };
        if *done {
            return Poll::Ready(None);
        }
        let mut c = lock(conn);
        if c.seq != *seq {
            // The connection moved on (this body had ended) or closed.
            *done = true;
            return Poll::Ready(None);
        }
        if let Err(e) = ready!(c.poll_continue(cx)) {
            c.body = Decoder::Failed;
            *done = true;
            c.wake_conn();
            return Poll::Ready(Some(Err(BodyError::Io(e))));
        }
        let res = ready!(c.poll_body(cx));
        match &res {
            Some(Ok(frame)) => {
                if let (Some(r), Some(d)) = (remaining.as_mut(), frame.data_ref()) {
                    *r = r.saturating_sub(d.len() as u64);
                }
                if c.body.is_done() {
                    c.wake_conn();
                }
            }
            None | Some(Err(_)) => {
                *done = true;
                c.wake_conn();
            }
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Empty => true,
            Inner::Stream {
                remaining, done, ..
            } => *done || *remaining == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Empty => SizeHint::with_exact(0),
            Inner::Stream {
                remaining: Some(n), ..
            } => SizeHint::with_exact(*n),
            Inner::Stream { .. } => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Inner::Stream { conn, seq, .. } = &self.inner {
            let mut c = lock(conn);
            if c.seq == *seq {
                c.body_alive = false;
                c.wake_conn();
            }
        }
    }
}
