//! The two bodies of an exchange with a backend: [`Upload`] writes the
//! request body out, [`ResponseBody`] reads the response body in. Both run
//! in the task of the request that owns the connection; while the response
//! streams, the response body keeps the upload going, so a backend that
//! answers before it has read the whole request is served both ways.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::head::{self, RequestFraming, ResponseFraming};
use super::pool::Pool;
use crate::proxy::body::RequestBody;
use crate::proxy::buffers;
use crate::proxy::error::BoxError;
use crate::proxy::h1::chunked::{self, Chunk};
use crate::proxy::h1::EncodedFields;
use crate::upstream::client::BackendStream;

/// Room asked for by each read of a response body; also bounds its frames.
const BODY_READ: usize = 16 * 1024;
/// Trailer section limits.
const MAX_TRAILER_BYTES: usize = 64 * 1024;
const MAX_TRAILERS: usize = 100;

/// Why the exchange with the backend failed after its head.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("backend connection failed")]
    Io(#[from] io::Error),
    #[error("backend closed the connection before the response body ended")]
    Incomplete,
    #[error("invalid chunked response body: {0}")]
    InvalidChunk(&'static str),
    #[error("request body failed")]
    RequestBody(#[source] BoxError),
    #[error("request body did not match its content-length")]
    RequestLength,
}

/// Reads into `buf` from `io` with room for at least `want` bytes. An
/// empty buffer that is too small is swapped for one large enough rather
/// than grown (growing copies it). `Ok(0)` is the end of the stream.
pub(super) fn poll_fill(
    io: &mut BackendStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want {
        if buf.is_empty() {
            buffers::give(std::mem::take(buf));
            *buf = buffers::take_at_least(want);
        } else {
            buf.reserve(want);
        }
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// The rest of a request body, written to the backend as it arrives.
pub struct Upload {
    body: RequestBody,
    framing: RequestFraming,
    /// Bytes of the declared length not sent yet.
    remaining: u64,
    /// Framing bytes (chunk size, trailers) to write before `data`.
    prefix: BytesMut,
    data: Bytes,
    /// A CRLF after a chunk's data.
    suffix: &'static [u8],
    ended: bool,
    /// Some of the body has been taken from the client.
    pub started: bool,
}

impl Upload {
    pub fn new(body: RequestBody, framing: RequestFraming) -> Self {
        let remaining = match framing {
            RequestFraming::Length(n) => n,
            _ => 0,
        };
        Upload {
            body,
            framing,
            remaining,
            prefix: BytesMut::new(),
            data: Bytes::new(),
            suffix: b"",
            ended: framing == RequestFraming::Empty,
            started: false,
        }
    }

    /// Every byte of the body has been written.
    pub fn is_done(&self) -> bool {
        self.ended && !self.has_output()
    }

    fn has_output(&self) -> bool {
        !self.prefix.is_empty() || !self.data.is_empty() || !self.suffix.is_empty()
    }

    /// Writes the body until it has all gone (`Ready(Ok)`), or the client
    /// or the backend is not ready.
    pub fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut BackendStream,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            while self.has_output() {
                let n = {
                    let slices = [
                        IoSlice::new(&self.prefix),
                        IoSlice::new(&self.data),
                        IoSlice::new(self.suffix),
                    ];
                    ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?
                };
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                let mut n = n;
                let p = n.min(self.prefix.len());
                self.prefix.advance(p);
                n -= p;
                let d = n.min(self.data.len());
                self.data.advance(d);
                n -= d;
                self.suffix = &self.suffix[n.min(self.suffix.len())..];
            }
            if self.ended {
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                return Poll::Ready(Ok(()));
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Err(ExchangeError::RequestBody(e))),
                None => {
                    self.ended = true;
                    match self.framing {
                        RequestFraming::Chunked => self.prefix.extend_from_slice(b"0\r\n\r\n"),
                        RequestFraming::Length(_) if self.remaining != 0 => {
                            return Poll::Ready(Err(ExchangeError::RequestLength))
                        }
                        _ => {}
                    }
                    continue;
                }
            };
            self.started = true;
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => match self.framing {
                    RequestFraming::Chunked => {
                        head::put_chunk_size(&mut self.prefix, data.len());
                        self.data = data;
                        self.suffix = b"\r\n";
                    }
                    _ => {
                        let len = data.len() as u64;
                        if len > self.remaining {
                            return Poll::Ready(Err(ExchangeError::RequestLength));
                        }
                        self.remaining -= len;
                        self.data = data;
                    }
                },
                Err(frame) => {
                    if let (RequestFraming::Chunked, Ok(trailers)) =
                        (self.framing, frame.into_trailers())
                    {
                        head::put_trailers(&mut self.prefix, &trailers);
                        self.ended = true;
                    }
                }
            }
        }
    }
}

