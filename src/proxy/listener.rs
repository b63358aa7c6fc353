//! Accept loops: one per listener and worker, bounded together by the
//! listener's `max_connections`.
//!
//! Each worker accepts on its own socket of the listener's group (see
//! `runtime::workers`) and serves what it accepts on its own thread. Each
//! accepted HTTP connection is served on its own task: a connection
//! that opens with the HTTP/2 preface goes to Sluice's HTTP/2 codec
//! (`proxy::h2`, h2c prior knowledge), anything else to its HTTP/1.1 codec
//! (`proxy::h1`). On a listener with `tls` the TLS handshake comes first
//! (`tls::server`), then ALPN decides: `h2` goes to the HTTP/2 codec,
//! anything else to the HTTP/1.1 codec. Tasks are tracked so a graceful shutdown can wait for
//! them; none is detached.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use prometheus::IntCounter;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admin::metrics::ListenerMetrics;
use crate::config::{ListenerConfig, ListenerProtocol};
use crate::proxy::body::RequestBody;
use crate::proxy::http::{handle, record_refused, ConnInfo, TlsInfo};
use crate::proxy::lazy::LazyTcp;
use crate::proxy::park::{self, Parking};
use crate::proxy::{buffers, h1, h2};
use crate::proxy::{proxy_protocol, tcp};
use crate::runtime::busy_poll;
use crate::state::Shared;
use crate::tls::server::{self as tls_server, TlsAcceptor};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A bound listener socket and what its connections need.
///
/// The socket is shared so a reload can hand it to a new accept loop (new
/// settings, same address) without closing it; `active` counts the
/// listener's open connections across such hand-overs.
#[derive(Clone)]
pub struct BoundListener {
    pub index: usize,
    pub name: Arc<str>,
    pub config: ListenerConfig,
    pub socket: Arc<ListenSocket>,
    pub active: Arc<AtomicUsize>,
}

impl BoundListener {
    /// The address actually bound (the port is known even for `:0`).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// The accept backlog asked for; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// The pause after a failed accept (EMFILE and friends) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Listening sockets on `addr`, `members` of them (one per worker), each
/// with `SO_REUSEADDR` and `SO_REUSEPORT`: the kernel spreads new
/// connections over the members, and a new Sluice can bind the same address
/// while the old one drains (it spreads them over both until the old one
/// closes its sockets). Other sockets with `SO_REUSEPORT` (of the same
/// user) may bind it too. The admin socket is not shared this way. For port
/// 0 the first member picks the port and the others join it.
pub fn listen_shared(addr: SocketAddr, members: usize) -> io::Result<ListenSocket> {
    let first = bind_member(addr)?;
    let bound = first.local_addr()?;
    let mut sockets = Vec::with_capacity(members.max(1));
    sockets.push(first);
    for _ in 1..members {
        sockets.push(bind_member(bound)?);
    }
    Ok(ListenSocket { members: sockets })
}

fn bind_member(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A listener's sockets, one per worker, all bound to the same address.
#[derive(Debug)]
pub struct ListenSocket {
    members: Vec<std::net::TcpListener>,
}

impl ListenSocket {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.members[0].local_addr()
    }

    /// How many sockets (workers) share the address.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Whether connections accepted from now on start with delayed ACKs
    /// (HAProxy's `tcp-smart-accept`, on by default in its HTTP mode). An
    /// HTTP client speaks first and its answer follows at once, so the
    /// request's ACK can ride on the response instead of being sent alone:
    /// one packet fewer per connection, on both ends. The accepted socket
    /// inherits the mode from the listening one. A TCP listener keeps
    /// immediate ACKs, since its server may speak first.
    pub fn set_delayed_ack(&self, delayed: bool) -> io::Result<()> {
        for member in &self.members {
            SockRef::from(member).set_tcp_quickack(!delayed)?;
        }
        Ok(())
    }

    /// Member `member`'s socket, watched by the reactor of the runtime this
    /// is called in (a second descriptor for it: the member stays open for
    /// as long as the group does).
    pub fn acceptor(&self, member: usize) -> io::Result<Acceptor> {
        let listener = self.members[member % self.members.len()].try_clone()?;
        // Deprecated because a type's `as_raw_fd` could name a descriptor it
        // does not own; a `TcpListener` owns its descriptor and returns that
        // same one for its whole life, which is what the replacement (an
        // `unsafe fn`) asks callers to promise.
        #[allow(deprecated)]
        let fd = AsyncFd::new(listener)?;
        Ok(Acceptor { fd })
    }
}

/// One worker's listening socket, whose connections are accepted without
/// joining the reactor: each joins only if it has to wait ([`LazyTcp`]).
#[derive(Debug)]
pub struct Acceptor {
    fd: AsyncFd<std::net::TcpListener>,
}

impl Acceptor {
    /// Waits for a connection and accepts it: a non-blocking socket, not
    /// registered with the reactor.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.fd.readable().await?;
            if let Ok(accepted) = ready.try_io(|fd| accept_bare(fd.get_ref())) {
                return accepted;
            }
        }
    }

    /// Stops the socket listening (for every descriptor of it): it leaves
    /// its `SO_REUSEPORT` group, so the kernel queues no more connections
    /// on it, and resets any it had queued.
    pub fn shut(&self) {
        let _ = SockRef::from(self.fd.get_ref()).shutdown(std::net::Shutdown::Read);
    }

    /// A connection waiting in the accept queue, whether or not the reactor
    /// has reported it yet.
    pub fn accept_now(&self) -> Option<io::Result<(std::net::TcpStream, SocketAddr)>> {
        match accept_bare(self.fd.get_ref()) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            accepted => Some(accepted),
        }
    }
}

