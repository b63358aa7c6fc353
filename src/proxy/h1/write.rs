//! Response encoding: the status line and headers, body framing
//! (Content-Length, chunked with trailers, or close-delimited for HTTP/1.0),
//! and our generated error responses.
//!
//! Small pieces are coalesced in one write buffer so a small response goes
//! out in a single write; a large data frame is written with a vectored write
//! next to what is buffered instead of being copied.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::pin;
use std::task::{ready, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderValue, Response, StatusCode, Version};
use http_body::Body;

use super::conn::{lock, take_buf, Shared};
use super::parse::{trim_ows, Reject};
use super::{BoxError, Io, ResponseFields, ServeError, UpgradeIo};

/// Data frames up to this size are copied into the write buffer.
const COPY_MAX: usize = 4 * 1024;
/// The write buffer is written out once it holds this much.
const WBUF_HIGH: usize = 16 * 1024;

/// What the writer needs to know about the request being answered.
pub(crate) struct RequestInfo {
    pub version: Version,
    pub is_head: bool,
    /// The client's `Upgrade` value when it asked for one.
    pub upgrade: Option<HeaderValue>,
    /// Everything so far allows reusing the connection.
    pub keep_alive: bool,
}

/// What to do with the connection once the response is out.
pub(crate) enum Outcome {
    KeepAlive,
    Close,
    /// A 101 was written; the connection now carries the upgraded protocol.
    Upgrade(Box<dyn Io>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Writes `parts` in order, all of them, under the lock one poll at a time.
pub(crate) async fn write_all(conn: &Shared, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    poll_fn(|cx| {
        let mut c = lock(conn);
        ready!(c.poll_start_response(cx))?;
        let mut io = c.io()?;
        while !a.is_empty() || !b.is_empty() {
            let n = if b.is_empty() {
                ready!(io.as_mut().poll_write(cx, a))?
            } else if a.is_empty() {
                ready!(io.as_mut().poll_write(cx, b))?
            } else {
                let bufs = [IoSlice::new(a), IoSlice::new(b)];
                ready!(io.as_mut().poll_write_vectored(cx, &bufs))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_a = n.min(a.len());
            a = &a[from_a..];
            b = &b[n - from_a..];
        }
        io.as_mut().poll_flush(cx)
    })
    .await
}

/// Writes out and clears the write buffer.
async fn flush_buf(conn: &Shared, wbuf: &mut BytesMut) -> io::Result<()> {
    write_all(conn, wbuf, &[]).await?;
    wbuf.clear();
    Ok(())
}

/// Writes the handler's response. The body is polled without the lock held,
/// so it may itself read the request body.
pub(crate) async fn write_response<B>(
    conn: &Shared,
    wbuf: &mut BytesMut,
    res: Response<B>,
    req: RequestInfo,
) -> Result<Outcome, ServeError>
where
    B: Body<Data = Bytes> + ResponseFields,
    B::Error: Into<BoxError>,
{
    let (mut parts, mut body) = res.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        return write_upgrade(conn, wbuf, parts, req).await;
    }
    if parts.status.is_informational() {
        return Err(invalid(conn, wbuf, "invalid-response", "1xx final response").await);
    }

    let encoded = body.take_encoded_fields();
    let no_body = req.is_head
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let mut extra = Extra::default();
    // Fields in the map (all of them, or those the handler added to
    // encoded ones) can still ask to close.
    let mut keep_alive = req.keep_alive && !has_close(&parts.headers);
    if !parts.headers.is_empty() {
        for name in [CONNECTION, TRANSFER_ENCODING] {
            parts.headers.remove(name);
        }
        parts.headers.remove("keep-alive");
    }
    let declared = match &encoded {
        // Relayed fields: framing and hop-by-hop fields are already out,
        // and the length is written by us.
        Some(fields) => fields
            .content_length
            .filter(|_| parts.status != StatusCode::NO_CONTENT)
            .map(|n| (n, false)),
        None => {
            if parts.status == StatusCode::NO_CONTENT {
                parts.headers.remove(CONTENT_LENGTH);
            }
            declared_length(&mut parts.headers)
        }
    };
    let framing = if no_body {
        // A HEAD or 304 answer keeps the length it declares.
        if let Some((n, false)) = declared {
            extra.length = Some(n);
        }
        Framing::None
    } else if let Some((n, keep)) = declared {
        if !keep {
            extra.length = Some(n);
        }
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        extra.length = Some(n);
        Framing::Length(n)
    } else if req.version == Version::HTTP_11 {
        extra.chunked = true;
        Framing::Chunked
    } else {
        keep_alive = false;
        Framing::Close
    };
    if framing != Framing::Chunked {
        parts.headers.remove(TRAILER);
    }
    if !keep_alive {
        extra.connection = Some("close");
    } else if req.version == Version::HTTP_10 {
        extra.connection = Some("keep-alive");
    }

    if wbuf.capacity() == 0 {
        *wbuf = take_buf();
    }
    match &encoded {
        Some(fields) => encode_head_with(wbuf, parts.status, &fields.lines, &parts.headers, &extra),
        None => encode_head(wbuf, parts.status, &parts.headers, &extra),
    }
    let complete = match framing {
        Framing::None | Framing::Length(0) => {
            // Dropped before the flush, like a body that ran to its end,
            // so whatever it records when it ends is recorded before the
            // client can read the response.
            drop(body);
            true
        }
        _ => write_body(conn, wbuf, body, framing).await?,
    };
    flush_buf(conn, wbuf).await.map_err(ServeError::Io)?;
    Ok(if keep_alive && complete {
        Outcome::KeepAlive
    } else {
        Outcome::Close
    })
}

/// Streams the body. Returns whether the framing ended cleanly (a body that
/// ran short of or past its Content-Length leaves the connection unusable).
async fn write_body<B>(
    conn: &Shared,
    wbuf: &mut BytesMut,
    body: B,
    framing: Framing,
) -> Result<bool, ServeError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    enum Step<F> {
        Frame(F),
        Flush,
    }
    let mut body = pin!(body);
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        if body.is_end_stream() {
            break;
        }
        // Flush what is buffered only when the body has nothing ready, so
        // frames that are ready together go out together.
        let step = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Pending if !wbuf.is_empty() => Poll::Ready(Step::Flush),
            Poll::Pending => Poll::Pending,
            // Boxed here so the body's error type need not be `Send`.
            Poll::Ready(frame) => Poll::Ready(Step::Frame(frame.map(|f| f.map_err(Into::into)))),
        })
        .await;
        let frame = match step {
            Step::Flush => {
                flush_buf(conn, wbuf).await.map_err(ServeError::Io)?;
                continue;
            }
            Step::Frame(None) => break,
            Step::Frame(Some(Err(e))) => return Err(ServeError::ResponseBody(e)),
            Step::Frame(Some(Ok(frame))) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Framing::Chunked, Ok(trailers)) = (framing, frame.into_trailers()) {
                    wbuf.put_slice(b"0\r\n");
                    encode_fields(wbuf, &trailers);
                    wbuf.put_slice(b"\r\n");
                    return Ok(true);
                }
                continue;
            }
        };
        if data.is_empty() {
            // An empty chunk would end a chunked body early.
            continue;
        }
        let overflow = data.len() as u64 > remaining;
        if overflow {
            data.truncate(usize::try_from(remaining).unwrap_or(usize::MAX));
        }
        if remaining == 0 {
            return Ok(false);
        }
        remaining -= data.len() as u64;
        if framing == Framing::Chunked {
            put_chunk_size(wbuf, data.len());
        }
        if data.len() <= COPY_MAX {
            wbuf.put_slice(&data);
        } else {
            write_all(conn, wbuf, &data).await.map_err(ServeError::Io)?;
            wbuf.clear();
        }
        if framing == Framing::Chunked {
            wbuf.put_slice(b"\r\n");
        }
        if wbuf.len() >= WBUF_HIGH {
            flush_buf(conn, wbuf).await.map_err(ServeError::Io)?;
        }
        if overflow {
            return Ok(false);
        }
    }
    Ok(match framing {
        Framing::Chunked => {
            wbuf.put_slice(b"0\r\n\r\n");
            true
        }
        Framing::Length(_) => remaining == 0,
        Framing::None | Framing::Close => true,
    })
}