/// How much of the response body is left.
#[derive(Debug, Clone, Copy)]
enum Decoder {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

/// A backend's response body, read from the connection by whoever polls it.
///
/// When it has been read to the end (and the request body sent in full),
/// dropping it returns the connection to the backend's pool; dropped
/// earlier, the connection is closed.
pub struct ResponseBody {
    io: Option<BackendStream>,
    rbuf: BytesMut,
    decoder: Decoder,
    keep_alive: bool,
    upload: Option<Box<Upload>>,
    pool: Arc<Pool>,
    /// The response's fields in wire form, until the writer takes them.
    encoded: Option<EncodedFields>,
}

impl ResponseBody {
    pub(super) fn new(
        io: BackendStream,
        rbuf: BytesMut,
        framing: ResponseFraming,
        keep_alive: bool,
        upload: Option<Box<Upload>>,
        pool: Arc<Pool>,
        encoded: Option<EncodedFields>,
    ) -> Self {
        let decoder = match framing {
            ResponseFraming::Empty => Decoder::Done,
            ResponseFraming::Length(0) => Decoder::Done,
            ResponseFraming::Length(n) => Decoder::Length(n),
            ResponseFraming::Chunked => Decoder::Chunked(Chunk::Size { size: 0, digits: 0 }),
            ResponseFraming::Close => Decoder::Close,
        };
        ResponseBody {
            io: Some(io),
            rbuf,
            decoder,
            keep_alive,
            upload,
            pool,
            encoded,
        }
    }

    /// The response's fields in wire form, when they were kept so.
    pub fn take_encoded_fields(&mut self) -> Option<EncodedFields> {
        self.encoded.take()
    }

    /// Keeps the request body going; a failure there ends the upload but
    /// not the response (the backend may answer anyway), and the connection
    /// is not reused.
    fn drive_upload(&mut self, cx: &mut Context<'_>) {
        let (Some(upload), Some(io)) = (self.upload.as_mut(), self.io.as_mut()) else {
            return;
        };
        match upload.poll_send(cx, io) {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => self.upload = None,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "request body upload ended early");
                self.upload = None;
                self.keep_alive = false;
            }
        }
    }

    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, ExchangeError>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(ExchangeError::Incomplete));
        };
        Poll::Ready(Ok(ready!(poll_fill(io, cx, &mut self.rbuf, BODY_READ))?))
    }

    /// Fills the buffer when it is empty; end of stream is an error.
    fn need(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        if self.rbuf.is_empty() && ready!(self.fill(cx))? == 0 {
            return Poll::Ready(Err(ExchangeError::Incomplete));
        }
        Poll::Ready(Ok(()))
    }

    fn poll_decode(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        loop {
            match self.decoder {
                Decoder::Done => return Poll::Ready(None),
                Decoder::Length(remaining) => {
                    if let Err(e) = ready!(self.need(cx)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    let n = chunked::clamp(remaining, self.rbuf.len());
                    let data = self.rbuf.split_to(n).freeze();
                    let left = remaining - n as u64;
                    self.decoder = if left == 0 {
                        Decoder::Done
                    } else {
                        Decoder::Length(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Close => {
                    if self.rbuf.is_empty() {
                        match ready!(self.fill(cx)) {
                            Ok(0) => {
                                self.decoder = Decoder::Done;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return Poll::Ready(Some(Err(e))),
                        }
                    }
                    let data = self.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Chunked(Chunk::Data { remaining }) => {
                    if let Err(e) = ready!(self.need(cx)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    let n = chunked::clamp(remaining, self.rbuf.len());
                    let data = self.rbuf.split_to(n).freeze();
                    let left = remaining - n as u64;
                    self.decoder = Decoder::Chunked(if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data { remaining: left }
                    });
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Chunked(Chunk::Trailers) => {
                    return match ready!(self.poll_trailers(cx)) {
                        Ok(None) => Poll::Ready(None),
                        Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
                Decoder::Chunked(state) => {
                    if let Err(e) = ready!(self.need(cx)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    let (state, used) = match chunked::frame(state, &self.rbuf) {
                        Ok(done) => done,
                        Err(e) => return Poll::Ready(Some(Err(ExchangeError::InvalidChunk(e)))),
                    };
                    self.rbuf.advance(used);
                    self.decoder = Decoder::Chunked(state);
                }
            }
        }
    }

    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, ExchangeError>> {
        loop {
            if self.rbuf.starts_with(b"\r\n") {
                self.rbuf.advance(2);
                self.decoder = Decoder::Done;
                return Poll::Ready(Ok(None));
            }
            if let Some(end) = chunked::find(&self.rbuf, b"\r\n\r\n") {
                let len = end + 4;
                let map = chunked::parse_trailers(&self.rbuf[..len], MAX_TRAILERS)
                    .map_err(|_| ExchangeError::InvalidChunk("invalid trailers"))?;
                self.rbuf.advance(len);
                self.decoder = Decoder::Done;
                return Poll::Ready(Ok(Some(map)));
            }
            if self.rbuf.len() > MAX_TRAILER_BYTES {
                return Poll::Ready(Err(ExchangeError::InvalidChunk("trailers too large")));
            }
            if ready!(self.fill(cx))? == 0 {
                return Poll::Ready(Err(ExchangeError::Incomplete));
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        if this.upload.is_some() {
            this.drive_upload(cx);
        }
        let polled = ready!(this.poll_decode(cx));
        if let Some(Err(_)) = &polled {
            this.keep_alive = false;
            this.decoder = Decoder::Done;
            this.io = None;
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let reusable = self.keep_alive
            && self.upload.is_none()
            && self.rbuf.is_empty()
            && matches!(self.decoder, Decoder::Done);
        if let (true, Some(io)) = (reusable, self.io.take()) {
            self.pool.checkin(io);
        }
        buffers::give(std::mem::take(&mut self.rbuf));
    }
}
