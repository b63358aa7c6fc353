//! One HTTP/2 connection: frames in, streams, flow control, frames out.
//!
//! Everything runs in the connection's task. Each poll reads and handles
//! the frames that have arrived, runs the handlers that are ready, turns
//! finished handlers into HEADERS and ready response bodies into DATA
//! within the flow-control windows, opens the client's windows by what the
//! request bodies gave away, and writes the lot in one go.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::body::{ConnShared, RequestBody, StreamShared};
use super::frame::{self, flag, kind, Head, Reason, DEFAULT_MAX_FRAME, HEAD_LEN, MAX_WINDOW};
use super::head::{self, Fields, Refusal};
use super::hpack;
use super::{Error, H2Settings, RESET_ALLOWANCE, WRITE_HIGH};
use crate::proxy::buffers;
use crate::proxy::error::BoxError;
use crate::proxy::h1::{Hooks, ResponseFields, Transport};

/// How long the last frames (a GOAWAY) may take to leave.
const LAST_WRITE: Duration = Duration::from_secs(1);

/// Polls of the connection's work before it lets other tasks run.
const ROUNDS_PER_POLL: usize = 16;

/// Serves an HTTP/2 connection whose first bytes (`first`, possibly
/// empty) were already read: `handler` answers each request, and
/// [`Hooks::refused`] hears of each request refused before it (a
/// malformed one counts as 400); an HTTP/2 connection is never parked. Returns when both sides are done, the
/// client goes away, or `close` is cancelled and the open streams finish.
pub async fn serve_connection<T, H, F, B>(
    io: T,
    first: BytesMut,
    settings: &H2Settings,
    close: CancellationToken,
    handler: H,
    hooks: &dyn Hooks,
) -> Result<(), Error>
where
    T: Transport,
    H: Fn(Request<RequestBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + ResponseFields + Unpin,
    B::Error: Into<BoxError>,
{
    let mut conn = Conn::new(io, first, settings);
    let mut running = FuturesUnordered::new();
    let mut cancelled = std::pin::pin!(close.cancelled());
    let mut deferred = false;
    let ended = loop {
        let step = poll_fn(|cx| {
            if conn.wbuf.capacity() == 0 {
                conn.wbuf = buffers::take();
            }
            if conn.going_away.is_none() && cancelled.as_mut().poll(cx).is_ready() {
                conn.go_away(Reason::NO_ERROR);
            }
            for _ in 0..ROUNDS_PER_POLL {
                let mut progress = match conn.poll_read(cx) {
                    Poll::Ready(Ok(progress)) => progress,
                    Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(err))),
                    Poll::Pending => false,
                };
                for (status, reason) in conn.refused.drain(..) {
                    hooks.refused(status, reason);
                }
                for (id, shared, request) in conn.started.drain(..) {
                    running.push(StreamTask {
                        id,
                        shared,
                        handler: handler(request),
                    });
                }
                while let Poll::Ready(Some((id, response))) = running.poll_next_unpin(cx) {
                    if let Some(response) = response {
                        conn.respond(id, response);
                    }
                    progress = true;
                }
                conn.open_windows();
                progress |= conn.poll_bodies(cx);
                if !deferred
                    && !conn.wbuf.is_empty()
                    && !running.is_empty()
                    && conn.wbuf.len() < WRITE_HIGH
                {
                    // Other answers of this connection may be on their way:
                    // let the runtime look for them before writing.
                    deferred = true;
                    return Poll::Ready(None);
                }
                progress |= match conn.poll_write(cx) {
                    Poll::Ready(Ok(wrote)) => {
                        deferred &= !wrote;
                        wrote
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Some(Err(err))),
                    Poll::Pending => false,
                };
                if conn.is_done(running.is_empty()) {
                    return Poll::Ready(Some(Ok(())));
                }
                if conn.poll_idle(cx, running.is_empty()) {
                    conn.go_away(Reason::NO_ERROR);
                    progress = true;
                }
                if !progress {
                    if running.is_empty() {
                        conn.release_idle_buffers();
                    }
                    return Poll::Pending;
                }
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        match step {
            Some(ended) => break ended,
            None => tokio::task::yield_now().await,
        }
    };
    // Streams not answered by now will not be: their handlers end here.
    drop(running);
    conn.fail_streams();
    if let Err(Error::Protocol { .. }) = &ended {
        let _ = tokio::time::timeout(LAST_WRITE, poll_fn(|cx| conn.poll_write(cx))).await;
    }
    if ended.is_ok() {
        let _ = tokio::time::timeout(LAST_WRITE, poll_fn(|cx| conn.poll_write(cx))).await;
        let _ = tokio::time::timeout(
            LAST_WRITE,
            poll_fn(|cx| Pin::new(&mut conn.io).poll_shutdown(cx)),
        )
        .await;
    }
    conn.release_buffers();
    ended
}

pin_project_lite::pin_project! {
    /// A handler's future, tagged with its stream; it ends early (and
    /// drops the handler) when the stream is reset.
    struct StreamTask<F> {
        id: u32,
        shared: Arc<StreamShared>,
        #[pin]
        handler: F,
    }
}

impl<F, B> Future for StreamTask<F>
where
    F: Future<Output = Response<B>>,
{
    type Output = (u32, Option<Response<B>>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let id = *this.id;
        if this.shared.poll_cancelled(cx) {
            return Poll::Ready((id, None));
        }
        this.handler.poll(cx).map(|response| (id, Some(response)))
    }
}

/// A stream the connection knows: its request is being read or answered.
struct Stream<B> {
    id: u32,
    shared: Arc<StreamShared>,
    /// The client may still send DATA or trailers.
    recv_open: bool,
    /// Request body bytes the client may still send.
    recv_window: i64,
    /// Bytes given away by the body, not yet returned in WINDOW_UPDATE.
    recv_unacked: usize,
    /// Content-Length, to check the DATA against.
    expected: Option<u64>,
    received: u64,
    send: Send<B>,
    /// Response bytes we may still send.
    send_window: i64,
}

enum Send<B> {
    /// The handler is running.
    Waiting,
    /// Headers sent; the body is on its way.
    Body { body: B, pending: Option<Bytes> },
    /// END_STREAM or RST_STREAM sent.
    Done,
}

/// A header block spread over HEADERS and CONTINUATION frames.
struct Continuing {
    stream: u32,
    end_stream: bool,
    /// Its PRIORITY names the stream itself (a stream error).
    self_dependent: bool,
}

struct Conn<T, B> {
    io: T,
    rbuf: BytesMut,
    wbuf: BytesMut,
    settings: H2Settings,
    preface_seen: bool,
    settings_seen: bool,
    read_closed: bool,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    fields: Fields,
    /// The block being assembled from CONTINUATION frames.
    block: BytesMut,
    continuing: Option<Continuing>,
    streams: Vec<Stream<B>>,
    shared: Arc<ConnShared>,
    /// Requests decoded and not yet handed to a handler.
    started: Vec<(u32, Arc<StreamShared>, Request<RequestBody>)>,
    /// Requests refused before a handler saw them: (status, reason).
    refused: Vec<(u16, &'static str)>,
    /// The highest stream the client opened.
    last_stream: u32,
    /// Set once we sent GOAWAY: streams above it are ignored.
    going_away: Option<u32>,
    /// The client sent GOAWAY.
    peer_gone: bool,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE and MAX_FRAME_SIZE.
    peer_window: i64,
    peer_max_frame: usize,
    send_window: i64,
    recv_window: i64,
    recv_unacked: usize,
    early_resets: u32,
    answered: u32,
    idle: Option<Pin<Box<Sleep>>>,
    idle_since: Option<Instant>,
}

/// A connection error: GOAWAY with `reason`, then close.
struct ConnError(Reason, &'static str);

impl<T: Transport, B> Conn<T, B>
where
    B: Body<Data = Bytes> + ResponseFields + Unpin,
    B::Error: Into<BoxError>,
{
    fn new(io: T, first: BytesMut, settings: &H2Settings) -> Self {
        let mut wbuf = buffers::take();
        frame::put_settings(
            &mut wbuf,
            &[
                (
                    frame::setting::MAX_CONCURRENT_STREAMS,
                    settings.max_concurrent_streams,
                ),
                (frame::setting::INITIAL_WINDOW_SIZE, settings.stream_window),
                (
                    frame::setting::MAX_HEADER_LIST_SIZE,
                    u32::try_from(settings.max_header_list).unwrap_or(u32::MAX),
                ),
            ],
        );
        let conn_window = i64::from(settings.conn_window).min(MAX_WINDOW);
        if conn_window > frame::DEFAULT_WINDOW {
            frame::put_window_update(&mut wbuf, 0, (conn_window - frame::DEFAULT_WINDOW) as u32);
        }
        Conn {
            io,
            rbuf: first,
            wbuf,
            settings: settings.clone(),
            preface_seen: false,
            settings_seen: false,
            read_closed: false,
            decoder: hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE),
            encoder: hpack::Encoder::new(),
            fields: Fields::new(settings.max_header_list, settings.max_headers),
            block: BytesMut::new(),
            continuing: None,
            streams: Vec::new(),
            shared: Arc::new(ConnShared::default()),
            started: Vec::new(),
            refused: Vec::new(),
            last_stream: 0,
            going_away: None,
            peer_gone: false,
            peer_window: frame::DEFAULT_WINDOW,
            peer_max_frame: DEFAULT_MAX_FRAME,
            send_window: frame::DEFAULT_WINDOW,
            recv_window: conn_window.max(frame::DEFAULT_WINDOW),
            recv_unacked: 0,
            early_resets: 0,
            answered: 0,
            idle: None,
            idle_since: Some(Instant::now()),
        }
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    /// Sends GOAWAY: streams the client opens from now on are ignored.
    fn go_away(&mut self, reason: Reason) {
        if self.going_away.is_none() {
            self.going_away = Some(self.last_stream);
            frame::put_goaway(&mut self.wbuf, self.last_stream, reason);
        }
    }

    fn is_done(&self, no_handlers: bool) -> bool {
        (self.going_away.is_some() || self.peer_gone || self.read_closed)
            && self.streams.is_empty()
            && no_handlers
            && self.wbuf.is_empty()
    }

    /// Whether the connection has been idle (no stream) for the idle timeout.
    fn poll_idle(&mut self, cx: &mut Context<'_>, no_handlers: bool) -> bool {
        if !self.streams.is_empty() || !no_handlers || self.continuing.is_some() {
            self.idle_since = None;
            return false;
        }
        let timeout = self.settings.idle_timeout;
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        let sleep = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(since + timeout)));
        if sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        if since.elapsed() >= timeout {
            return self.going_away.is_none();
        }
        // Fired for an earlier idle spell: wait out this one.
        sleep.as_mut().reset(since + timeout);
        let _ = sleep.as_mut().poll(cx);
        false
    }

    /// Reads and handles frames until the socket has nothing more, or the
    /// output is backed up. `Ok(true)` when something was read.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        let mut progress = false;
        loop {
            if let Err(ConnError(reason, why)) = self.handle_frames() {
                // Sent even after a graceful GOAWAY: this one has the cause.
                frame::put_goaway(&mut self.wbuf, self.last_stream, reason);
                self.going_away = Some(self.last_stream);
                return Poll::Ready(Err(Error::Protocol {
                    code: reason.0,
                    why,
                }));
            }
            if self.read_closed || self.wbuf.len() >= WRITE_HIGH {
                return Poll::Ready(Ok(progress));
            }
            if self.rbuf.capacity() == 0 {
                // No buffer while there is nothing to read.
                if let Err(err) = ready!(self.io.poll_read_ready(cx)) {
                    return Poll::Ready(Err(Error::Io(err)));
                }
                self.rbuf = buffers::take();
            }
            let needed = self.frame_len_needed();
            if self.rbuf.capacity() - self.rbuf.len() < needed.saturating_sub(self.rbuf.len()) {
                self.rbuf.reserve(needed - self.rbuf.len());
            }
            if self.rbuf.capacity() == self.rbuf.len() {
                self.rbuf.reserve(4096);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) => {
                    self.read_closed = true;
                    self.fail_receiving("client closed the connection");
                    return Poll::Ready(Ok(true));
                }
                Poll::Ready(Ok(_)) => progress = true,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(Error::Io(err))),
                Poll::Pending => {
                    if self.rbuf.is_empty() {
                        buffers::give(std::mem::take(&mut self.rbuf));
                    }
                    return if progress {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
    }

    /// Bytes the buffer must hold for the frame at its start to be whole.
    fn frame_len_needed(&self) -> usize {
        if !self.preface_seen {
            return frame::PREFACE.len();
        }
        match self.rbuf.get(..HEAD_LEN).and_then(|h| h.try_into().ok()) {
            Some(head) => HEAD_LEN + Head::parse(head).len.min(DEFAULT_MAX_FRAME),
            None => HEAD_LEN,
        }
    }

    /// Handles every whole frame in the read buffer.
    fn handle_frames(&mut self) -> Result<(), ConnError> {
        if !self.preface_seen {
            let n = self.rbuf.len().min(frame::PREFACE.len());
            if self.rbuf[..n] != frame::PREFACE[..n] {
                return Err(ConnError(
                    Reason::PROTOCOL_ERROR,
                    "invalid connection preface",
                ));
            }
            if n < frame::PREFACE.len() {
                return Ok(());
            }
            self.rbuf.advance(n);
            self.preface_seen = true;
        }
        while self.rbuf.len() >= HEAD_LEN && self.wbuf.len() < WRITE_HIGH {
            let head = Head::parse(self.rbuf[..HEAD_LEN].try_into().unwrap_or(&[0; HEAD_LEN]));
            if head.len > DEFAULT_MAX_FRAME {
                return Err(ConnError(
                    Reason::FRAME_SIZE_ERROR,
                    "frame over the maximum size",
                ));
            }
            if self.rbuf.len() < HEAD_LEN + head.len {
                return Ok(());
            }
            if !self.settings_seen {
                if head.kind != kind::SETTINGS || head.has(flag::ACK) {
                    return Err(ConnError(
                        Reason::PROTOCOL_ERROR,
                        "preface without SETTINGS",
                    ));
                }
                self.settings_seen = true;
            }
            self.rbuf.advance(HEAD_LEN);
            if head.kind == kind::DATA {
                let payload = self.rbuf.split_to(head.len).freeze();
                self.on_data(head, payload)?;
            } else {
                let rbuf = std::mem::take(&mut self.rbuf);
                let result = self.on_frame(head, &rbuf[..head.len]);
                self.rbuf = rbuf;
                self.rbuf.advance(head.len);
                result?;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if let Some(c) = &self.continuing {
            if head.kind != kind::CONTINUATION || head.stream != c.stream {
                return Err(ConnError(
                    Reason::PROTOCOL_ERROR,
                    "header block interrupted",
                ));
            }
        }
        match head.kind {
            kind::HEADERS => self.on_headers(head, payload),
            kind::CONTINUATION => self.on_continuation(head, payload),
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if payload.len() != 5 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "PRIORITY size"));
                }
                if depends_on(payload) == head.stream {
                    self.reset(head.stream, Reason::PROTOCOL_ERROR);
                }
                Ok(())
            }
            kind::RST_STREAM => self.on_rst(head, payload),
            kind::SETTINGS => self.on_settings(head, payload),
            kind::PUSH_PROMISE => Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            kind::PING => {
                if head.stream != 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if payload.len() != 8 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "PING size"));
                }
                if !head.has(flag::ACK) {
                    frame::put_ping_ack(&mut self.wbuf, payload);
                }
                Ok(())
            }
            kind::GOAWAY => {
                if head.stream != 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if payload.len() < 8 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "GOAWAY size"));
                }
                self.peer_gone = true;
                Ok(())
            }
            kind::WINDOW_UPDATE => self.on_window_update(head, payload),
            // Unknown frame types are ignored (RFC 9113 section 4.1).
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            if !payload.is_empty() {
                return Err(ConnError(
                    Reason::FRAME_SIZE_ERROR,
                    "SETTINGS ack with a payload",
                ));
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(ConnError(Reason::FRAME_SIZE_ERROR, "SETTINGS size"));
        }
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                frame::setting::ENABLE_PUSH if value > 1 => {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "ENABLE_PUSH over 1"));
                }
                frame::setting::INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > MAX_WINDOW {
                        return Err(ConnError(
                            Reason::FLOW_CONTROL_ERROR,
                            "initial window over 2^31-1",
                        ));
                    }
                    let delta = value - self.peer_window;
                    self.peer_window = value;
                    for stream in &mut self.streams {
                        stream.send_window += delta;
                        if stream.send_window > MAX_WINDOW {
                            return Err(ConnError(
                                Reason::FLOW_CONTROL_ERROR,
                                "stream window over 2^31-1",
                            ));
                        }
                    }
                }
                frame::setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME as u32..=0xff_ffff).contains(&value) {
                        return Err(ConnError(
                            Reason::PROTOCOL_ERROR,
                            "MAX_FRAME_SIZE out of range",
                        ));
                    }
                    self.peer_max_frame = value as usize;
                }
                frame::setting::HEADER_TABLE_SIZE => {
                    self.encoder.set_peer_table_size(value as usize);
                }
                // The others are advisory.
                _ => {}
            }
        }
        frame::put_settings_ack(&mut self.wbuf);
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let [a, b, c, d] = payload else {
            return Err(ConnError(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE size"));
        };
        let increment = i64::from(u32::from_be_bytes([*a, *b, *c, *d]) & 0x7fff_ffff);
        if head.stream == 0 {
            if increment == 0 {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > MAX_WINDOW {
                return Err(ConnError(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window over 2^31-1",
                ));
            }
            return Ok(());
        }
        if head.stream > self.last_stream {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        if increment == 0 {
            self.reset(head.stream, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if let Some(i) = self.find(head.stream) {
            let stream = &mut self.streams[i];
            stream.send_window += increment;
            if stream.send_window > MAX_WINDOW {
                self.reset(head.stream, Reason::FLOW_CONTROL_ERROR);
            }
        }
        Ok(())
    }

    fn on_rst(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if payload.len() != 4 {
            return Err(ConnError(Reason::FRAME_SIZE_ERROR, "RST_STREAM size"));
        }
        if head.stream > self.last_stream {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        let Some(i) = self.find(head.stream) else {
            return Ok(());
        };
        if matches!(self.streams[i].send, Send::Waiting) {
            self.early_resets += 1;
            if self.early_resets > RESET_ALLOWANCE && self.early_resets > self.answered {
                return Err(ConnError(
                    Reason::ENHANCE_YOUR_CALM,
                    "too many streams reset",
                ));
            }
        }
        self.remove(i, "stream reset by the client");
        Ok(())
    }

    fn on_data(&mut self, head: Head, payload: Bytes) -> Result<(), ConnError> {
        if self.continuing.is_some() {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "header block interrupted",
            ));
        }
        if head.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if head.stream > self.last_stream {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        // The whole frame counts against the windows, padding included.
        let size = payload.len();
        self.recv_window -= size as i64;
        if self.recv_window < 0 {
            return Err(ConnError(
                Reason::FLOW_CONTROL_ERROR,
                "connection window exceeded",
            ));
        }
        let data = strip_padding(head, payload)
            .ok_or(ConnError(Reason::PROTOCOL_ERROR, "invalid padding"))?;
        let padding = size - data.len();
        self.recv_unacked += padding;
        let Some(i) = self.find(head.stream) else {
            // A stream already closed: the bytes are released at once.
            self.recv_unacked += data.len();
            return Ok(());
        };
        let stream = &mut self.streams[i];
        if !stream.recv_open {
            self.recv_unacked += data.len();
            self.reset(head.stream, Reason::STREAM_CLOSED);
            return Ok(());
        }
        stream.recv_window -= size as i64;
        stream.received += data.len() as u64;
        if stream.recv_window < 0 {
            self.recv_unacked += data.len();
            self.reset(head.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        let end = head.has(flag::END_STREAM);
        let length_error = match stream.expected {
            Some(n) => stream.received > n || (end && stream.received != n),
            None => false,
        };
        if length_error {
            self.recv_unacked += data.len();
            self.reset(head.stream, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        // A body its handler dropped releases the bytes at once; they are
        // acknowledged with the others.
        stream.shared.push(data);
        if end {
            stream.recv_open = false;
            stream.shared.end(None);
            self.close_if_done(i);
        }
        Ok(())
    }

    fn on_headers(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 || head.stream.is_multiple_of(2) {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "HEADERS on an invalid stream",
            ));
        }
        let mut block = payload;
        let mut self_dependent = false;
        if head.has(flag::PADDED) {
            let (&pad, rest) = block
                .split_first()
                .ok_or(ConnError(Reason::PROTOCOL_ERROR, "invalid padding"))?;
            let pad = usize::from(pad);
            if pad > rest.len() {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "invalid padding"));
            }
            block = &rest[..rest.len() - pad];
        }
        if head.has(flag::PRIORITY) {
            if block.len() < 5 {
                return Err(ConnError(Reason::FRAME_SIZE_ERROR, "HEADERS priority size"));
            }
            self_dependent = depends_on(block) == head.stream;
            block = &block[5..];
        }
        let end_stream = head.has(flag::END_STREAM);
        if head.has(flag::END_HEADERS) {
            return self.on_block(head.stream, end_stream, self_dependent, block);
        }
        if self.block.len() + block.len() > self.settings.max_header_list {
            return Err(ConnError(
                Reason::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        self.block.clear();
        self.block.extend_from_slice(block);
        self.continuing = Some(Continuing {
            stream: head.stream,
            end_stream,
            self_dependent,
        });
        Ok(())
    }

    fn on_continuation(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let Some(c) = &self.continuing else {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            ));
        };
        let (stream, end_stream, self_dependent) = (c.stream, c.end_stream, c.self_dependent);
        if self.block.len() + payload.len() > self.settings.max_header_list {
            return Err(ConnError(
                Reason::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        self.block.extend_from_slice(payload);
        if !head.has(flag::END_HEADERS) {
            return Ok(());
        }
        self.continuing = None;
        let block = std::mem::take(&mut self.block);
        let result = self.on_block(stream, end_stream, self_dependent, &block);
        self.block = block;
        self.block.clear();
        result
    }

    /// A complete header block: a new request, or a request's trailers.
    fn on_block(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        block: &[u8],
    ) -> Result<(), ConnError> {
        let existing = self.find(id);
        let trailers = existing.is_some() || id <= self.last_stream;
        self.fields.start(trailers);
        let fields = &mut self.fields;
        self.decoder
            .decode(block, |name, value| fields.field(name, value))
            .map_err(|_| ConnError(Reason::COMPRESSION_ERROR, "invalid header block"))?;
        if trailers {
            return self.on_trailers(existing, id, end_stream);
        }
        self.last_stream = id;
        if self.going_away.is_some_and(|last| id > last) {
            return Ok(());
        }
        if self_dependent {
            self.refused.push((400, "stream depends on itself"));
            self.reset(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.streams.len() >= self.settings.max_concurrent_streams as usize {
            self.reset(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let (request, length) = match self.fields.request() {
            Ok(request) => request,
            Err(Refusal::Malformed(why)) => {
                self.refused.push((400, why));
                self.reset(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
            Err(Refusal::TooLarge) => {
                self.refused.push((431, "headers-too-large"));
                self.answer_locally(id, 431, "headers-too-large", end_stream);
                return Ok(());
            }
        };
        if request.method() == http::Method::CONNECT {
            self.refused.push((405, "method-not-allowed"));
            self.answer_locally(id, 405, "method-not-allowed", end_stream);
            return Ok(());
        }
        if end_stream && length.is_some_and(|n| n > 0) {
            self.refused.push((400, "content-length without a body"));
            self.reset(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let shared = StreamShared::new(Arc::clone(&self.shared));
        let body = if end_stream {
            RequestBody::empty()
        } else {
            RequestBody::streaming(Arc::clone(&shared), length)
        };
        self.streams.push(Stream {
            id,
            shared: Arc::clone(&shared),
            recv_open: !end_stream,
            recv_window: i64::from(self.settings.stream_window),
            recv_unacked: 0,
            expected: length,
            received: 0,
            send: Send::Waiting,
            send_window: self.peer_window,
        });
        self.started.push((id, shared, request.map(|()| body)));
        Ok(())
    }

    fn on_trailers(
        &mut self,
        existing: Option<usize>,
        id: u32,
        end_stream: bool,
    ) -> Result<(), ConnError> {
        let Some(i) = existing else {
            // Trailers of a stream already closed: decoded, then dropped.
            return Ok(());
        };
        if !self.streams[i].recv_open {
            self.reset(id, Reason::STREAM_CLOSED);
            return Ok(());
        }
        if !end_stream {
            self.reset(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let trailers = match self.fields.trailers() {
            Ok(trailers) => trailers,
            Err(_) => {
                self.reset(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        let stream = &mut self.streams[i];
        if stream.expected.is_some_and(|n| n != stream.received) {
            self.reset(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        stream.recv_open = false;
        stream
            .shared
            .end((!trailers.is_empty()).then_some(trailers));
        self.close_if_done(i);
        Ok(())
    }

    /// Answers a request Sluice refuses itself (no body).
    fn answer_locally(&mut self, id: u32, status: u16, reason: &'static str, end_stream: bool) {
        let block = &mut self.wbuf;
        let at = start_block(&mut self.encoder, block);
        hpack::encode_status(block, status);
        self.encoder
            .field(block, b"sluice-error", reason.as_bytes());
        if status == 405 {
            self.encoder.field(
                block,
                b"allow",
                b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS",
            );
        }
        self.encoder.field(block, b"content-length", b"0");
        frame::finish_headers(block, at, id, true, self.peer_max_frame);
        if !end_stream {
            // Nothing more of the request is wanted.
            frame::put_rst(&mut self.wbuf, id, Reason::NO_ERROR);
        }
    }

    /// Sends RST_STREAM and forgets the stream.
    fn reset(&mut self, id: u32, reason: Reason) {
        frame::put_rst(&mut self.wbuf, id, reason);
        if let Some(i) = self.find(id) {
            self.remove(i, "stream reset");
        }
    }

    /// Forgets stream `i`: its handler stops, its body fails, and what it
    /// had buffered is released to the connection window.
    fn remove(&mut self, i: usize, why: &'static str) {
        self.forget(i).shared.cancel(why);
    }

    /// Takes stream `i` out of the table, returning what it held of the
    /// connection window.
    fn forget(&mut self, i: usize) -> Stream<B> {
        let stream = self.streams.swap_remove(i);
        self.recv_unacked += stream.recv_unacked + stream.shared.take_released(true);
        stream
    }

    /// Forgets stream `i` if both directions are done; a response that
    /// ended before its request did stops the rest of the request.
    fn close_if_done(&mut self, i: usize) {
        let stream = &self.streams[i];
        if !matches!(stream.send, Send::Done) {
            return;
        }
        if stream.recv_open {
            frame::put_rst(&mut self.wbuf, stream.id, Reason::NO_ERROR);
        }
        let stream = self.forget(i);
        if stream.recv_open {
            stream.shared.fail("response sent before the request ended");
        }
    }

    /// Writes the head of a finished handler's response.
    fn respond(&mut self, id: u32, response: Response<B>) {
        let Some(i) = self.find(id) else {
            return;
        };
        let (parts, mut body) = response.into_parts();
        if parts.status.is_informational() {
            self.reset(id, Reason::INTERNAL_ERROR);
            return;
        }
        let block = &mut self.wbuf;
        let at = start_block(&mut self.encoder, block);
        hpack::encode_status(block, parts.status.as_u16());
        if let Some(fields) = body.take_encoded_fields() {
            for line in fields.lines.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(colon) = line.iter().position(|&b| b == b':') {
                    let value = &line[colon + 1..];
                    let value = value.strip_prefix(b" ").unwrap_or(value);
                    self.encoder.field(block, &line[..colon], value);
                }
            }
            if let Some(n) = fields.content_length {
                self.encoder.field(
                    block,
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                );
            }
        }
        encode_map(&mut self.encoder, block, &parts.headers);
        let end = body.is_end_stream();
        frame::finish_headers(block, at, id, end, self.peer_max_frame);
        self.answered += 1;
        let stream = &mut self.streams[i];
        if end {
            stream.send = Send::Done;
            self.close_if_done(i);
        } else {
            stream.send = Send::Body {
                body,
                pending: None,
            };
        }
    }

    /// Turns ready response bodies into DATA within the windows. `true`
    /// when a frame was written.
    fn poll_bodies(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut i = 0;
        while i < self.streams.len() {
            if self.wbuf.len() >= WRITE_HIGH {
                break;
            }
            let (wrote, finished) = self.poll_body(i, cx);
            progress |= wrote;
            match finished {
                Some(None) => self.close_if_done(i),
                Some(Some(reason)) => {
                    let id = self.streams[i].id;
                    self.reset(id, reason);
                }
                None => i += 1,
            }
        }
        progress
    }

    /// Sends what stream `i`'s body has ready. Returns whether it wrote,
    /// and `Some` when the response ended (`Some(reason)` if it failed).
    fn poll_body(&mut self, i: usize, cx: &mut Context<'_>) -> (bool, Option<Option<Reason>>) {
        let max_frame = self.peer_max_frame;
        let stream = &mut self.streams[i];
        let Send::Body { body, pending } = &mut stream.send else {
            return (false, None);
        };
        let mut wrote = false;
        loop {
            if self.wbuf.len() >= WRITE_HIGH {
                return (wrote, None);
            }
            if let Some(chunk) = pending {
                let allowed = stream
                    .send_window
                    .min(self.send_window)
                    .min(max_frame as i64);
                if allowed <= 0 {
                    return (wrote, None);
                }
                let part = chunk.split_to(chunk.len().min(allowed as usize));
                let last = chunk.is_empty() && body.is_end_stream();
                frame::put_data(&mut self.wbuf, stream.id, &part, last);
                stream.send_window -= part.len() as i64;
                self.send_window -= part.len() as i64;
                wrote = true;
                if chunk.is_empty() {
                    *pending = None;
                    if last {
                        stream.send = Send::Done;
                        return (true, Some(None));
                    }
                }
                continue;
            }
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() && !body.is_end_stream() => {}
                    Ok(data) => *pending = Some(data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        let at = start_block(&mut self.encoder, &mut self.wbuf);
                        encode_map(&mut self.encoder, &mut self.wbuf, &trailers);
                        frame::finish_headers(&mut self.wbuf, at, stream.id, true, max_frame);
                        stream.send = Send::Done;
                        return (true, Some(None));
                    }
                },
                Poll::Ready(None) => {
                    frame::put_data(&mut self.wbuf, stream.id, &[], true);
                    stream.send = Send::Done;
                    return (true, Some(None));
                }
                Poll::Ready(Some(Err(_))) => return (wrote, Some(Some(Reason::INTERNAL_ERROR))),
                Poll::Pending => return (wrote, None),
            }
        }
    }

    /// Returns to the client, in WINDOW_UPDATE frames, the window its
    /// request bodies' readers gave away.
    fn open_windows(&mut self) {
        if self.shared.released.swap(false, Ordering::AcqRel) {
            let half = (self.settings.stream_window / 2) as usize;
            for stream in &mut self.streams {
                let released = stream.shared.take_released(false);
                stream.recv_unacked += released;
                self.recv_unacked += released;
                if stream.recv_open && stream.recv_unacked >= half.max(1) {
                    frame::put_window_update(&mut self.wbuf, stream.id, stream.recv_unacked as u32);
                    stream.recv_window += stream.recv_unacked as i64;
                    stream.recv_unacked = 0;
                }
            }
        }
        if self.recv_unacked >= (self.settings.conn_window / 2).max(1) as usize {
            frame::put_window_update(&mut self.wbuf, 0, self.recv_unacked as u32);
            self.recv_window += self.recv_unacked as i64;
            self.recv_unacked = 0;
        }
    }

    /// Writes out what is buffered. `Ok(true)` when bytes left.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        self.shared.waker.register(cx.waker());
        let mut wrote = false;
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Error::Io(std::io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    self.wbuf.advance(n);
                    wrote = true;
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(Error::Io(err))),
                Poll::Pending => {
                    return if wrote {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    }
                }
            }
        }
        if wrote {
            if let Poll::Ready(Err(err)) = Pin::new(&mut self.io).poll_flush(cx) {
                return Poll::Ready(Err(Error::Io(err)));
            }
        }
        Poll::Ready(Ok(wrote))
    }

    /// The client is gone: request bodies still arriving cannot complete.
    fn fail_receiving(&mut self, why: &'static str) {
        for stream in &mut self.streams {
            if stream.recv_open {
                stream.recv_open = false;
                stream.shared.fail(why);
            }
        }
    }

    /// The connection ended: every stream's handler and body stop.
    fn fail_streams(&mut self) {
        for stream in self.streams.drain(..) {
            stream.shared.cancel("connection closed");
        }
    }

    /// An idle connection (no stream, nothing to write or parse) holds no
    /// buffer: they go back to the pool until the next frame arrives.
    fn release_idle_buffers(&mut self) {
        if !self.streams.is_empty() || self.continuing.is_some() || !self.wbuf.is_empty() {
            return;
        }
        if self.rbuf.is_empty() {
            buffers::give(std::mem::take(&mut self.rbuf));
        }
        buffers::give(std::mem::take(&mut self.wbuf));
        self.fields.release();
        self.block = BytesMut::new();
    }

    fn release_buffers(&mut self) {
        buffers::give(std::mem::take(&mut self.rbuf));
        buffers::give(std::mem::take(&mut self.wbuf));
    }
}

/// Starts a HEADERS frame in `buf` and its header block with the table size
/// updates the encoder owes the client; every block we send starts here, so
/// none can miss them. Returns where the frame starts, for
/// `frame::finish_headers`.
fn start_block(encoder: &mut hpack::Encoder, buf: &mut BytesMut) -> usize {
    let at = frame::start_headers(buf);
    encoder.begin_block(buf);
    at
}

/// Encodes a `HeaderMap`'s fields, less those HTTP/2 forbids.
fn encode_map(encoder: &mut hpack::Encoder, block: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        if head::is_connection_specific(name) || name == http::header::TE {
            continue;
        }
        encoder.field(block, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// The stream a PRIORITY block says this one depends on.
fn depends_on(block: &[u8]) -> u32 {
    match block {
        [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]) & 0x7fff_ffff,
        _ => 0,
    }
}

/// A DATA payload without its padding, or `None` if the padding is invalid.
fn strip_padding(head: Head, mut payload: Bytes) -> Option<Bytes> {
    if !head.has(flag::PADDED) {
        return Some(payload);
    }
    let pad = usize::from(*payload.first()?);
    payload.advance(1);
    if pad > payload.len() {
        return None;
    }
    payload.truncate(payload.len() - pad);
    Some(payload)
}
