//! Sluice's own HTTP/1.1 client for backends.
//!
//! A request is written and its response read by the task of the request
//! itself, on a connection it takes from the backend's [`Pool`] and puts
//! back when the response body has been read to the end. There is no
//! connection task and no channel between the request and its connection:
//! per request that saves two task wake-ups, the channel allocations, and
//! the hashed pool lookup of a general-purpose client.
//!
//! * `head.rs`: the request head out, the response head in, framing rules.
//! * `body.rs`: the request body upload and the response body decoder.
//! * `pool.rs`: the idle connections.
//!
//! A pooled connection the backend closed while it sat idle is normally
//! seen before use (see `pool.rs`); if it fails before any byte of the
//! response arrives and before any of the request body has been taken from
//! the client, the request goes once more, on a new connection. Upstreams
//! speaking HTTP/2 (`protocol = "h2"`, or `auto` over TLS) use hyper's
//! client instead.

mod body;
pub mod head;
mod pool;

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Poll};

use bytes::{Buf, BytesMut};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body::Body as _;
use tokio::io::AsyncWrite;
use tokio::time::Instant;

pub use body::{ExchangeError, ResponseBody};
pub use pool::Pool;

use crate::proxy::body::RequestBody;
use crate::proxy::buffers;
use crate::proxy::error::ProxyError;
use crate::proxy::forwarded::Forwarded;
use crate::proxy::h1::UpgradeIo;
use crate::proxy::prefixed::Prefixed;
use crate::proxy::timer;
use crate::upstream::client::{BackendStream, Connector, TryLimit};
use body::{poll_fill, Upload};
use head::{HeadError, RequestFraming, ResponseHead};

/// Room asked for by each read of a response head: enough for a head and
/// a 16 KiB body to arrive in one read.
const HEAD_READ: usize = buffers::BUF_LARGE;

/// The HTTP/1.1 client of one backend. Cloning it is cheap.
#[derive(Clone)]
pub struct H1Client {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<Pool>,
    connector: Connector,
    addr: SocketAddr,
    /// `addr` as written in a Host field.
    authority: Box<str>,
}

/// How an attempt on one connection failed.
struct Failed {
    error: ProxyError,
    /// Nothing of the response had arrived: on a reused connection this is
    /// the backend having closed it while idle, and the request can go again.
    before_response: bool,
}

impl H1Client {
    pub fn new(pool: Arc<Pool>, connector: Connector, addr: SocketAddr) -> Self {
        H1Client {
            inner: Arc::new(Inner {
                pool,
                connector,
                addr,
                authority: addr.to_string().into_boxed_str(),
            }),
        }
    }

    /// Idle connections pooled now.
    pub fn idle(&self) -> usize {
        self.inner.pool.idle()
    }

    /// Sends the request and returns the response head with a streaming
    /// body; for `101` no body but an [`UpgradeIo`] extension. The
    /// response's fields travel in wire form with the body instead of in a
    /// `HeaderMap` (1xx heads excepted). Fails with
    /// [`ProxyError::Timeout`] when the head has not arrived within `limit`.
    pub async fn send(
        self,
        parts: &Parts,
        forwarded: &Forwarded,
        body: RequestBody,
        limit: TryLimit,
    ) -> Result<Response<Option<ResponseBody>>, ProxyError> {
        let pool = &self.inner.pool;
        let deadline = limit.deadline();
        let mut timer = pool.timer(deadline);
        let answered = {
            let mut call = pin!(self.call(parts, forwarded, body, limit.start));
            poll_fn(|cx| {
                if let Poll::Ready(r) = call.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                ready!(timer::poll_deadline(timer.as_mut(), deadline, cx));
                Poll::Ready(None)
            })
            .await
        };
        pool.put_timer(timer);
        answered.unwrap_or_else(|| {
            Err(ProxyError::Timeout {
                addr: self.inner.addr,
                after: limit.after,
            })
        })
    }

