//! The one place a request leaves for a backend.
//!
//! Each backend has an [`UpstreamClient`]: a pooled hyper client (HTTP/1.1
//! keep-alive or HTTP/2) whose connector connects to the backend address in
//! the request URI under the connect timeout, and runs the TLS handshake
//! (`tls::client`) when the upstream has `tls`. With `protocol = "auto"`
//! the connection speaks HTTP/2 when ALPN picked `h2`, else HTTP/1.1. It
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

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{PoolConfig, UpstreamProtocol, UpstreamTlsConfig};
use crate::proxy::body::RequestBody;
use crate::proxy::error::ProxyError;
use crate::tls::client::UpstreamTls;
use crate::upstream::backend::BackendKey;

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

/// A connection to a backend: plain TCP, or TLS over it.
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl BackendStream {
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
        let after = self.connect_timeout;
        let addr = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let tls = self.tls.clone();
        let upstream = Arc::clone(&self.upstream);
        Box::pin(async move {
            let addr = addr.ok_or(ConnectError::NoAddress)?;
            let deadline = Instant::now() + after;
            let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
                .await
                .map_err(|_| ConnectError::Timeout { addr, after })?
                .map_err(|source| ConnectError::Io { addr, source })?;
            stream
                .set_nodelay(true)
                .map_err(|source| ConnectError::Io { addr, source })?;
            let Some(tls) = tls else {
                return Ok(TokioIo::new(BackendStream::Plain(stream)));
            };
            let handshake = tokio::time::timeout_at(deadline, tls.connect(stream)).await;
            match handshake {
                Err(_) => Err(ConnectError::Timeout { addr, after }),
                Ok(Err(source)) => {
                    tls.report_failure(&upstream, addr, &source);
                    Err(ConnectError::Tls { addr, source })
                }
                Ok(Ok(stream)) => Ok(TokioIo::new(BackendStream::Tls(Box::new(stream)))),
            }
        })
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
    inner: Client<Connector, RequestBody>,
    settings: ClientSettings,
    tls: Option<Arc<UpstreamTls>>,
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
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_backend)
            .http2_only(protocol == UpstreamProtocol::H2);
        let tls = tls
            .as_ref()
            .map(|tls| Arc::new(UpstreamTls::new(tls, protocol, &key.address, addr)));
        let connector = Connector {
            connect_timeout,
            tls: tls.clone(),
            upstream: Arc::clone(&key.upstream),
        };
        UpstreamClient {
            inner: builder.build(connector),
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

    /// The URI scheme of requests to the backend: `https` with TLS.
    pub fn scheme(&self) -> http::uri::Scheme {
        if self.tls.is_some() {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        }
    }

    /// Sends `req` (its URI names the backend) and returns the response head
    /// with a streaming body. The future does not borrow the client.
    pub fn send(
        &self,
        addr: SocketAddr,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, ProxyError>> + Send + 'static {
        let sending = self.inner.request(req);
        async move { sending.await.map_err(|e| classify(addr, e)) }
    }
}

fn classify(addr: SocketAddr, err: hyper_util::client::legacy::Error) -> ProxyError {
    use std::error::Error as _;
    if err.is_connect() {
        let mut source = err.source();
        while let Some(e) = source {
            if let Some(c) = e.downcast_ref::<ConnectError>() {
                return match c {
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
                        source: io::Error::new(io::ErrorKind::InvalidInput, c.to_string()),
                    },
                };
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
