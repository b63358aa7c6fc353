//! The L4 pipeline: one client connection to one backend, bytes both ways.
//!
//! [`serve`] has the same shape as the HTTP pipeline: load the snapshot,
//! take an in-flight permit, pick a backend, connect under the connect
//! timeout (failing over to another eligible backend before any byte has
//! moved), then pump bytes both ways under the idle timeout. Each direction
//! waits for readability holding no buffer and borrows one from the
//! per-thread pool only while bytes move; an end of stream is passed on as
//! a half-close, so protocols that shut down one direction keep working.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::admin::metrics::{ListenerMetrics, Outcome};
use crate::config::{BalancerKind, ProxyProtocolVersion};
use crate::proxy::error::ProxyError;
use crate::proxy::http::{client_ip_hash, ConnInfo};
use crate::proxy::{buffers, proxy_protocol, sni};
use crate::state::Shared;
use crate::upstream::backend::{BackendState, RequestGuard};
use crate::upstream::Upstream;

/// Bytes read from a socket at a time while a session is busy.
const READ_CHUNK: usize = buffers::POOL_MAX_CAPACITY;

/// Why a session ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed their direction.
    Closed,
    IdleTimeout,
    ClientError,
    BackendError,
}

impl CloseReason {
    fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::IdleTimeout => "idle-timeout",
            CloseReason::ClientError => "client-error",
            CloseReason::BackendError => "backend-error",
        }
    }
}

/// Serves one TCP session accepted on a `protocol = "tcp"` listener.
pub async fn serve(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    client: TcpStream,
    metrics: Arc<ListenerMetrics>,
) {
    let started = Instant::now();
    let snapshot = shared.snapshot.load_full();
    let Some(listener) = snapshot.listener(info.listener, &info.listener_name) else {
        return;
    };
    let idle = listener.config.timeouts.idle;
    let target = if listener.config.tls_passthrough {
        // Route by the ClientHello's server name; the bytes stay in the
        // socket and reach the backend untouched.
        let limit = listener.config.timeouts.client_header;
        match sni::peek_sni(&client, limit, sni::DEFAULT_PEEK_MAX).await {
            Ok(name) => listener.router.route_sni(name.as_deref()),
            Err(err) => {
                metrics.client_hello_errors.inc();
                tracing::debug!(error = %err, "no usable ClientHello");
                return;
            }
        }
    } else {
        listener.router.default_upstream()
    };
    let Some(upstream) = target.and_then(|i| snapshot.upstreams.get(i)) else {
        tracing::debug!("no upstream for this session");
        return;
    };
    let Some(_permit) = upstream.limit.try_acquire() else {
        upstream.shed.overloaded.inc();
        tracing::debug!(
            upstream = &*upstream.name,
            "session shed: upstream at max_in_flight"
        );
        return;
    };
    // Sessions can only be keyed by the client's address.
    let key = match upstream.config.balancer {
        BalancerKind::ConsistentHash { .. } => Some(client_ip_hash(info.peer.ip())),
        _ => None,
    };
    let (backend_stream, mut guard) = match connect_any(upstream, key).await {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(upstream = &*upstream.name, error = %err, "no backend for the session");
            return;
        }
    };
    let backend = Arc::clone(guard.backend());
    if let Some(version) = upstream.config.send_proxy_protocol {
        let header = match version {
            ProxyProtocolVersion::V1 => proxy_protocol::encode_v1(info.peer, info.destination),
            ProxyProtocolVersion::V2 => proxy_protocol::encode_v2(info.peer, info.destination),
        };
        let clock = Activity::new();
        if write_all(&backend_stream, &header, idle, &clock)
            .await
            .is_err()
        {
            guard.set_outcome(Outcome::Reset);
            return;
        }
    }
    let session = pump(&client, &backend_stream, idle, &metrics).await;
    guard.set_outcome(match session.reason {
        CloseReason::BackendError => Outcome::Reset,
        _ => Outcome::Success,
    });
    drop(guard);
    if snapshot.config.log.access_log {
        tracing::info!(
            target: "sluice::access",
            listener = &*listener.name,
            client = %info.peer,
            upstream = &*upstream.name,
            backend = &*backend.key.address,
            bytes_in = session.from_client,
            bytes_out = session.to_client,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            close = session.reason.as_str(),
        );
    }
}

/// Connects to an eligible backend, trying the others when a connect fails
/// or times out. The guard counts the session as in flight on its backend.
pub async fn connect_any(
    upstream: &Upstream,
    key: Option<u64>,
) -> Result<(TcpStream, RequestGuard), ProxyError> {
    let mut tried: Vec<Arc<BackendState>> = Vec::new();
    let mut last_error = None;
    loop {
        let Some(backend) = upstream.pick_excluding(key, &tried) else {
            if last_error.is_none() {
                upstream.shed.no_healthy_backend.inc();
            }
            return Err(last_error.unwrap_or_else(|| ProxyError::NoHealthyBackend {
                upstream: upstream.name.to_string(),
            }));
        };
        let backend = Arc::clone(backend);
        let mut guard = backend.start_request();
        let after = upstream.config.timeouts.connect;
        let err = match tokio::time::timeout(after, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, guard));
            }
            Ok(Err(source)) => ProxyError::Connect {
                addr: backend.addr,
                source,
            },
            Err(_) => ProxyError::ConnectTimeout {
                addr: backend.addr,
                after,
            },
        };
        tracing::debug!(backend = &*backend.key.address, error = %err, "connect failed; trying another backend");
        guard.set_outcome(Outcome::ConnectFailure);
        drop(guard);
        tried.push(backend);
        last_error = Some(err);
    }
}

