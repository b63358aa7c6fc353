//! Our own HTTP/1.1 server codec for the downstream (client) side.
//!
//! hyper's HTTP/1 server keeps its buffers for the life of a keep-alive
//! connection, closes on a header timeout without answering, and sends its
//! own 400/431 replies; here an idle connection holds no heap buffer, every
//! refusal is a generated response with a `sluice-error` header, and the
//! request-smuggling rules of SPEC section 3 are applied before the handler
//! runs. HTTP/2 downstream has its own codec (`proxy::h2`); hyper remains
//! the upstream client for HTTP/2 backends.
//!
//! * `parse.rs`: request heads (httparse) and the framing rules.
//! * `body.rs`: [`RequestBody`] and the Content-Length / chunked decoder.
//! * `write.rs`: response framing and generated error responses.
//! * `conn.rs`: state shared by the connection task and the request body,
//!   and the per-thread buffer pool.
//!
//! Choices worth knowing:
//! * `Expect: 100-continue` is removed from the request headers and
//!   `HTTP/1.1 100 Continue` is written when the handler first polls the body,
//!   so a handler that answers without reading it (401, 413...) never invites
//!   the upload; the connection then closes after the response. It is ignored
//!   for HTTP/1.0 clients (RFC 9110 section 10.1.1).
//! * `CONNECT` is answered `405 Method Not Allowed` (`sluice-error:
//!   method-not-allowed`, with an `Allow` header) and the connection closed:
//!   Sluice is a reverse proxy and does not tunnel.
//! * Only `Transfer-Encoding: chunked` is accepted; other codings are 400.
//! * For an absolute-form target the `Uri` carries the authority; the Host
//!   header is kept as sent (it must still be present and single).
//! * Only the request head is timed here (`header_timeout`); reading the
//!   body and running the handler are bounded by the proxy's request timeout.

mod body;
mod conn;
pub mod parse;
mod write;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

pub use body::{BodyError, RequestBody};

/// The chunked decoder's pieces and field-value trimming, shared with the
/// upstream client.
pub(crate) mod chunked {
    pub(crate) use super::body::{clamp, find, frame, parse_trailers, Chunk};
    pub(crate) use super::parse::{decimal, trim_ows};
    pub(crate) use super::write::put_chunk_size;
}

use crate::proxy::timer;
use conn::{give_buf, lock, Continue, Shared};
use parse::{Framing, Reject};
use write::{Outcome, RequestInfo};

/// Boxed error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long, after a response, the connection waits for an unread request
/// body to be finished by its holder or drained by us.
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// The most request-body bytes drained to keep a connection reusable.
const DRAIN_MAX: usize = 64 * 1024;
/// Bounds on reading what a refused client still sends before closing.
const LINGER_TIME: Duration = Duration::from_millis(500);
const LINGER_MAX: usize = 256 * 1024;

/// Limits and timeouts of one HTTP/1 connection.
#[derive(Debug, Clone)]
pub struct H1Settings {
    /// From the first byte of a request head to its end; over it the client
    /// gets 408 and the connection closes.
    pub header_timeout: Duration,
    /// Keep-alive: how long to wait for the first byte of the next request
    /// before closing silently.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers); over it 431, or 414
    /// when the request line alone is longer. Also bounds chunked trailers.
    pub max_head_bytes: usize,
    /// Most header fields in a head; over it 431. Also bounds trailers.
    /// Up to 128 are parsed without a heap allocation.
    pub max_headers: usize,
}

impl Default for H1Settings {
    /// 10 s header timeout, 60 s idle timeout, 64 KiB heads, 100 headers.
    fn default() -> Self {
        H1Settings {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_head_bytes: 64 * 1024,
            max_headers: 100,
        }
    }
}

