//! The one place a request leaves for a backend.
//!
//! Each backend has an [`UpstreamClient`]: a pooled hyper client (HTTP/1.1
//! keep-alive or h2c) whose connector connects to the backend address in the
//! request URI under the connect timeout. It lives in the backend's
//! long-lived state, so its pooled connections survive a reload and close
//! when a removed backend's last call ends. Transport errors are classified
//! into [`ProxyError`] here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{PoolConfig, UpstreamProtocol};
use crate::proxy::body::RequestBody;
use crate::proxy::error::ProxyError;

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
}

/// Connects to the socket address in a request URI's authority.
#[derive(Clone)]
pub struct Connector {
    connect_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
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
        Box::pin(async move {
            let addr = addr.ok_or(ConnectError::NoAddress)?;
            let stream = tokio::time::timeout(after, TcpStream::connect(addr))
                .await
                .map_err(|_| ConnectError::Timeout { addr, after })?
                .map_err(|source| ConnectError::Io { addr, source })?;
            stream
                .set_nodelay(true)
                .map_err(|source| ConnectError::Io { addr, source })?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// What a client is built from: a change to any of it needs a new client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub protocol: UpstreamProtocol,
    pub pool: PoolConfig,
    pub connect_timeout: Duration,
}

impl Default for ClientSettings {
    /// The defaults of an upstream's `protocol`, `pool` and
    /// `timeouts.connect`.
    fn default() -> Self {
        ClientSettings {
            protocol: UpstreamProtocol::Http1,
            pool: PoolConfig {
                max_idle_per_backend: 64,
                idle_timeout: Duration::from_secs(90),
            },
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// A pooled client for one backend.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<Connector, RequestBody>,
    settings: ClientSettings,
}

impl UpstreamClient {
    /// A client speaking `protocol`, keeping up to `pool.max_idle_per_backend`
    /// idle connections for `pool.idle_timeout`.
    pub fn new(settings: ClientSettings) -> Self {
        let ClientSettings {
            protocol,
            pool,
            connect_timeout,
        } = &settings;
        let (protocol, connect_timeout) = (*protocol, *connect_timeout);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_backend)
            .http2_only(protocol == UpstreamProtocol::H2);
        UpstreamClient {
            inner: builder.build(Connector { connect_timeout }),
            settings,
        }
    }

    /// What this client was built from.
    pub fn settings(&self) -> &ClientSettings {
        &self.settings
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