/// What a finished session moved and why it ended.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub from_client: u64,
    pub to_client: u64,
    pub reason: CloseReason,
}

/// Moves bytes both ways until both directions have ended, one side fails,
/// or nothing moved in either direction for `idle`.
pub async fn pump(
    client: &TcpStream,
    backend: &TcpStream,
    idle: Duration,
    metrics: &ListenerMetrics,
) -> Session {
    let clock = Activity::new();
    let up = one_way(client, backend, idle, &clock, &metrics.bytes_rx, &clock.up);
    let down = one_way(
        backend,
        client,
        idle,
        &clock,
        &metrics.bytes_tx,
        &clock.down,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (None, None);
    let reason = loop {
        tokio::select! {
            r = &mut up, if up_done.is_none() => match r {
                Ok(n) => up_done = Some(n),
                Err(e) => break failure(e, Side::Client),
            },
            r = &mut down, if down_done.is_none() => match r {
                Ok(n) => down_done = Some(n),
                Err(e) => break failure(e, Side::Backend),
            },
        }
        if up_done.is_some() && down_done.is_some() {
            break CloseReason::Closed;
        }
    };
    Session {
        from_client: up_done.unwrap_or(clock.up.load(Ordering::Relaxed)),
        to_client: down_done.unwrap_or(clock.down.load(Ordering::Relaxed)),
        reason,
    }
}

enum Side {
    /// The error came up while reading the client or writing the backend.
    Client,
    Backend,
}

/// Maps a direction's error to a close reason: an idle timeout is its own;
/// otherwise the side that was being read is blamed.
fn failure(err: DirectionError, read_side: Side) -> CloseReason {
    match err {
        DirectionError::Idle => CloseReason::IdleTimeout,
        DirectionError::Read(_) => match read_side {
            Side::Client => CloseReason::ClientError,
            Side::Backend => CloseReason::BackendError,
        },
        DirectionError::Write(_) => match read_side {
            Side::Client => CloseReason::BackendError,
            Side::Backend => CloseReason::ClientError,
        },
    }
}

enum DirectionError {
    Idle,
    Read(#[allow(dead_code)] io::Error),
    Write(#[allow(dead_code)] io::Error),
}

/// When bytes last moved in either direction, shared by both.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long until the session has been idle for `idle`; zero when it has.
    fn idle_left(&self, idle: Duration) -> Duration {
        let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        (last + idle).saturating_duration_since(Instant::now())
    }
}

/// Copies `from` -> `to` until `from` ends (then half-closes `to`), adding
/// what it moves to `counter` and `moved`.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    idle: Duration,
    clock: &Activity,
    counter: &IntCounter,
    moved: &AtomicU64,
) -> Result<u64, DirectionError> {
    let mut total = 0u64;
    loop {
        wait(idle, clock, from.readable())
            .await?
            .map_err(DirectionError::Read)?;
        let mut buf = buffers::take();
        buf.reserve(READ_CHUNK);
        let result = loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // End of stream: pass the half-close on.
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    break Ok(Some(total));
                }
                Ok(n) => {
                    if let Err(e) = write_all(to, &buf[..n], idle, clock).await {
                        break Err(e);
                    }
                    total += n as u64;
                    counter.inc_by(n as u64);
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    clock.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                Err(e) => break Err(DirectionError::Read(e)),
            }
        };
        buffers::give(buf);
        if let Some(done) = result? {
            return Ok(done);
        }
    }
}

async fn write_all(
    to: &TcpStream,
    mut data: &[u8],
    idle: Duration,
    clock: &Activity,
) -> Result<(), DirectionError> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(idle, clock, to.writable())
                    .await?
                    .map_err(DirectionError::Write)?;
            }
            Err(e) => return Err(DirectionError::Write(e)),
        }
    }
    Ok(())
}

/// Awaits `ready` while the session as a whole has not been idle for `idle`.
async fn wait<F: std::future::Future<Output = io::Result<()>>>(
    idle: Duration,
    clock: &Activity,
    ready: F,
) -> Result<io::Result<()>, DirectionError> {
    tokio::pin!(ready);
    loop {
        let left = clock.idle_left(idle);
        if left.is_zero() {
            return Err(DirectionError::Idle);
        }
        if let Ok(r) = tokio::time::timeout(left, ready.as_mut()).await {
            return Ok(r);
        }
    }
}