/// A transport the codec can wait on without a buffer.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when a read would make progress (data, end of stream or an
    /// error). A wrapper that buffers (TLS) must report its buffered
    /// plaintext as ready. A spurious wake-up is harmless: the codec then
    /// reads, gets `Pending`, and waits again.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Whether an idle connection on this transport can be parked: a plain
    /// TCP socket can, TLS cannot (its session state lives outside the
    /// socket).
    fn parkable(&self) -> bool {
        false
    }

    /// The plain TCP socket under a [parkable](Self::parkable) transport,
    /// off the reactor, for an idle connection to be parked.
    fn into_parkable(self: Box<Self>) -> Option<std::net::TcpStream> {
        None
    }
}

impl Transport for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn parkable(&self) -> bool {
        true
    }

    fn into_parkable(self: Box<Self>) -> Option<std::net::TcpStream> {
        // A socket that cannot be deregistered is closed instead.
        (*self).into_std().ok()
    }
}

/// A response's header fields already in HTTP/1.1 wire form, for a
/// response relayed from an HTTP/1.1 backend: written as they are instead
/// of through a `HeaderMap`.
#[derive(Debug, Clone)]
pub struct EncodedFields {
    /// `name: value\r\n` lines, without framing or hop-by-hop fields.
    pub lines: Bytes,
    /// The response's declared Content-Length (not among `lines`).
    pub content_length: Option<u64>,
}

/// A response body that may carry its response's header fields encoded
/// ([`EncodedFields`]); when it does, the response's `HeaderMap` is empty.
pub trait ResponseFields {
    fn take_encoded_fields(&mut self) -> Option<EncodedFields> {
        None
    }
}

impl ResponseFields for RequestBody {}
impl ResponseFields for http_body_util::Full<Bytes> {}
impl ResponseFields for http_body_util::Empty<Bytes> {}
impl<D, E> ResponseFields for http_body_util::combinators::BoxBody<D, E> {}

/// A bidirectional byte stream: what an upgraded upstream connection is.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Response extension carrying the upstream's upgraded stream.
///
/// A handler answering `101 Switching Protocols` puts one in the response's
/// extensions; [`serve_connection`] takes the stream out, writes the 101 and
/// copies bytes both ways between client and upstream until both sides
/// close. A 101 without it (or to a request that did not ask to upgrade) is
/// answered 502 instead.
#[derive(Clone)]
pub struct UpgradeIo(Arc<Mutex<Option<Box<dyn Io>>>>);

impl UpgradeIo {
    pub fn new(io: impl Io + 'static) -> Self {
        UpgradeIo(Arc::new(Mutex::new(Some(Box::new(io)))))
    }

    /// Takes the stream; `None` if it was already taken.
    pub fn take(&self) -> Option<Box<dyn Io>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl fmt::Debug for UpgradeIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpgradeIo")
    }
}

