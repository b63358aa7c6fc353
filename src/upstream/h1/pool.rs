//! Idle keep-alive connections to one backend.
//!
//! A connection is taken from the pool by the request that uses it and put
//! back when its response has been read to the end, so no task sits beside
//! a pooled connection and no channel carries a request to it. The most
//! recently used connection goes out first (it is the least likely to have
//! been closed by the backend). A connection the backend has closed while
//! idle is found by looking at the reactor's readiness for it, which costs
//! no system call unless the socket did become readable. Connections idle
//! longer than `idle_timeout` are closed by a sweeper task that runs while
//! the pool holds any.
//!
//! Each worker thread keeps its own idle connections (as each NGINX worker
//! process keeps its own `keepalive` cache): a connection is registered with
//! the reactor of the worker that opened it, so one worker handing it to
//! another would have every readiness event of it cross threads. So
//! `max_idle` bounds each worker's idle connections to the backend, and
//! a worker's sweeper runs on that worker.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::proxy::timer;
use crate::runtime::workers;
use crate::upstream::client::BackendStream;

/// How often the sweeper looks, at most and at least.
const SWEEP_MIN: Duration = Duration::from_millis(50);
const SWEEP_MAX: Duration = Duration::from_secs(5);

struct Idle {
    stream: BackendStream,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    idle: VecDeque<Idle>,
    sweeping: bool,
    /// Timers of finished tries, still armed (see [`Pool::timer`]).
    timers: Vec<Pin<Box<Sleep>>>,
}

/// One worker's part of a pool, on a cache line of its own, so workers
/// taking their own locks do not contend for the line.
#[repr(align(128))]
struct Shard(Mutex<Inner>);

/// The idle connections of one backend, per worker.
pub struct Pool {
    shards: Box<[Shard]>,
    /// Per worker.
    max_idle: usize,
    idle_timeout: Duration,
    /// Ends the sweeper when the pool goes (a removed backend).
    gone: CancellationToken,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.gone.cancel();
    }
}

