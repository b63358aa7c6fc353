//! Accept loops: one per listener, bounded by `max_connections`.
//!
//! Each accepted HTTP connection is served on its own task: a connection
//! that opens with the HTTP/2 preface goes to hyper's HTTP/2 server (h2c
//! prior knowledge), anything else to Sluice's own HTTP/1.1 codec. Tasks are
//! tracked so a graceful shutdown can wait for them; none is detached.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admin::metrics::ListenerMetrics;
use crate::config::{ListenerConfig, ListenerProtocol};
use crate::proxy::body::RequestBody;
use crate::proxy::h1;
use crate::proxy::http::{handle, ConnInfo};
use crate::proxy::peek::{self, Look};
use crate::proxy::{proxy_protocol, tcp};
use crate::state::Shared;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A bound listener socket and what its connections need.
///
/// The socket is shared so a reload can hand it to a new accept loop (new
/// settings, same address) without closing it; `active` counts the
/// listener's open connections across such hand-overs.
pub struct BoundListener {
    pub index: usize,
    pub name: Arc<str>,
    pub config: ListenerConfig,
    pub socket: Arc<TcpListener>,
    pub active: Arc<AtomicUsize>,
}

impl BoundListener {
    /// The address actually bound (the port is known even for `:0`).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// Tokens a running listener obeys when it is stopped (shutdown, or a
/// reload that removes or replaces it).
#[derive(Clone)]
pub struct ListenerControl {
    /// Cancelled when the listener must stop accepting.
    pub stop_accepting: CancellationToken,
    /// Cancelled when connections must close once idle.
    pub close_connections: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accepts until `control.stop_accepting` is cancelled.
pub async fn accept_loop(shared: Arc<Shared>, listener: BoundListener, control: ListenerControl) {
    let metrics = Arc::new(shared.metrics.listener(&listener.name));
    let active = Arc::clone(&listener.active);
    let max = listener.config.max_connections;
    let settings = Arc::new(h1::H1Settings {
        header_timeout: listener.config.timeouts.client_header,
        idle_timeout: listener.config.timeouts.idle,
        ..h1::H1Settings::default()
    });
    loop {
        let accepted = tokio::select! {
            _ = control.stop_accepting.cancelled() => break,
            accepted = listener.socket.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = &*listener.name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= max {
            metrics.rejected.inc();
            drop(stream);
            continue;
        }
        let slot = ConnSlot::new(Arc::clone(&active), Arc::clone(&metrics));
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let settings = Arc::clone(&settings);
        let close = control.close_connections.clone();
        let span = tracing::debug_span!("conn", listener = &*listener.name, peer = %peer);
        let protocol = listener.config.protocol;
        let proxy_protocol = listener.config.proxy_protocol;
        let metrics = Arc::clone(&metrics);
        let (index, name) = (listener.index, Arc::clone(&listener.name));
        control.tracker.spawn(
            async move {
                let _slot = slot;
                let mut stream = stream;
                let local = stream.local_addr().unwrap_or(peer);
                let (peer, destination) = if proxy_protocol {
                    match client_from_proxy_header(&mut stream, settings.header_timeout).await {
                        Ok(Some(pair)) => pair,
                        Ok(None) => (peer, local),
                        Err(err) => {
                            metrics.proxy_protocol_errors.inc();
                            tracing::debug!(error = %err, "PROXY protocol header refused");
                            return;
                        }
                    }
                } else {
                    (peer, local)
                };
                let info = Arc::new(ConnInfo {
                    listener: index,
                    listener_name: name,
                    peer,
                    destination,
                    scheme: "http",
                });
                match protocol {
                    ListenerProtocol::Http => {
                        serve_http(shared, info, stream, &settings, close).await
                    }
                    // A TCP session runs to its end; shutdown waits for it
                    // up to `shutdown.grace`.
                    ListenerProtocol::Tcp => tcp::serve(shared, info, stream, metrics).await,
                }
            }
            .instrument(span),
        );
    }
}

/// Reads the PROXY protocol header an outer load balancer sends first:
/// the client and destination it names, or `None` for a LOCAL connection
/// (the balancer's own health check), which keeps the real peer.
async fn client_from_proxy_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<(SocketAddr, SocketAddr)>, proxy_protocol::ProxyProtocolError> {
    match proxy_protocol::read_header(stream, timeout).await? {
        proxy_protocol::ProxyHeader::Proxied {
            source,
            destination,
        } => Ok(Some((source, destination))),
        proxy_protocol::ProxyHeader::Local => Ok(None),
    }
}

/// Holds one of the listener's `max_connections` slots.
struct ConnSlot {
    active: Arc<AtomicUsize>,
    metrics: Arc<ListenerMetrics>,
}

impl ConnSlot {
    fn new(active: Arc<AtomicUsize>, metrics: Arc<ListenerMetrics>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        metrics.accepted.inc();
        metrics.active.inc();
        ConnSlot { active, metrics }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.active.dec();
    }
}

/// Serves one HTTP connection, HTTP/1.1 or h2c.
async fn serve_http(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    stream: TcpStream,
    settings: &h1::H1Settings,
    close: CancellationToken,
) {
    match sniff_h2(&stream, settings.idle_timeout).await {
        // Boxed: the HTTP/2 state is large, and most connections never need it.
        Sniff::H2 => Box::pin(serve_h2(shared, info, stream, close)).await,
        Sniff::H1 => {
            // The codec boxes each request's state (this future included),
            // so an idle connection's task stays small.
            let handler = |req: http::Request<h1::RequestBody>| {
                let shared = Arc::clone(&shared);
                let info = Arc::clone(&info);
                async move { handle(&shared, &info, req.map(RequestBody::H1)).await }
            };
            if let Err(err) = h1::serve_connection(stream, settings, close, handler).await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        }
        Sniff::Closed => {}
    }
}

enum Sniff {
    H1,
    H2,
    Closed,
}

/// Looks at the first bytes without consuming them: the HTTP/2 preface
/// means h2c. Waits at most `limit` for the first byte.
async fn sniff_h2(stream: &TcpStream, limit: Duration) -> Sniff {
    let decide = |buf: &[u8]| -> Result<Look<Sniff>, Infallible> {
        let n = buf.len().min(H2_PREFACE.len());
        Ok(if buf[..n] != H2_PREFACE[..n] {
            Look::Done(Sniff::H1)
        } else if n == H2_PREFACE.len() {
            Look::Done(Sniff::H2)
        } else {
            Look::More
        })
    };
    peek::peek_until(stream, limit, H2_PREFACE.len() + 1, decide)
        .await
        .unwrap_or(Sniff::Closed)
}

async fn serve_h2(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    stream: TcpStream,
    close: CancellationToken,
) {
    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let shared = Arc::clone(&shared);
        let info = Arc::clone(&info);
        async move { Ok::<_, Infallible>(handle(&shared, &info, req.map(RequestBody::H2)).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new()).max_concurrent_streams(256);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(err) = res {
                tracing::debug!(error = %err, "h2 connection ended with an error");
            }
            return;
        }
        _ = close.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    if let Err(err) = conn.await {
        tracing::debug!(error = %err, "h2 connection ended with an error");
    }
}
