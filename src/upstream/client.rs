//! The one place a request leaves for a backend.
//!
//! Each backend has an [`UpstreamClient`]: Sluice's own pooled HTTP/1.1
//! client (`upstream::h1`), or for upstreams that may speak HTTP/2 a pooled
//! hyper client. Both connect through [`Connector`] under the connect
//! timeout, with the TLS handshake (`tls::client`) when the upstream has
//! `tls`. With `protocol = "auto"` over TLS the connection speaks HTTP/2
//! when ALPN picked `h2`, else HTTP/1.1. The client
//! lives in the backend's long-lived state, so its pooled connections
//! survive a reload and close when a removed backend's last call ends.
//! Transport errors are classified into [`ProxyError`] here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{PoolConfig, UpstreamProtocol, UpstreamTlsConfig};
use crate::proxy::body::RequestBody;
use crate::proxy::error::{BoxError, ProxyError};
use crate::proxy::forwarded::Forwarded;
use crate::proxy::h1::{EncodedFields, UpgradeIo};
use crate::tls::client::UpstreamTls;
use crate::upstream::backend::BackendKey;
use crate::upstream::h1::{self, H1Client, ResponseBody};

/// Why a connection to a backend could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("request URI has no backend socket address")]
    NoAddress,
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr} failed")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("tls handshake with {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Connects to the socket address in a request URI's authority, with TLS
/// when the upstream has it.
#[derive(Clone)]
pub struct Connector {
    /// Bounds the TCP connect and the TLS handshake together.
    connect_timeout: Duration,
    tls: Option<Arc<UpstreamTls>>,
    upstream: Arc<str>,
}

/// How long one try on a backend may take to get its response head.
#[derive(Debug, Clone, Copy)]
pub struct TryLimit {
    /// When the try started.
    pub start: Instant,
    /// How long it may take.
    pub after: Duration,
}

impl TryLimit {
    /// When the response head must have arrived.
    pub fn deadline(&self) -> Instant {
        self.start + self.after
    }
}

/// A connection to a backend: plain TCP, or TLS over it.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(tls) => tls.get_ref().0,
        }
    }

    /// Whether ALPN picked HTTP/2.
    fn is_h2(&self) -> bool {
        match self {
            BackendStream::Plain(_) => false,
            BackendStream::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.is_write_vectored(),
            BackendStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

impl Connection for BackendStream {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.is_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<BackendStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let addr = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let connector = self.clone();
        Box::pin(async move {
            let addr = addr.ok_or(ConnectError::NoAddress)?;
            connector.connect(addr).await.map(TokioIo::new)
        })
    }
}

impl Connector {
    /// Connects to `addr`, with the TLS handshake when the upstream has
    /// TLS, both within the connect timeout.
    pub async fn connect(&self, addr: SocketAddr) -> Result<BackendStream, ConnectError> {
        let after = self.connect_timeout;
        let deadline = Instant::now() + after;
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout { addr, after })?
            .map_err(|source| ConnectError::Io { addr, source })?;
        stream
            .set_nodelay(true)
            .map_err(|source| ConnectError::Io { addr, source })?;
        let Some(tls) = &self.tls else {
            return Ok(BackendStream::Plain(stream));
        };
        let handshake = tokio::time::timeout_at(deadline, tls.connect(stream)).await;
        match handshake {
            Err(_) => Err(ConnectError::Timeout { addr, after }),
            Ok(Err(source)) => {
                tls.report_failure(&self.upstream, addr, &source);
                Err(ConnectError::Tls { addr, source })
            }
            Ok(Ok(stream)) => Ok(BackendStream::Tls(Box::new(stream))),
        }
    }
}