    /// [`send`](Self::send) without its time limit.
    async fn call(
        &self,
        parts: &Parts,
        forwarded: &Forwarded,
        body: RequestBody,
        now: Instant,
    ) -> Result<Response<Option<ResponseBody>>, ProxyError> {
        let inner = &*self.inner;
        let addr = inner.addr;
        let mut wbuf = buffers::take();
        let framing = head::encode_request(
            &mut wbuf,
            parts,
            Some(forwarded),
            &inner.authority,
            body.is_end_stream(),
            body.size_hint().exact(),
        );
        let mut upload =
            (framing != RequestFraming::Empty).then(|| Box::new(Upload::new(body, framing)));
        let mut pooled = inner.pool.checkout(now);
        let (io, rbuf, head) = loop {
            let reused = pooled.is_some();
            let mut io = match pooled.take() {
                Some(io) => io,
                // Boxed: a new connection (and its TLS handshake) is the
                // rare case, and its state would otherwise make every
                // request's future larger.
                None => Box::pin(inner.connector.connect(addr))
                    .await
                    .map_err(|e| e.to_proxy_error(addr))?,
            };
            let mut rbuf = BytesMut::new();
            match exchange(&mut io, &wbuf, &mut upload, &mut rbuf, addr, &parts.method).await {
                Ok(head) => break (io, rbuf, head),
                Err(failed) => {
                    buffers::give(rbuf);
                    let untouched = upload.as_ref().is_none_or(|u| !u.started);
                    if reused && failed.before_response && untouched {
                        tracing::debug!(backend = %addr, error = %failed.error, "pooled connection was closed; sending on a new one");
                        continue;
                    }
                    buffers::give(wbuf);
                    return Err(failed.error);
                }
            }
        };
        buffers::give(wbuf);
        let upload = upload.filter(|u| !u.is_done());
        let ResponseHead {
            parts: head,
            len,
            framing,
            keep_alive,
            encoded,
        } = head;
        let mut rbuf = rbuf;
        rbuf.advance(len);
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            let upgraded = Prefixed::new(rbuf.split().freeze(), io);
            let mut response = Response::from_parts(head, None);
            response.extensions_mut().insert(UpgradeIo::new(upgraded));
            return Ok(response);
        }
        let body = ResponseBody::new(
            io,
            rbuf,
            framing,
            keep_alive,
            upload,
            Arc::clone(&inner.pool),
            encoded,
        );
        Ok(Response::from_parts(head, Some(body)))
    }
}

fn bad_response(addr: SocketAddr, e: HeadError) -> ProxyError {
    ProxyError::BadResponse {
        addr,
        source: Box::new(e),
    }
}

/// Writes the request head (and the body, as it comes) and reads until a
/// final response head has arrived (to a `method` request). 1xx interim
/// responses are skipped.
async fn exchange(
    io: &mut BackendStream,
    wbuf: &[u8],
    upload: &mut Option<Box<Upload>>,
    rbuf: &mut BytesMut,
    addr: SocketAddr,
    method: &Method,
) -> Result<ResponseHead, Failed> {
    let mut written = 0;
    let mut flushed = false;
    let mut got_bytes = false;
    let reset = |source: io::Error, before_response: bool| Failed {
        error: ProxyError::Reset {
            addr,
            source: Box::new(source),
        },
        before_response,
    };
    poll_fn(|cx| {
        while written < wbuf.len() {
            match Pin::new(&mut *io).poll_write(cx, &wbuf[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(reset(io::ErrorKind::WriteZero.into(), !got_bytes)))
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(reset(e, !got_bytes))),
                Poll::Pending => break,
            }
        }
        if written == wbuf.len() && !flushed {
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) => flushed = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(reset(e, !got_bytes))),
                Poll::Pending => {}
            }
        }
        if flushed {
            if let Some(up) = upload.as_mut().filter(|u| !u.is_done()) {
                match up.poll_send(cx, io) {
                    Poll::Pending | Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(
                        ExchangeError::RequestBody(_) | ExchangeError::RequestLength,
                    )) => {
                        return Poll::Ready(Err(Failed {
                            error: ProxyError::BadRequest {
                                what: "request body ended early",
                            },
                            before_response: false,
                        }))
                    }
                    Poll::Ready(Err(ExchangeError::Io(e))) => {
                        return Poll::Ready(Err(reset(e, !got_bytes)))
                    }
                    Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(reset(io::ErrorKind::BrokenPipe.into(), false)))
                    }
                }
            }
        }
        loop {
            if !rbuf.is_empty() {
                match head::parse_response(rbuf, method, true) {
                    Err(e) => {
                        return Poll::Ready(Err(Failed {
                            error: bad_response(addr, e),
                            before_response: false,
                        }))
                    }
                    Ok(Some(head))
                        if head.parts.status.is_informational()
                            && head.parts.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        rbuf.advance(head.len);
                        continue;
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                }
            }
            match ready!(poll_fill(io, cx, rbuf, HEAD_READ)) {
                Ok(0) => {
                    let closed = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the connection before the response head",
                    );
                    return Poll::Ready(Err(reset(closed, !got_bytes)));
                }
                Ok(_) => got_bytes = true,
                Err(e) => return Poll::Ready(Err(reset(e, !got_bytes))),
            }
        }
    })
    .await
}
