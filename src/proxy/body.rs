//! Body types of the HTTP pipeline.
//!
//! [`RequestBody`] is what goes to a backend: the downstream request body,
//! streamed as it arrives. [`ProxyBody`] is what goes back to the client:
//! the backend's response streamed through, or a short generated answer. A
//! `ProxyBody` carries the request's bookkeeping ([`Exchange`]) and records
//! it when it is dropped: at the end of the stream, on error, or when the
//! client goes away.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::admin::metrics::{Outcome, RouteMetrics};
use crate::proxy::access_log::{AccessLog, Entry};
use crate::proxy::error::BoxError;
use crate::proxy::{h1, h2};
use crate::resilience::limit::InFlightPermit;
use crate::upstream::backend::RequestGuard;
use crate::upstream::client::UpstreamBody;

/// A downstream request body, from either protocol.
pub enum RequestBody {
    H1(h1::RequestBody),
    H2(h2::RequestBody),
    Empty,
    /// A body whose bytes are added to a counter as they pass (for the
    /// access log).
    Counted(Box<RequestBody>, Arc<AtomicU64>),
}

impl RequestBody {
    /// This body, adding the bytes that pass to `counter`.
    pub fn counted(self, counter: Arc<AtomicU64>) -> Self {
        RequestBody::Counted(Box::new(self), counter)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Counted(b, counter) => {
                let polled = Pin::new(&mut **b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::H1(b) => b.is_end_stream(),
            RequestBody::H2(b) => b.is_end_stream(),
            RequestBody::Empty => true,
            RequestBody::Counted(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::H1(b) => b.size_hint(),
            RequestBody::H2(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Counted(b, _) => b.size_hint(),
        }
    }
}

/// The bookkeeping of one request, recorded once when it is dropped.
pub struct Exchange {
    pub route: Arc<RouteMetrics>,
    pub started: Instant,
    pub status: u16,
    /// Backend calls made, retries included.
    pub attempts: u32,
    pub guard: Option<RequestGuard>,
    pub permit: Option<InFlightPermit>,
    pub log: Option<RequestLog>,
}

/// The access log line of a request, filled in as it goes (present only
/// when `log.access_log` is on).
pub struct RequestLog {
    pub sink: Arc<AccessLog>,
    pub entry: Box<Entry>,
    /// Request body bytes read from the client so far.
    pub bytes_in: Arc<AtomicU64>,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.started);
        if let Some(guard) = self.guard.as_mut() {
            guard.end_at(now);
        }
        self.route.record(self.status, elapsed.as_secs_f64());
        if let Some(log) = self.log.take() {
            let RequestLog {
                sink,
                mut entry,
                bytes_in,
            } = log;
            entry.status = Some(self.status);
            entry.backend = self
                .guard
                .as_ref()
                .map(|g| Arc::clone(&g.backend().key.address));
            entry.attempts = self.attempts;
            entry.bytes_in = bytes_in.load(Ordering::Relaxed);
            entry.duration = elapsed;
            sink.record(entry);
        }
    }
}

/// A response body on its way to the client.
pub struct ProxyBody {
    kind: Kind,
    exchange: Option<Exchange>,
}

// Boxing the common variant would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A backend's response body; `exchange` is recorded when it ends.
    pub fn upstream(body: UpstreamBody, exchange: Exchange) -> Self {
        ProxyBody {
            kind: Kind::Upstream(body),
            exchange: Some(exchange),
        }
    }

    /// A generated body.
    pub fn full(bytes: Bytes, exchange: Option<Exchange>) -> Self {
        ProxyBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            exchange,
        }
    }

    fn finish(&mut self, outcome: Option<Outcome>) {
        if let Some(mut exchange) = self.exchange.take() {
            if let (Some(outcome), Some(guard)) = (outcome, exchange.guard.as_mut()) {
                guard.set_outcome(outcome);
            }
            drop(exchange);
        }
    }
}

impl h1::ResponseFields for ProxyBody {
    fn take_encoded_fields(&mut self) -> Option<h1::EncodedFields> {
        match &mut self.kind {
            Kind::Upstream(body) => body.take_encoded_fields(),
            Kind::Full(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => {
                let frame = ready!(Pin::new(body).poll_frame(cx));
                Poll::Ready(frame)
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(ex)) = (frame.data_ref(), this.exchange.as_mut()) {
                    if let Some(log) = ex.log.as_mut() {
                        log.entry.bytes_out += data.len() as u64;
                    }
                }
                if this.is_end_stream() {
                    this.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Some(Outcome::Reset)),
            Poll::Ready(None) => this.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}