/// `accept4` with the new socket non-blocking from the start (no second
/// system call to make it so).
fn accept_bare(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (socket, addr) =
        SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "accepted a connection without an IP address",
        )
    })?;
    Ok((socket.into(), peer))
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

/// What every connection of one listener shares, behind one `Arc` so a
/// connection's task carries a single pointer to it.
struct ListenerCtx {
    shared: Arc<Shared>,
    index: usize,
    name: Arc<str>,
    protocol: ListenerProtocol,
    proxy_protocol: bool,
    settings: h1::H1Settings,
    handshake: Handshake,
    metrics: Arc<ListenerMetrics>,
    /// Connections open now, against `max_connections` (shared with the
    /// accept loops that take this listener's socket over on a reload).
    active: Arc<AtomicUsize>,
    max_connections: usize,
    /// `sluice_worker_connections_total` of this accept loop's worker.
    worker_accepted: IntCounter,
    /// The listening address when it names one interface: every accepted
    /// connection's local address, known without asking the kernel.
    bound: Option<SocketAddr>,
    close: CancellationToken,
    /// Idle HTTP/1 connections parked off the runtime; `None` if the epoll
    /// set could not be made (connections then idle on their tasks).
    parking: Option<Parking<Resume>>,
    tracker: TaskTracker,
}

/// What a listener's connections begin with.
#[derive(Clone)]
enum Handshake {
    /// Plain TCP.
    None,
    Tls(Arc<TlsAcceptor>),
    /// `tls` is configured but could not be set up: connections are
    /// closed rather than served in the clear.
    Unavailable,
}

impl ListenerCtx {
    /// What the requests of a plain (not yet TLS) connection know of it.
    fn conn_info(&self, peer: SocketAddr, destination: SocketAddr) -> ConnInfo {
        ConnInfo::new(self.index, Arc::clone(&self.name), peer, destination)
    }
}

/// What a parked connection needs to resume: its slot and its client.
struct Resume {
    slot: ConnSlot,
    peer: SocketAddr,
    destination: SocketAddr,
}