impl Pool {
    /// A pool keeping at most `max_idle` connections per worker for
    /// `idle_timeout`.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        let shards = (0..workers::slots())
            .map(|_| Shard(Mutex::new(Inner::default())))
            .collect();
        Arc::new(Pool {
            shards,
            max_idle,
            idle_timeout,
            gone: CancellationToken::new(),
        })
    }

    /// The calling worker's shard. A worker started after this pool was
    /// made (only in a process that runs more than one Sluice) shares the
    /// last one.
    fn shard(&self) -> usize {
        workers::current().min(self.shards.len() - 1)
    }

    /// The calling worker's idle connections.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.lock_shard(self.shard())
    }

    fn lock_shard(&self, shard: usize) -> MutexGuard<'_, Inner> {
        self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection that still looks usable at `now`, newest first.
    pub fn checkout(&self, now: Instant) -> Option<BackendStream> {
        loop {
            let idle = {
                let mut inner = self.lock();
                let idle = inner.idle.pop_back()?;
                if now.saturating_duration_since(idle.since) >= self.idle_timeout {
                    // Everything older has expired too.
                    let expired = std::mem::take(&mut inner.idle);
                    drop(inner);
                    drop(expired);
                    return None;
                }
                idle
            };
            if still_open(&idle.stream) {
                return Some(idle.stream);
            }
        }
    }

    /// Puts a connection whose last exchange ended cleanly back.
    pub fn checkin(self: &Arc<Self>, stream: BackendStream) {
        if self.max_idle == 0 || self.idle_timeout.is_zero() {
            return;
        }
        let shard = self.shard();
        let mut inner = self.lock_shard(shard);
        let evicted = if inner.idle.len() >= self.max_idle {
            inner.idle.pop_front()
        } else {
            None
        };
        inner.idle.push_back(Idle {
            stream,
            since: Instant::now(),
        });
        let start_sweeper = !inner.sweeping;
        if start_sweeper {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                inner.sweeping = true;
                let gone = self.gone.clone();
                let sweeper = sweep(Arc::downgrade(self), shard, self.sweep_every(), gone);
                handle.spawn(sweeper);
            }
        }
        drop(inner);
        drop(evicted);
    }

    /// A timer for a try that must have its response head by `deadline`,
    /// [armed](crate::proxy::timer::arm) for it. Timers are kept by the
    /// pool between tries, as many as it keeps connections, still
    /// registered for an earlier try's deadline: a try on a busy backend
    /// registers none (see `proxy::timer`).
    pub fn timer(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        let kept = self.lock().timers.pop();
        match kept {
            Some(mut timer) => {
                timer::arm(timer.as_mut(), deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Gives back a try's timer.
    pub fn put_timer(&self, timer: Pin<Box<Sleep>>) {
        let mut inner = self.lock();
        if inner.timers.len() < self.max_idle {
            inner.timers.push(timer);
        }
    }

    /// Idle connections held now, by every worker.
    pub fn idle(&self) -> usize {
        (0..self.shards.len())
            .map(|shard| self.lock_shard(shard).idle.len())
            .sum()
    }

    fn sweep_every(&self) -> Duration {
        (self.idle_timeout / 2).clamp(SWEEP_MIN, SWEEP_MAX)
    }

    /// Closes a shard's expired connections; false once the shard is empty
    /// (its sweeper then stops until a connection comes back).
    fn sweep_once(&self, shard: usize) -> bool {
        let mut inner = self.lock_shard(shard);
        let keep_from = inner
            .idle
            .iter()
            .position(|i| i.since.elapsed() < self.idle_timeout)
            .unwrap_or(inner.idle.len());
        let expired: Vec<Idle> = inner.idle.drain(..keep_from).collect();
        let busy = !inner.idle.is_empty();
        inner.sweeping = busy;
        drop(inner);
        drop(expired);
        busy
    }
}

async fn sweep(pool: Weak<Pool>, shard: usize, every: Duration, gone: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = gone.cancelled() => return,
        }
        let Some(pool) = pool.upgrade() else { return };
        if !pool.sweep_once(shard) {
            return;
        }
    }
}

/// Whether an idle connection is still open: a readable idle connection
/// was closed by the backend (or sent bytes nobody asked for), either way
/// it cannot carry a request.
fn still_open(stream: &BackendStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let tcp = stream.tcp();
    match tcp.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        // Readiness can be left over from the last read of the response;
        // a read tells. Over TLS a stray record cannot be told from a
        // close without decrypting, so the connection is dropped.
        Poll::Ready(Ok(())) => match stream {
            BackendStream::Plain(s) => {
                matches!(s.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            BackendStream::Tls(_) => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair(listener: &TcpListener) -> (BackendStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (BackendStream::Plain(client.unwrap()), server.unwrap().0)
    }

    #[tokio::test]
    async fn newest_out_first_and_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(2, Duration::from_secs(60));
        let mut servers = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let (c, s) = pair(&listener).await;
            ports.push(c.tcp().local_addr().unwrap().port());
            pool.checkin(c);
            servers.push(s);
        }
        assert_eq!(pool.idle(), 2);
        let out = pool.checkout(Instant::now()).unwrap();
        assert_eq!(out.tcp().local_addr().unwrap().port(), ports[2]);
        let out = pool.checkout(Instant::now()).unwrap();
        assert_eq!(out.tcp().local_addr().unwrap().port(), ports[1]);
        assert!(pool.checkout(Instant::now()).is_none());
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_backend_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8, Duration::from_secs(60));
        let (live, _keep) = pair(&listener).await;
        pool.checkin(live);
        let (dead, server) = pair(&listener).await;
        pool.checkin(dead);
        drop(server);
        // Wait until the reactor has seen the close.
        let mut waited = 0;
        while still_open_newest(&pool) && waited < 500 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            waited += 1;
        }
        let out = pool.checkout(Instant::now()).unwrap();
        assert!(still_open(&out));
        assert!(pool.checkout(Instant::now()).is_none());
    }

    fn still_open_newest(pool: &Pool) -> bool {
        let inner = pool.lock();
        inner.idle.back().is_some_and(|i| still_open(&i.stream))
    }

    #[tokio::test]
    async fn stray_bytes_make_a_connection_unusable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (c, mut server) = pair(&listener).await;
        server.write_all(b"x").await.unwrap();
        c.tcp().readable().await.unwrap();
        assert!(!still_open(&c));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8, Duration::from_secs(10));
        let (c, _s) = pair(&listener).await;
        pool.checkin(c);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(pool.idle(), 0, "the sweeper closed it");
        let (c, _s2) = pair(&listener).await;
        pool.checkin(c);
        assert_eq!(pool.idle(), 1, "a new sweeper runs");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(pool.idle(), 0);
        assert!(pool.checkout(Instant::now()).is_none());
    }

    /// A connection put back on one worker is taken out on that worker
    /// only, and `max_idle` bounds each worker's connections.
    #[tokio::test]
    async fn each_worker_keeps_its_own_connections() {
        let workers = workers::Workers::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(1, Duration::from_secs(60));
        let mut servers = Vec::new();
        let mut ports = Vec::new();
        for worker in [0, 1, 1] {
            let (c, s) = pair(&listener).await;
            ports.push(c.tcp().local_addr().unwrap().port());
            servers.push(s);
            let pool = Arc::clone(&pool);
            workers.handles()[worker]
                .spawn(async move { pool.checkin(c) })
                .await
                .unwrap();
        }
        assert_eq!(pool.idle(), 2, "one per worker");
        let port_on = |worker: usize| {
            let pool = Arc::clone(&pool);
            workers.handles()[worker].spawn(async move {
                pool.checkout(Instant::now())
                    .map(|c| c.tcp().local_addr().unwrap().port())
            })
        };
        assert_eq!(port_on(1).await.unwrap(), Some(ports[2]));
        assert_eq!(port_on(1).await.unwrap(), None, "worker 1 has no more");
        assert_eq!(port_on(0).await.unwrap(), Some(ports[0]));
        assert_eq!(port_on(0).await.unwrap(), None);
    }

    #[tokio::test]
    async fn no_pool_means_no_idle_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(0, Duration::from_secs(10));
        let (c, _s) = pair(&listener).await;
        pool.checkin(c);
        assert!(pool.checkout(Instant::now()).is_none());
    }
}