/// Writes a 101 and hands over the upstream's upgraded stream.
async fn write_upgrade(
    conn: &Shared,
    wbuf: &mut BytesMut,
    mut parts: http::response::Parts,
    req: RequestInfo,
) -> Result<Outcome, ServeError> {
    let Some(protocol) = req.upgrade.filter(|_| req.version == Version::HTTP_11) else {
        return Err(invalid(
            conn,
            wbuf,
            "invalid-response",
            "101 to a request without upgrade",
        )
        .await);
    };
    let body_done = lock(conn).body.is_done();
    let upstream = parts
        .extensions
        .get::<UpgradeIo>()
        .and_then(UpgradeIo::take);
    let (Some(upstream), true) = (upstream, body_done) else {
        return Err(invalid(
            conn,
            wbuf,
            "upgrade-failed",
            "101 without an upgraded stream",
        )
        .await);
    };
    for name in [TRANSFER_ENCODING, CONTENT_LENGTH] {
        parts.headers.remove(name);
    }
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.entry(UPGRADE).or_insert(protocol);
    if wbuf.capacity() == 0 {
        *wbuf = take_buf();
    }
    encode_head(wbuf, parts.status, &parts.headers, &Extra::default());
    flush_buf(conn, wbuf).await.map_err(ServeError::Io)?;
    Ok(Outcome::Upgrade(upstream))
}

/// Answers 502 for a response we cannot send, and reports it.
async fn invalid(
    conn: &Shared,
    wbuf: &mut BytesMut,
    reason: &'static str,
    detail: &'static str,
) -> ServeError {
    let reject = Reject {
        status: StatusCode::BAD_GATEWAY,
        reason,
        detail,
    };
    if let Err(e) = write_generated(conn, wbuf, &reject).await {
        return ServeError::Io(e);
    }
    ServeError::InvalidResponse { reason: detail }
}