/// Starts listener `listener`: one accept loop per worker, each accepting
/// on its own member of the listener's socket group and serving what it
/// accepts on its own worker. The loops end when `control.stop_accepting`
/// is cancelled.
pub fn start(
    shared: &Arc<Shared>,
    listener: BoundListener,
    control: &ListenerControl,
    workers: &[Handle],
    accept_tasks: &TaskTracker,
) {
    let metrics = Arc::new(shared.metrics.listener(&listener.name));
    let handshake = handshake(&listener, &metrics, control);
    for (worker, handle) in workers.iter().enumerate() {
        let worker_accepted = shared.metrics.worker_connections(worker);
        let run = accept_loop(
            Arc::clone(shared),
            listener.clone(),
            control.clone(),
            LoopParts {
                worker,
                metrics: Arc::clone(&metrics),
                handshake: handshake.clone(),
                worker_accepted,
            },
        );
        accept_tasks.spawn_on(run, handle);
    }
}

/// What a listener's accept loops share, built once per listener.
struct LoopParts {
    worker: usize,
    metrics: Arc<ListenerMetrics>,
    handshake: Handshake,
    /// `sluice_worker_connections_total` of this loop's worker.
    worker_accepted: IntCounter,
}

/// The TLS acceptor of a listener with `tls`, built from this listener's
/// config, so a listener rebuilt by a reload picks up its new `tls` with
/// it. Its certificate file watcher ends when the listener stops accepting.
fn handshake(
    listener: &BoundListener,
    metrics: &ListenerMetrics,
    control: &ListenerControl,
) -> Handshake {
    let Some(tls) = &listener.config.tls else {
        return Handshake::None;
    };
    match TlsAcceptor::from_config(tls) {
        Ok(acceptor) => {
            let acceptor = Arc::new(acceptor);
            control.tracker.spawn(Arc::clone(&acceptor).watch(
                tls.clone(),
                Arc::clone(&listener.name),
                metrics.tls_reloaded.clone(),
                metrics.tls_reload_failed.clone(),
                control.stop_accepting.child_token(),
            ));
            Handshake::Tls(acceptor)
        }
        Err(err) => {
            tracing::error!(
                listener = &*listener.name,
                error = %crate::tls::with_causes(&err),
                "cannot set up tls; closing every connection"
            );
            Handshake::Unavailable
        }
    }
}