impl ConnectError {
    /// What the client is told about it; `addr` is the backend's.
    pub fn to_proxy_error(&self, addr: SocketAddr) -> ProxyError {
        match self {
            ConnectError::Timeout { addr, after } => ProxyError::ConnectTimeout {
                addr: *addr,
                after: *after,
            },
            ConnectError::Io { addr, source } => ProxyError::Connect {
                addr: *addr,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            ConnectError::Tls { addr, source } => ProxyError::Tls {
                addr: *addr,
                source: io::Error::new(source.kind(), crate::tls::client::describe(source)),
            },
            ConnectError::NoAddress => ProxyError::Connect {
                addr,
                source: io::Error::new(io::ErrorKind::InvalidInput, self.to_string()),
            },
        }
    }
}

/// What a client is built from: a change to any of it needs a new client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSettings {
    pub protocol: UpstreamProtocol,
    pub pool: PoolConfig,
    pub connect_timeout: Duration,
    /// `upstream.tls`, with the CA and client certificate as loaded.
    pub tls: Option<UpstreamTlsConfig>,
}

impl Default for ClientSettings {
    /// The defaults of an upstream's `protocol`, `pool`,
    /// `timeouts.connect` and `tls`.
    fn default() -> Self {
        ClientSettings {
            protocol: UpstreamProtocol::Http1,
            pool: PoolConfig {
                max_idle_per_backend: 64,
                idle_timeout: Duration::from_secs(90),
            },
            connect_timeout: Duration::from_secs(1),
            tls: None,
        }
    }
}

/// A pooled client for one backend.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Inner,
    settings: ClientSettings,
    tls: Option<Arc<UpstreamTls>>,
}

#[derive(Clone)]
enum Inner {
    /// Sluice's own HTTP/1.1 client.
    H1(H1Client),
    /// hyper's, for upstreams that may speak HTTP/2.
    Hyper(Box<Client<Connector, RequestBody>>),
}

impl UpstreamClient {
    /// A client of the backend `key` at `addr` speaking `protocol` (over
    /// TLS when `tls` is set), keeping up to `pool.max_idle_per_backend`
    /// idle connections for `pool.idle_timeout`.
    pub fn new(settings: ClientSettings, key: &BackendKey, addr: SocketAddr) -> Self {
        let ClientSettings {
            protocol,
            pool,
            connect_timeout,
            tls,
        } = &settings;
        let (protocol, connect_timeout) = (*protocol, *connect_timeout);
        let tls = tls
            .as_ref()
            .map(|tls| Arc::new(UpstreamTls::new(tls, protocol, &key.address, addr)));
        let connector = Connector {
            connect_timeout,
            tls: tls.clone(),
            upstream: Arc::clone(&key.upstream),
        };
        // `auto` without TLS has no ALPN to pick HTTP/2 with: HTTP/1.1.
        let http1 = protocol == UpstreamProtocol::Http1
            || (protocol == UpstreamProtocol::Auto && tls.is_none());
        let inner = if http1 {
            let pool = h1::Pool::new(pool.max_idle_per_backend, pool.idle_timeout);
            Inner::H1(H1Client::new(pool, connector, addr))
        } else {
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(pool.idle_timeout)
                .pool_max_idle_per_host(pool.max_idle_per_backend)
                .http2_only(protocol == UpstreamProtocol::H2);
            Inner::Hyper(Box::new(builder.build(connector)))
        };
        UpstreamClient {
            inner,
            settings,
            tls,
        }
    }

    /// What this client was built from.
    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// The backend's TLS, when the upstream has `tls`.
    pub fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    /// Idle pooled connections, for the HTTP/1.1 client (`None` for
    /// hyper's, which does not tell).
    pub fn idle(&self) -> Option<usize> {
        match &self.inner {
            Inner::H1(c) => Some(c.idle()),
            Inner::Hyper(_) => None,
        }
    }