/// Writes a generated error response (`sluice-error`, short text body,
/// `connection: close`).
pub(crate) async fn write_generated(
    conn: &Shared,
    wbuf: &mut BytesMut,
    reject: &Reject,
) -> io::Result<()> {
    if wbuf.capacity() == 0 {
        *wbuf = take_buf();
    }
    wbuf.clear();
    let reason = reject.status.canonical_reason().unwrap_or("Error");
    let body_len = reason.len() + 2 + reject.detail.len() + 1;
    put_status_line(wbuf, reject.status);
    wbuf.put_slice(b"sluice-error: ");
    wbuf.put_slice(reject.reason.as_bytes());
    wbuf.put_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\n");
    if reject.status == StatusCode::METHOD_NOT_ALLOWED {
        wbuf.put_slice(b"allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE\r\n");
    }
    wbuf.put_slice(b"content-length: ");
    wbuf.put_slice(itoa::Buffer::new().format(body_len).as_bytes());
    wbuf.put_slice(b"\r\nconnection: close\r\n\r\n");
    wbuf.put_slice(reason.as_bytes());
    wbuf.put_slice(b": ");
    wbuf.put_slice(reject.detail.as_bytes());
    wbuf.put_slice(b"\n");
    flush_buf(conn, wbuf).await
}

/// `HTTP/1.1` is always our version: RFC 9110 section 6.2 has a server send
/// its own, with framing an HTTP/1.0 client understands.
fn put_status_line(wbuf: &mut BytesMut, status: StatusCode) {
    wbuf.put_slice(b"HTTP/1.1 ");
    wbuf.put_slice(status.as_str().as_bytes());
    wbuf.put_u8(b' ');
    wbuf.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.put_slice(b"\r\n");
}

/// Framing fields the writer adds itself, written straight into the buffer
/// (no `HeaderValue` to allocate).
#[derive(Default)]
struct Extra {
    length: Option<u64>,
    chunked: bool,
    connection: Option<&'static str>,
}

fn encode_head(wbuf: &mut BytesMut, status: StatusCode, headers: &HeaderMap, extra: &Extra) {
    put_status_line(wbuf, status);
    encode_fields(wbuf, headers);
    put_extra(wbuf, extra);
}

/// [`encode_head`] with the fields already encoded, plus any the handler
/// added to the (otherwise empty) map.
fn encode_head_with(
    wbuf: &mut BytesMut,
    status: StatusCode,
    lines: &[u8],
    added: &HeaderMap,
    extra: &Extra,
) {
    put_status_line(wbuf, status);
    wbuf.put_slice(lines);
    encode_fields(wbuf, added);
    put_extra(wbuf, extra);
}

fn put_extra(wbuf: &mut BytesMut, extra: &Extra) {
    if let Some(n) = extra.length {
        wbuf.put_slice(b"content-length: ");
        wbuf.put_slice(itoa::Buffer::new().format(n).as_bytes());
        wbuf.put_slice(b"\r\n");
    }
    if extra.chunked {
        wbuf.put_slice(b"transfer-encoding: chunked\r\n");
    }
    if let Some(c) = extra.connection {
        wbuf.put_slice(b"connection: ");
        wbuf.put_slice(c.as_bytes());
        wbuf.put_slice(b"\r\n");
    }
    wbuf.put_slice(b"\r\n");
}

fn encode_fields(wbuf: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        wbuf.put_slice(name.as_str().as_bytes());
        wbuf.put_slice(b": ");
        wbuf.put_slice(value.as_bytes());
        wbuf.put_slice(b"\r\n");
    }
}

/// Writes a chunk-size line for `len` bytes.
pub(crate) fn put_chunk_size(wbuf: &mut BytesMut, len: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    wbuf.put_slice(&digits[i..]);
    wbuf.put_slice(b"\r\n");
}

/// The response asks for the connection to close.
fn has_close(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| trim_ows(t).eq_ignore_ascii_case(b"close"))
    })
}

/// The response's own Content-Length and whether its field can stay as is
/// (one valid value). Identical duplicates are removed and the length is
/// written by us; an invalid or conflicting field is removed and the framing
/// is chosen as if it were absent.
fn declared_length(headers: &mut HeaderMap) -> Option<(u64, bool)> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let first = values.next()?;
    let parsed = Some(trim_ows(first.as_bytes()))
        .filter(|s| !s.is_empty() && s.iter().all(|b| b.is_ascii_digit()))
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u64>().ok());
    let mut single = true;
    let mut consistent = true;
    for v in values {
        single = false;
        consistent &= v == first;
    }
    match parsed {
        Some(n) if single => Some((n, true)),
        Some(n) if consistent => {
            headers.remove(CONTENT_LENGTH);
            Some((n, false))
        }
        _ => {
            headers.remove(CONTENT_LENGTH);
            None
        }
    }
}