/// One worker's accept loop: accepts until `control.stop_accepting` is
/// cancelled.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: BoundListener,
    control: ListenerControl,
    parts: LoopParts,
) {
    let LoopParts {
        worker,
        metrics,
        handshake,
        worker_accepted,
    } = parts;
    let acceptor = loop {
        match listener.socket.acceptor(worker) {
            Ok(acceptor) => break acceptor,
            Err(err) => {
                tracing::error!(listener = &*listener.name, worker, error = %err, "cannot watch the listening socket");
                tokio::select! {
                    _ = control.stop_accepting.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    };
    let parking = match Parking::new(metrics.parked.clone()) {
        Ok(p) => Some(p),
        Err(err) => {
            tracing::warn!(listener = &*listener.name, error = %err, "cannot park idle connections");
            None
        }
    };
    let ctx = Arc::new(ListenerCtx {
        handshake,
        metrics,
        shared,
        index: listener.index,
        name: Arc::clone(&listener.name),
        protocol: listener.config.protocol,
        proxy_protocol: listener.config.proxy_protocol,
        settings: h1::H1Settings {
            header_timeout: listener.config.timeouts.client_header,
            idle_timeout: listener.config.timeouts.idle,
            ..h1::H1Settings::default()
        },
        active: Arc::clone(&listener.active),
        max_connections: listener.config.max_connections,
        worker_accepted,
        bound: listener
            .local_addr()
            .ok()
            .filter(|a| !a.ip().is_unspecified()),
        close: control.close_connections.clone(),
        parking,
        tracker: control.tracker.clone(),
    });
    if ctx.parking.is_some() {
        control.tracker.spawn(watch_parked(Arc::clone(&ctx)));
    }
    loop {
        // Stopping first: a loop told to stop takes no new connection, even
        // one that arrived at the same moment.
        let next = tokio::select! {
            biased;
            _ = control.stop_accepting.cancelled() => break,
            next = acceptor.accept() => next,
        };
        match next {
            Ok((stream, peer)) => admit(&ctx, stream, peer),
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = &*listener.name, error = %err, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    // A socket group handed to a successor's accept loops (a reload that
    // changed the listener's accept settings) keeps its queued connections
    // for them: they are served with the new settings. One that closes with
    // its loops (the control plane has dropped its handle before stopping
    // them, and each loop holds one) is emptied, so what the kernel has
    // already queued is served rather than reset when the socket closes (the
    // other process sharing the port with SO_REUSEPORT does not inherit
    // it), and this loop's socket is shut at once, so the kernel stops
    // queueing connections on it while the group's other loops finish.
    if Arc::strong_count(&listener.socket) <= listener.socket.members() {
        while let Some(Ok((stream, peer))) = acceptor.accept_now() {
            admit(&ctx, stream, peer);
        }
        acceptor.shut();
    }
}

/// Serves an accepted connection on its own task, unless the listener is
/// at `max_connections`.
fn admit(ctx: &Arc<ListenerCtx>, stream: std::net::TcpStream, peer: SocketAddr) {
    busy_poll::note_work();
    if ctx.active.load(Ordering::Relaxed) >= ctx.max_connections {
        ctx.metrics.rejected.inc();
        return;
    }
    ctx.worker_accepted.inc();
    let slot = ConnSlot::new(Arc::clone(ctx));
    let _ = stream.set_nodelay(true);
    let span = tracing::debug_span!("conn", listener = &*ctx.name, peer = %peer);
    // The connection's future (1.4 KiB) is written into its own box and the
    // task holds the pointer: spawned as it is, it was copied five times on
    // its way into the task and three more by the task's stage changes,
    // once per connection.
    let conn = Box::write(
        Box::new_uninit(),
        serve_conn(slot, stream, peer).instrument(span),
    );
    ctx.tracker.spawn(Box::into_pin(conn));
}

/// One accepted connection, from the PROXY header (if any) to its close.
///
/// This future is the connection's task, alive for as long as the
/// connection is, so everything that is not needed while a keep-alive
/// connection waits for its next request is boxed and freed when done: the
/// PROXY header read, a TLS or TCP session, the HTTP/2 server and each
/// HTTP/1 request (inside the codec). What stays is small; a test bounds it.
///
/// A plain HTTP connection joins the reactor only if it has to wait
/// ([`LazyTcp`]); the others join it at once.
async fn serve_conn(slot: ConnSlot, socket: std::net::TcpStream, peer: SocketAddr) {
    let ctx = &*slot.ctx;
    // A wildcard listener asks the kernel which address was reached.
    let local = match ctx.bound {
        Some(bound) => bound,
        None => socket.local_addr().unwrap_or(peer),
    };
    let plain_http = ctx.protocol == ListenerProtocol::Http
        && matches!(ctx.handshake, Handshake::None)
        && !ctx.proxy_protocol;
    let (stream, info) = if plain_http {
        (LazyTcp::new(socket), ctx.conn_info(peer, local))
    } else {
        // Boxed: the PROXY header, TLS and TCP sessions are the rare case.
        match Box::pin(serve_registered(ctx, socket, peer, local)).await {
            Some(http) => http,
            None => return,
        }
    };
    if let Some((socket, idle)) = serve_http(ctx, &info, stream).await {
        park(slot, socket, idle, &info);
    }
}

/// Serves a connection that joins the reactor at once: one that starts
/// with a PROXY header, a TLS connection or a TCP session. Returns a plain
/// HTTP connection once its PROXY header is read, for the caller to serve.
async fn serve_registered(
    ctx: &ListenerCtx,
    socket: std::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<(LazyTcp, ConnInfo)> {
    // Registering fails only when the reactor is gone: then close.
    let mut stream = TcpStream::from_std(socket).ok()?;
    let (peer, destination) = if ctx.proxy_protocol {
        match client_from_proxy_header(&mut stream, ctx.settings.header_timeout).await {
            Ok(Some(pair)) => pair,
            Ok(None) => (peer, local),
            Err(err) => {
                ctx.metrics.proxy_protocol_errors.inc();
                tracing::debug!(error = %err, "PROXY protocol header refused");
                return None;
            }
        }
    } else {
        (peer, local)
    };
    let info = ctx.conn_info(peer, destination);
    match ctx.protocol {
        ListenerProtocol::Http => match &ctx.handshake {
            Handshake::None => return Some((LazyTcp::from_registered(stream), info)),
            Handshake::Tls(acceptor) => serve_tls(ctx, acceptor, info, stream).await,
            Handshake::Unavailable => {}
        },
        // A TCP session runs to its end; shutdown waits for it up to
        // `shutdown.grace`.
        ListenerProtocol::Tcp => tcp::serve(&ctx.shared, &info, stream, &ctx.metrics).await,
    }
    None
}

/// Serves a parked connection that turned readable, on a new task.
async fn resume(resume: Resume, socket: std::net::TcpStream) {
    let Resume {
        slot,
        peer,
        destination,
    } = resume;
    let ctx = &*slot.ctx;
    let info = ctx.conn_info(peer, destination);
    // Readable, so the request is likely there: read it before joining the
    // reactor, which a `Connection: close` request then never needs.
    let stream = LazyTcp::new(socket);
    if let Some((socket, idle)) = serve_h1(ctx, &info, stream, BytesMut::new()).await {
        park(slot, socket, idle, &info);
    }
}

/// Hands a connection idle for `idle` to the listener's parking, with what
/// is left of its idle timeout. If parking fails it is closed.
fn park(slot: ConnSlot, socket: std::net::TcpStream, idle: Duration, info: &ConnInfo) {
    let ctx = Arc::clone(&slot.ctx);
    let Some(parking) = &ctx.parking else {
        return;
    };
    let remaining = ctx.settings.idle_timeout.saturating_sub(idle);
    let resume = Resume {
        slot,
        peer: info.peer,
        destination: info.destination,
    };
    if let Err(err) = parking.park(socket, remaining, resume) {
        tracing::debug!(error = %err, "cannot park an idle connection; closing it");
    }
}

/// Runs the listener's parking until its connections are told to close,
/// serving each parked connection that turns readable on a new task.
async fn watch_parked(ctx: Arc<ListenerCtx>) {
    let Some(parking) = &ctx.parking else {
        return;
    };
    parking
        .run(ctx.close.clone(), |socket, r: Resume| {
            let span = tracing::debug_span!("conn", listener = &*ctx.name, peer = %r.peer);
            ctx.tracker.spawn(resume(r, socket).instrument(span));
        })
        .await;
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
    ctx: Arc<ListenerCtx>,
}

impl ConnSlot {
    fn new(ctx: Arc<ListenerCtx>) -> Self {
        ctx.active.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.accepted.inc();
        ctx.metrics.active.inc();
        ConnSlot { ctx }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.ctx.active.fetch_sub(1, Ordering::Relaxed);
        self.ctx.metrics.active.dec();
    }
}

/// Serves one HTTP connection, HTTP/1.1 or h2c. Returns the socket of an
/// HTTP/1 connection that went idle, to be parked.
async fn serve_http(
    ctx: &ListenerCtx,
    info: &ConnInfo,
    mut stream: LazyTcp,
) -> Option<(std::net::TcpStream, Duration)> {
    let (sniff, first) = Box::pin(sniff_h2(&mut stream, ctx.settings.idle_timeout)).await;
    match sniff {
        // Boxed: the HTTP/2 state is large, and most connections never need it.
        Sniff::H2 => {
            Box::pin(serve_h2(ctx, info, stream, first)).await;
            None
        }
        Sniff::H1 => serve_h1(ctx, info, stream, first).await,
        Sniff::Closed => {
            buffers::give(first);
            None
        }
    }
}

/// Runs the TLS handshake (within `client_header`), then serves HTTP/2
/// when ALPN picked `h2`, else HTTP/1.1. A TLS connection is never parked:
/// its session state stays on its task.
async fn serve_tls(
    ctx: &ListenerCtx,
    acceptor: &TlsAcceptor,
    mut info: ConnInfo,
    stream: TcpStream,
) {
    let accepted = tokio::time::timeout(ctx.settings.header_timeout, acceptor.accept(stream)).await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            ctx.metrics.tls_handshake_errors.inc();
            tracing::debug!(error = %err, "tls handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics.tls_handshake_errors.inc();
            tracing::debug!(after = ?ctx.settings.header_timeout, "tls handshake timed out");
            return;
        }
    };
    let session = stream.get_ref().1;
    let is_h2 = session.alpn_protocol() == Some(b"h2");
    info.tls = Some(Arc::new(TlsInfo {
        client_subject: tls_server::client_subject(session),
    }));
    if is_h2 {
        serve_h2(ctx, &info, stream, BytesMut::new()).await;
    } else {
        serve_h1(ctx, &info, stream, BytesMut::new()).await;
    }
}

/// Serves HTTP/1 requests until the connection closes, or returns its
/// socket and idle time once it has been idle long enough to park
/// ([`park::park_after`]; plain TCP connections only).
async fn serve_h1<T: h1::Transport>(
    ctx: &ListenerCtx,
    info: &ConnInfo,
    stream: T,
    first: BytesMut,
) -> Option<(std::net::TcpStream, Duration)> {
    // The codec boxes each request's state (this future included), so an
    // idle connection's task stays small.
    let shared = &ctx.shared;
    let handler = |req: http::Request<h1::RequestBody>| async move {
        let mut response = handle(shared, info, req.map(RequestBody::H1)).await;
        // While draining (/readyz is 503), each response closes its
        // connection, so keep-alive clients reconnect (through their
        // balancer, to another instance) before the listener stops.
        if shared.is_draining() {
            let close = http::HeaderValue::from_static("close");
            response
                .headers_mut()
                .insert(http::header::CONNECTION, close);
        }
        response
    };
    let hooks = ConnHooks { ctx, info };
    let close = ctx.close.clone();
    match h1::serve_connection_parkable(stream, first, &ctx.settings, close, handler, &hooks).await
    {
        Ok(h1::Ended::Parked { socket, idle }) => Some((socket, idle)),
        Ok(h1::Ended::Closed) => None,
        Err(err) => {
            tracing::debug!(error = %err, "connection ended with an error");
            None
        }
    }
}

/// What the HTTP codecs ask of a listener's connection and tell it.
struct ConnHooks<'a> {
    ctx: &'a ListenerCtx,
    info: &'a ConnInfo,
}

impl h1::Hooks for ConnHooks<'_> {
    /// From the listener's open and parked connections, on every worker.
    fn park_after(&self) -> Option<Duration> {
        self.ctx.parking.as_ref()?;
        let parked = usize::try_from(self.ctx.metrics.parked.get()).unwrap_or(0);
        let open = self.ctx.active.load(Ordering::Relaxed);
        Some(park::park_after(open, parked))
    }

    fn refused(&self, status: u16, reason: &'static str) {
        record_refused(&self.ctx.shared, self.info, status, reason);
    }
}

enum Sniff {
    H1,
    H2,
    Closed,
}

/// Reads the first bytes to tell h2c (the HTTP/2 preface) from HTTP/1.1,
/// waiting at most `limit` for them; returns what was read, for the
/// protocol's codec to start from. Reading instead of peeking saves a
/// system call per connection; no buffer is held while waiting for bytes.
async fn sniff_h2(stream: &mut LazyTcp, limit: Duration) -> (Sniff, BytesMut) {
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            if stream.is_registered()
                && poll_fn(|cx| h1::Transport::poll_read_ready(stream, cx))
                    .await
                    .is_err()
            {
                return Sniff::Closed;
            }
            if buf.capacity() == 0 {
                buf = buffers::take();
            }
            // One read, tried at once: it registers the socket and returns
            // `Pending` if nothing has arrived yet.
            let read = poll_fn(|cx| {
                Poll::Ready(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *stream),
                    cx,
                    &mut buf,
                ))
            })
            .await;
            match read {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Sniff::Closed,
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => {
                    if buf.is_empty() {
                        buffers::give(std::mem::take(&mut buf));
                    }
                    continue;
                }
            }
            let n = buf.len().min(H2_PREFACE.len());
            if buf[..n] != H2_PREFACE[..n] {
                return Sniff::H1;
            }
            if n == H2_PREFACE.len() {
                return Sniff::H2;
            }
        }
    };
    let sniff = tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Sniff::Closed);
    (sniff, buf)
}