/// Why [`serve_connection`] ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("client connection failed")]
    Io(#[source] io::Error),
    /// The request was refused with a generated response (400, 405, 408,
    /// 414, 431, 505) and the connection closed; the handler never saw it.
    #[error("request refused with {status} ({reason}): {detail}")]
    Rejected {
        status: StatusCode,
        /// The `sluice-error` value sent.
        reason: &'static str,
        detail: &'static str,
    },
    #[error("client closed the connection in the middle of a request head")]
    IncompleteHead,
    /// The handler's response could not be sent (a 1xx, or a 101 without
    /// [`UpgradeIo`]); the client got a 502.
    #[error("handler response not sendable: {reason}")]
    InvalidResponse { reason: &'static str },
    /// The response body failed; the response was cut short and the
    /// connection closed.
    #[error("response body failed")]
    ResponseBody(#[source] BoxError),
    #[error("upgraded connection failed")]
    Upgrade(#[source] io::Error),
}

impl From<Reject> for ServeError {
    fn from(r: Reject) -> Self {
        ServeError::Rejected {
            status: r.status,
            reason: r.reason,
            detail: r.detail,
        }
    }
}

/// Serves HTTP/1.0 and HTTP/1.1 requests on `io` until the client closes,
/// the idle timeout passes, `shutdown` is cancelled, or an error.
///
/// Each request is validated (SPEC section 3, "Limits and bad input") before
/// `handler` is called; a refused one gets a generated response and closes
/// the connection (`Err(ServeError::Rejected)`). Requests on one connection
/// are handled one at a time, in order (pipelined ones included). The
/// handler's future runs inside this one; the response may stream while the
/// request body is still being read. The response is framed with its
/// Content-Length, the body's exact size hint, chunked (HTTP/1.1) or by
/// closing (HTTP/1.0); a body that ends short of or runs past its length
/// closes the connection.
///
/// Shutdown: while idle the connection closes at once; a request in progress,
/// or one whose bytes are already waiting, is finished and answered with
/// `connection: close`.
///
/// Returns `Ok(())` on a clean close by the client, an idle timeout or a
/// shutdown.
pub async fn serve_connection<T, H, Fut, B>(
    io: T,
    settings: &H1Settings,
    shutdown: CancellationToken,
    handler: H,
) -> Result<(), ServeError>
where
    T: Transport,
    H: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: http_body::Body<Data = Bytes> + ResponseFields,
    B::Error: Into<BoxError>,
{
    serve_connection_parkable(io, BytesMut::new(), settings, shutdown, handler, &())
        .await
        .map(|_| ())
}

/// What [`serve_connection_parkable`] (and the HTTP/2 codec's
/// `serve_connection`, which never parks) asks of its caller, and tells
/// it, besides the requests themselves. `()` never parks and hears nothing.
pub trait Hooks: Sync {
    /// How long a connection may wait for its next request before it is
    /// handed back as [`Ended::Parked`]; `None` never. Asked each time the
    /// connection goes idle.
    fn park_after(&self) -> Option<Duration> {
        None
    }

    /// A request refused with a generated response (400, 408, 431, ...),
    /// heard before that response is written, so a client that has read it
    /// finds the refusal already counted.
    fn refused(&self, _status: u16, _reason: &'static str) {}
}

impl Hooks for () {}

/// How [`serve_connection_parkable`] ended, other than by an error.
#[derive(Debug)]
pub enum Ended {
    /// Closed by the client, the idle timeout or a shutdown.
    Closed,
    /// Idle between requests for as long as [`Hooks::park_after`] said, with no
    /// unread byte: the socket, deregistered from the reactor, for the
    /// caller to park (see `proxy::park`), and how long it has been idle.
    Parked {
        socket: std::net::TcpStream,
        idle: Duration,
    },
}

/// [`serve_connection`], where a connection whose transport is a plain
/// `TcpStream` and that waits for its next request for as long as
/// [`Hooks::park_after`] says is handed back as [`Ended::Parked`] instead of
/// keeping its task, and each refused request is told to
/// [`Hooks::refused`]. `first` holds bytes already read from the connection
/// (the start of the first request).
pub async fn serve_connection_parkable<T, H, Fut, B>(
    io: T,
    first: BytesMut,
    settings: &H1Settings,
    shutdown: CancellationToken,
    mut handler: H,
    hooks: &dyn Hooks,
) -> Result<Ended, ServeError>
where
    T: Transport,
    H: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: http_body::Body<Data = Bytes> + ResponseFields,
    B::Error: Into<BoxError>,
{
    let parkable = io.parkable();
    let io: Box<dyn Transport> = Box::new(io);
    let mut state = conn::Conn::new(io, settings.max_head_bytes, settings.max_headers);
    state.rbuf = first;
    let conn: Shared = Arc::new(Mutex::new(state));
    let mut wbuf = BytesMut::new();
    let res = serve(
        &conn,
        &mut wbuf,
        settings,
        &shutdown,
        &mut handler,
        hooks,
        parkable,
    )
    .await;
    give_buf(wbuf);
    // Take the transport out so it closes now, even if a RequestBody is still
    // held somewhere; that body then fails with `BodyError::Aborted`.
    let (io, unread) = {
        let mut c = lock(&conn);
        if !c.body.is_done() {
            c.body = body::Decoder::Failed;
        }
        let unread = !c.body.is_done() || !c.rbuf.is_empty();
        give_buf(std::mem::take(&mut c.rbuf));
        (c.io.take(), unread)
    };
    let Some(io) = io else {
        return res.map(|_| Ended::Closed);
    };
    if let Ok(Arrival::Park(idle)) = res {
        return Ok(match io.into_parkable() {
            Some(socket) => Ended::Parked { socket, idle },
            None => Ended::Closed,
        });
    }
    close(io, unread).await;
    res.map(|_| Ended::Closed)
}

/// Closes the transport: our side first, then (when the client may still be
/// sending) reads and discards for a moment so the kernel does not answer
/// its data with a reset that could destroy our last response in flight.
async fn close(mut io: Box<dyn Transport>, linger: bool) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        if io.shutdown().await.is_err() || !linger {
            return;
        }
        let mut buf = conn::take_buf();
        let mut total = 0;
        while total < LINGER_MAX {
            buf.clear();
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        give_buf(buf);
    })
    .await;
}

/// How [`serve`] ended without an error.
enum Arrival {
    Closed,
    /// Idle for this long: `park_after`.
    Park(Duration),
}

async fn serve<H, Fut, B>(
    conn: &Shared,
    wbuf: &mut BytesMut,
    settings: &H1Settings,
    shutdown: &CancellationToken,
    handler: &mut H,
    hooks: &dyn Hooks,
    parkable: bool,
) -> Result<Arrival, ServeError>
where
    H: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: http_body::Body<Data = Bytes> + ResponseFields,
    B::Error: Into<BoxError>,
{
    // One timer and one shutdown wait serve all the idle waits of the
    // connection, so a keep-alive request registers neither anew.
    // The timer is made by the first wait: a connection that closes after
    // its first request never needs one.
    let mut idle = pin!(None::<Sleep>);
    let mut stopping = pin!(shutdown.cancelled());
    loop {
        let has_leftover = {
            let mut c = lock(conn);
            let has = !c.rbuf.is_empty();
            if !has {
                // Idle: hold no buffer while waiting.
                give_buf(std::mem::take(&mut c.rbuf));
            }
            has
        };
        if !has_leftover {
            give_buf(std::mem::take(wbuf));
            // Parking is for waits shorter than the idle timeout.
            let park = hooks
                .park_after()
                .filter(|p| parkable && *p < settings.idle_timeout);
            let limit = park.unwrap_or(settings.idle_timeout);
            match wait_for_request(conn, stopping.as_mut(), idle.as_mut(), limit).await {
                Wait::Data => {}
                Wait::Elapsed => {
                    return Ok(match park {
                        Some(idle) => Arrival::Park(idle),
                        None => Arrival::Closed,
                    })
                }
                Wait::Closed | Wait::Stopped => return Ok(Arrival::Closed),
                Wait::Failed(e) => return Err(ServeError::Io(e)),
            }
        }

        // The request's own state lives in a box that is freed when it is
        // answered, so an idle connection's task holds only the small state
        // of the wait above. Allocated first and written in place: built
        // on the stack and then boxed, its 3.4 KiB would be copied once
        // per request.
        let step = Box::into_pin(Box::write(
            Box::new_uninit(),
            serve_request(conn, wbuf, settings, shutdown, handler, hooks),
        ))
        .await?;
        if let Step::Close = step {
            return Ok(Arrival::Closed);
        }
    }
}

/// What happens to the connection after a request.
enum Step {
    KeepAlive,
    Close,
}

/// Reads, dispatches and answers one request whose first bytes have arrived.
async fn serve_request<H, Fut, B>(
    conn: &Shared,
    wbuf: &mut BytesMut,
    settings: &H1Settings,
    shutdown: &CancellationToken,
    handler: &mut H,
    hooks: &dyn Hooks,
) -> Result<Step, ServeError>
where
    H: FnMut(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: http_body::Body<Data = Bytes> + ResponseFields,
    B::Error: Into<BoxError>,
{
    let head = match read_head(conn, settings).await {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(Step::Close),
        Err(HeadError::Io(e)) => return Err(ServeError::Io(e)),
        Err(HeadError::Incomplete) => return Err(ServeError::IncompleteHead),
        Err(HeadError::Reject(reject)) => {
            tracing::debug!(
                status = reject.status.as_u16(),
                reason = reject.reason,
                detail = reject.detail,
                "refused request"
            );
            hooks.refused(reject.status.as_u16(), reject.reason);
            write::write_generated(conn, wbuf, &reject)
                .await
                .map_err(ServeError::Io)?;
            return Err(reject.into());
        }
    };

    let expect_continue =
        head.expect_continue && head.version == Version::HTTP_11 && head.framing != Framing::Empty;
    let body = {
        let mut c = lock(conn);
        c.seq = c.seq.wrapping_add(1);
        c.body = match head.framing {
            Framing::Empty => body::Decoder::Done,
            Framing::Length(n) => body::Decoder::Length { remaining: n },
            Framing::Chunked => body::Decoder::chunked(),
        };
        c.body_alive = head.framing != Framing::Empty;
        c.cont = if expect_continue {
            Continue::Pending
        } else {
            Continue::NotExpected
        };
        c.response_started = false;
        match head.framing {
            Framing::Empty => RequestBody::empty(),
            Framing::Length(n) => RequestBody::stream(conn.clone(), c.seq, Some(n)),
            Framing::Chunked => RequestBody::stream(conn.clone(), c.seq, None),
        }
    };
    let info = RequestInfo {
        version: head.version,
        is_head: head.method == http::Method::HEAD,
        upgrade: head.upgrade,
        keep_alive: head.keep_alive,
    };
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = head.uri;
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers;

    let response = handler(request).await;
    let info = RequestInfo {
        keep_alive: info.keep_alive && !shutdown.is_cancelled(),
        ..info
    };
    match write::write_response(conn, wbuf, response, info).await? {
        Outcome::KeepAlive => {}
        Outcome::Close => return Ok(Step::Close),
        Outcome::Upgrade(upstream) => {
            run_upgrade(conn, upstream).await?;
            return Ok(Step::Close);
        }
    }
    if !finish_request_body(conn, expect_continue).await || shutdown.is_cancelled() {
        return Ok(Step::Close);
    }
    Ok(Step::KeepAlive)
}

/// How the wait for a request's first bytes ended.
enum Wait {
    Data,
    /// The client closed.
    Closed,
    /// Nothing arrived within the limit.
    Elapsed,
    /// Shutdown, with no byte waiting.
    Stopped,
    Failed(io::Error),
}

/// Waits, holding no buffer, for the next request's first bytes, at most
/// `limit`.
///
/// `idle` is the connection's one timer, moved lazily (`proxy::timer`): a
/// keep-alive connection touches the runtime's timer wheel about once per
/// `limit`, not once per request.
async fn wait_for_request(
    conn: &Shared,
    mut stopping: Pin<&mut WaitForCancellationFuture<'_>>,
    mut idle: Pin<&mut Option<Sleep>>,
    limit: Duration,
) -> Wait {
    let deadline = Instant::now() + limit;
    match idle.as_mut().as_pin_mut() {
        Some(timer) => timer::arm(timer, deadline),
        None => idle.set(Some(tokio::time::sleep_until(deadline))),
    }
    let arrival = async {
        loop {
            poll_fn(|cx| lock(conn).io()?.get_mut().poll_read_ready(cx)).await?;
            // Readiness can be stale; a read that would block puts the
            // buffer back and waits again.
            let read = poll_fn(|cx| {
                let mut c = lock(conn);
                match c.poll_fill(cx, conn::BUF_INIT) {
                    Poll::Pending => {
                        give_buf(std::mem::take(&mut c.rbuf));
                        Poll::Ready(None)
                    }
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                }
            })
            .await;
            match read {
                None => continue,
                Some(Ok(0)) => return Ok(Wait::Closed),
                Some(Ok(_)) => return Ok(Wait::Data),
                Some(Err(e)) => return Err(e),
            }
        }
    };
    let elapsed = poll_fn(|cx| match idle.as_mut().as_pin_mut() {
        Some(timer) => timer::poll_deadline(timer, deadline, cx),
        // Set above.
        None => Poll::Pending,
    });
    // A request that has already arrived is served (and answered with
    // `connection: close`) rather than cut off by a shutdown: closing with
    // its bytes unread would reset the connection under the client.
    tokio::select! {
        biased;
        r = arrival => r.unwrap_or_else(Wait::Failed),
        () = stopping.as_mut() => Wait::Stopped,
        () = elapsed => Wait::Elapsed,
    }
}

enum HeadError {
    Io(io::Error),
    Incomplete,
    Reject(Reject),
}

/// Reads until a whole head is parsed. `Ok(None)`: the client closed with
/// nothing but blank lines sent.
async fn read_head(conn: &Shared, settings: &H1Settings) -> Result<Option<parse::Head>, HeadError> {
    let mut scanned = 0;
    let mut deadline = None;
    loop {
        {
            let mut c = lock(conn);
            if let Some(head) =
                parse::parse_head(&mut c.rbuf, &mut scanned, settings).map_err(HeadError::Reject)?
            {
                return Ok(Some(head));
            }
        }
        // The first bytes are already here, so the clock starts now.
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + settings.header_timeout);
        let read = poll_fn(|cx| {
            let mut c = lock(conn);
            // Grow by doubling, up to just past the limit (enough to see it crossed).
            let want = c.rbuf.capacity().max(conn::BUF_INIT);
            let room = (settings.max_head_bytes + 1).saturating_sub(c.rbuf.len());
            c.poll_fill(cx, want.min(room.max(1)))
        });
        match tokio::time::timeout_at(deadline, read).await {
            Err(_) => return Err(HeadError::Reject(Reject::timeout())),
            Ok(Err(e)) => return Err(HeadError::Io(e)),
            Ok(Ok(0)) => {
                let blank = lock(conn).rbuf.iter().all(|&b| b == b'\r' || b == b'\n');
                return if blank {
                    Ok(None)
                } else {
                    Err(HeadError::Incomplete)
                };
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// After the response: makes sure the request body is consumed so the next
/// request can be read. Waits (bounded) for a body still held elsewhere,
/// then drains up to [`DRAIN_MAX`]. `false`: the connection must close.
async fn finish_request_body(conn: &Shared, expect_continue: bool) -> bool {
    {
        let c = lock(conn);
        if c.body.is_done() {
            return true;
        }
        // The client is waiting for a 100 Continue it never got; it may
        // never send the body.
        if expect_continue && c.cont != Continue::Sent {
            return false;
        }
    }
    let finish = async {
        poll_fn(|cx| {
            let mut c = lock(conn);
            if c.body.is_done() || !c.body_alive {
                return Poll::Ready(());
            }
            if !c
                .conn_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                c.conn_waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        let mut drained = 0;
        poll_fn(|cx| {
            let mut c = lock(conn);
            loop {
                match c.poll_body(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(true),
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
                    Poll::Ready(Some(Ok(frame))) => {
                        drained += frame.data_ref().map_or(0, Bytes::len);
                        if drained > DRAIN_MAX {
                            return Poll::Ready(false);
                        }
                    }
                }
            }
        })
        .await
    };
    tokio::time::timeout(DRAIN_TIME, finish)
        .await
        .unwrap_or(false)
}

/// Copies bytes both ways between the client and the upgraded upstream,
/// bytes the client sent after its request head first.
async fn run_upgrade(conn: &Shared, mut upstream: Box<dyn Io>) -> Result<(), ServeError> {
    let (client, leftover) = {
        let mut c = lock(conn);
        (c.io.take(), std::mem::take(&mut c.rbuf))
    };
    let Some(mut client) = client else {
        return Ok(());
    };
    if !leftover.is_empty() {
        upstream
            .write_all(&leftover)
            .await
            .map_err(ServeError::Upgrade)?;
    }
    give_buf(leftover);
    tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .map_err(ServeError::Upgrade)?;
    Ok(())
}