    /// Sends a request to the backend at `addr` (`authority`) and returns
    /// the response head with a streaming body; a `101` response carries
    /// the upgraded stream as an [`UpgradeIo`] extension, or
    /// [`ProxyError::Timeout`] when the head has not come within `limit`.
    /// The future does not borrow the client; it borrows the head, which
    /// stays with the caller for a retry.
    ///
    /// A response from the HTTP/1.1 client carries its fields in wire form
    /// in its body (see [`crate::proxy::h1::ResponseFields`]) and an empty
    /// `HeaderMap`: both client codecs write them from there.
    pub fn send<'a>(
        &self,
        addr: SocketAddr,
        authority: &Authority,
        parts: &'a Parts,
        forwarded: &'a Forwarded,
        body: RequestBody,
        limit: TryLimit,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + Send + 'a {
        enum Call<F> {
            H1(H1Client, RequestBody),
            Hyper(F),
            Refused(ProxyError),
        }
        let call = match &self.inner {
            Inner::H1(client) => Call::H1(client.clone(), body),
            Inner::Hyper(client) => {
                match target(copy_head(parts, forwarded), self.tls.is_some(), authority) {
                    Ok(parts) => Call::Hyper(client.request(Request::from_parts(parts, body))),
                    Err(e) => Call::Refused(e),
                }
            }
        };
        async move {
            match call {
                Call::H1(client, body) => {
                    let response = client.send(parts, forwarded, body, limit).await?;
                    Ok(response.map(|b| b.map_or(UpstreamBody::Empty, UpstreamBody::H1)))
                }
                Call::Hyper(sending) => {
                    let sent = tokio::time::timeout_at(limit.deadline(), sending).await;
                    let timeout = |_| ProxyError::Timeout {
                        addr,
                        after: limit.after,
                    };
                    let mut response = sent.map_err(timeout)?.map_err(|e| classify(addr, e))?;
                    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        if let Ok(upgraded) = hyper::upgrade::on(&mut response).await {
                            let io = UpgradeIo::new(TokioIo::new(upgraded));
                            response.extensions_mut().insert(io);
                        }
                    }
                    Ok(response.map(UpstreamBody::Hyper))
                }
                Call::Refused(e) => Err(e),
            }
        }
    }
}

/// A copy of a request head for hyper's client, which takes it by value.
fn copy_head(parts: &Parts, forwarded: &Forwarded) -> Parts {
    let mut copy = Request::new(()).into_parts().0;
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    forwarded.apply(&mut copy.headers);
    copy
}

/// Points a request at the backend for hyper's client: an absolute URI
/// with its address (`https` with TLS). The path is moved over, not parsed
/// again.
fn target(mut parts: Parts, tls: bool, authority: &Authority) -> Result<Parts, ProxyError> {
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    uri.authority = Some(authority.clone());
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest {
        what: "invalid request target",
    })?;
    Ok(parts)
}

/// A backend's response body, from either client.
// Boxing the common variant would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
pub enum UpstreamBody {
    H1(ResponseBody),
    Hyper(Incoming),
    /// After an upgrade: the stream went to the [`UpgradeIo`].
    Empty,
}

impl UpstreamBody {
    /// The response's fields in wire form, when they were kept so.
    pub fn take_encoded_fields(&mut self) -> Option<EncodedFields> {
        match self {
            UpstreamBody::H1(b) => b.take_encoded_fields(),
            _ => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

fn classify(addr: SocketAddr, err: hyper_util::client::legacy::Error) -> ProxyError {
    use std::error::Error as _;
    if err.is_connect() {
        let mut source = err.source();
        while let Some(e) = source {
            if let Some(c) = e.downcast_ref::<ConnectError>() {
                return c.to_proxy_error(addr);
            }
            source = e.source();
        }
        return ProxyError::Connect {
            addr,
            source: io::Error::other(err.to_string()),
        };
    }
    let is_parse = find_hyper(&err).is_some_and(|h| h.is_parse() || h.is_parse_status());
    if is_parse {
        ProxyError::BadResponse {
            addr,
            source: Box::new(err),
        }
    } else {
        ProxyError::Reset {
            addr,
            source: Box::new(err),
        }
    }
}

fn find_hyper<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        source = e.source();
    }
    None
}