/// Serves an HTTP/2 connection with Sluice's own codec (`proxy::h2`).
/// `first` holds what the h2c sniff already read.
async fn serve_h2<S: h1::Transport>(
    ctx: &ListenerCtx,
    info: &ConnInfo,
    stream: S,
    first: BytesMut,
) {
    let shared = &ctx.shared;
    let handler =
        |req: http::Request<h2::RequestBody>| handle(shared, info, req.map(RequestBody::H2));
    let hooks = ConnHooks { ctx, info };
    let settings = h2::H2Settings {
        max_header_list: ctx.settings.max_head_bytes,
        max_headers: ctx.settings.max_headers,
        idle_timeout: ctx.settings.idle_timeout,
        ..h2::H2Settings::default()
    };
    let close = ctx.close.clone();
    if let Err(err) = h2::serve_connection(stream, first, &settings, close, handler, &hooks).await {
        tracing::debug!(error = %err, "h2 connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::output_size;

    /// A connection accepted after `set_delayed_ack(true)` starts with
    /// delayed ACKs; after `set_delayed_ack(false)`, with immediate ones.
    #[tokio::test]
    async fn accepted_connections_inherit_the_ack_mode() {
        let socket = listen_shared("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = socket.local_addr().unwrap();
        let acceptor = socket.acceptor(0).unwrap();
        for delayed in [true, false, true] {
            socket.set_delayed_ack(delayed).unwrap();
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let (accepted, _) = acceptor.accept().await.unwrap();
            let quickack = SockRef::from(&accepted).tcp_quickack().unwrap();
            assert_eq!(quickack, !delayed, "delayed = {delayed}");
        }
    }

    /// A group of two sockets on port 0 shares one port, and the kernel
    /// spreads connections over both members' queues, each of which only
    /// its own acceptor takes from.
    #[tokio::test]
    async fn a_socket_group_spreads_connections_over_its_members() {
        let socket = listen_shared("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        assert_eq!(socket.members(), 2);
        let addr = socket.local_addr().unwrap();
        assert_eq!(socket.members[1].local_addr().unwrap(), addr);
        let acceptors = [socket.acceptor(0).unwrap(), socket.acceptor(1).unwrap()];
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut taken = [0usize; 2];
        for (member, acceptor) in acceptors.iter().enumerate() {
            while taken.iter().sum::<usize>() < clients.len() {
                match tokio::time::timeout(Duration::from_millis(200), acceptor.accept()).await {
                    Ok(accepted) => {
                        accepted.unwrap();
                        taken[member] += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        assert_eq!(taken.iter().sum::<usize>(), clients.len(), "{taken:?}");
        assert!(taken.iter().all(|&n| n > 0), "{taken:?}");
    }

    /// A member shut by its acceptor leaves the group: every new
    /// connection goes to the other member, none is refused.
    #[tokio::test]
    async fn a_shut_member_gets_no_more_connections() {
        let socket = listen_shared("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = socket.local_addr().unwrap();
        let acceptors = [socket.acceptor(0).unwrap(), socket.acceptor(1).unwrap()];
        acceptors[0].shut();
        let clients: Vec<_> = (0..32)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        for _ in &clients {
            let accepted = tokio::time::timeout(Duration::from_secs(5), acceptors[1].accept());
            accepted.await.expect("queued on the shut member").unwrap();
        }
        assert!(acceptors[0].accept_now().is_none_or(|r| r.is_err()));
    }

    /// Each open connection holds one of these futures until it is parked
    /// (or for its whole life on TLS), so its size is memory per connection.
    #[test]
    fn a_connection_task_stays_small() {
        let size = output_size(serve_conn);
        println!("connection future: {size} bytes");
        assert!(size <= 1352, "connection future grew to {size} bytes");
    }
}
