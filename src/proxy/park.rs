//! Parking for idle keep-alive connections.
//!
//! A keep-alive HTTP/1 connection that has waited [`PARK_AFTER`] for its
//! next request leaves the runtime: its task ends, its socket is
//! deregistered from the reactor and handed here, with only what is needed
//! to resume it (a few dozen bytes). One epoll set per listener watches every
//! parked socket; when one turns readable (a request, or the client
//! closing) it is taken out and given back to the listener, which serves it
//! on a new task. A parked connection whose idle timeout runs out is closed
//! silently, exactly as an idle one would be, and every parked connection is
//! closed when the listener's connections are told to close.
//!
//! This is what keeps ten thousand idle clients to a few hundred bytes each:
//! no task, no future, no reactor registration and no buffer per idle
//! connection, the way an event-driven proxy holds them.

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use prometheus::IntGauge;
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a keep-alive connection waits idle on its own task before it
/// is parked. Long enough that a busy connection (its next request within
/// this time) never pays the few system calls of parking and resuming.
pub const PARK_AFTER: Duration = Duration::from_millis(250);
/// The wait when a listener already has [`CROWDED`] connections open and
/// not parked: many clients arriving at once then cost memory only for a
/// moment, not for a quarter of a second each.
pub const PARK_AFTER_CROWDED: Duration = Duration::from_millis(10);
/// Open, unparked connections on one listener above which idle ones are
/// parked after [`PARK_AFTER_CROWDED`].
pub const CROWDED: usize = 256;

/// How long a connection that has just gone idle waits before parking,
/// given the listener's open and parked connection counts.
pub fn park_after(open: usize, parked: usize) -> Duration {
    if open.saturating_sub(parked) > CROWDED {
        PARK_AFTER_CROWDED
    } else {
        PARK_AFTER
    }
}

/// Readiness events taken from the epoll set per system call.
const EVENTS_PER_WAIT: usize = 64;

/// Idle connections of one listener, parked. `T` is what the listener needs
/// to resume a connection (its slot, the client's address).
pub struct Parking<T> {
    epoll: AsyncFd<EpollFd>,
    /// Kept equal to the number parked.
    gauge: IntGauge,
    inner: Mutex<Inner<T>>,
    /// `inner.parked.len()`, readable without the lock.
    count: AtomicUsize,
    /// Wakes the run loop when the deadline queue gets its first entry.
    changed: Notify,
}

struct Inner<T> {
    parked: Slab<Parked<T>>,
    /// (deadline, slab key, generation), in deadline order: every
    /// connection is parked with the same remaining idle time, so the queue
    /// stays sorted by appending. Entries of connections already woken are
    /// skipped by their generation.
    deadlines: VecDeque<(Instant, u32, u32)>,
    generation: u32,
}

struct Parked<T> {
    socket: TcpStream,
    generation: u32,
    resume: T,
}

/// The epoll instance, as a file descriptor the reactor can watch.
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

impl<T: Send + 'static> Parking<T> {
    /// A new, empty parking that keeps `gauge` at the number parked. Must
    /// be called inside the runtime.
    pub fn new(gauge: IntGauge) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        // Deprecated because a type's `as_raw_fd` could name a descriptor it
        // does not own; `EpollFd` owns its descriptor and returns that same
        // one for its whole life, which is the condition the replacement
        // (an `unsafe fn`) asks callers to promise.
        #[allow(deprecated)]
        let epoll = AsyncFd::with_interest(EpollFd(epoll), Interest::READABLE)?;
        Ok(Parking {
            epoll,
            gauge,
            count: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                parked: Slab::new(),
                deadlines: VecDeque::new(),
                generation: 0,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Parks `socket` (already deregistered from the reactor) until it turns
    /// readable or `remaining` passes. On an error the socket is dropped,
    /// which closes the connection.
    pub fn park(&self, socket: TcpStream, remaining: Duration, resume: T) -> io::Result<()> {
        let deadline = Instant::now() + remaining;
        let mut inner = self.lock();
        let generation = inner.generation;
        inner.generation = inner.generation.wrapping_add(1);
        let entry = inner.parked.vacant_entry();
        let key = entry.key();
        let data = key as u64;
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        self.epoll
            .get_ref()
            .0
            .add(socket.as_fd(), EpollEvent::new(flags, data))?;
        entry.insert(Parked {
            socket,
            generation,
            resume,
        });
        self.gauge.inc();
        self.count.fetch_add(1, Ordering::Relaxed);
        let first = inner.deadlines.is_empty();
        inner
            .deadlines
            .push_back((deadline, key as u32, generation));
        drop(inner);
        if first {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Takes a parked connection out: no longer watched.
    fn unpark(&self, inner: &mut Inner<T>, key: usize) -> Option<(TcpStream, T)> {
        let parked = inner.parked.try_remove(key)?;
        self.gauge.dec();
        self.count.fetch_sub(1, Ordering::Relaxed);
        // Deleting can only fail if the socket is already gone from the
        // set; either way it is no longer watched.
        let _ = self.epoll.get_ref().0.delete(parked.socket.as_fd());
        Some((parked.socket, parked.resume))
    }

    /// Watches the parked connections until `close` is cancelled: readable
    /// ones go to `wake`, expired ones are closed. On `close` every parked
    /// connection is closed.
    pub async fn run(&self, close: CancellationToken, mut wake: impl FnMut(TcpStream, T)) {
        let mut events = [EpollEvent::empty(); EVENTS_PER_WAIT];
        loop {
            let next = self.lock().deadlines.front().map(|d| d.0);
            tokio::select! {
                biased;
                () = close.cancelled() => break,
                ready = self.epoll.readable() => {
                    let Ok(mut guard) = ready else { break };
                    let waited = guard.try_io(|fd| {
                        match fd.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                            Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
                            Ok(n) => Ok(n),
                            Err(errno) => Err(io::Error::from(errno)),
                        }
                    });
                    let n = match waited {
                        Ok(Ok(n)) => n,
                        Ok(Err(err)) => {
                            tracing::warn!(error = %err, "waiting on parked connections failed");
                            continue;
                        }
                        Err(_would_block) => continue,
                    };
                    for event in &events[..n] {
                        let taken = self.unpark(&mut self.lock(), event.data() as usize);
                        if let Some((socket, resume)) = taken {
                            wake(socket, resume);
                        }
                    }
                }
                () = sleep_until(next) => self.expire(),
                () = self.changed.notified() => {}
            }
        }
        let mut inner = self.lock();
        inner.deadlines.clear();
        let keys: Vec<usize> = inner.parked.iter().map(|(k, _)| k).collect();
        for key in keys {
            drop(self.unpark(&mut inner, key));
        }
    }

    /// Closes the connections whose idle timeout has passed.
    fn expire(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        while let Some(&(deadline, key, generation)) = inner.deadlines.front() {
            if deadline > now {
                break;
            }
            inner.deadlines.pop_front();
            let key = key as usize;
            if inner.parked.get(key).map(|p| p.generation) == Some(generation) {
                drop(self.unpark(&mut inner, key));
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl AsFd for EpollFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0 .0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_crowded_listener_parks_sooner() {
        assert_eq!(super::park_after(10, 0), PARK_AFTER);
        assert_eq!(super::park_after(CROWDED, 0), PARK_AFTER);
        assert_eq!(super::park_after(CROWDED + 1, 0), PARK_AFTER_CROWDED);
        // Parked connections do not count towards the crowd.
        assert_eq!(super::park_after(10_000, 10_000 - CROWDED), PARK_AFTER);
    }

    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use tokio::sync::mpsc;

    /// A connected pair: (our side, the client's side), both blocking std
    /// sockets; ours is made non-blocking as a deregistered socket is.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (ours, client)
    }

    fn start(
        parking: &Arc<Parking<u32>>,
    ) -> (
        CancellationToken,
        mpsc::UnboundedReceiver<(TcpStream, u32)>,
        tokio::task::JoinHandle<()>,
    ) {
        let close = CancellationToken::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn({
            let parking = Arc::clone(parking);
            let close = close.clone();
            async move {
                parking
                    .run(close, move |s, r| {
                        let _ = tx.send((s, r));
                    })
                    .await
            }
        });
        (close, rx, task)
    }

    #[tokio::test]
    async fn a_readable_connection_is_handed_back_with_its_state() {
        let parking = Arc::new(Parking::new(IntGauge::new("parked", "parked").unwrap()).unwrap());
        let (close, mut woken, task) = start(&parking);
        let (a, mut a_client) = pair();
        let (b, _b_client) = pair();
        parking.park(a, Duration::from_secs(60), 1).unwrap();
        parking.park(b, Duration::from_secs(60), 2).unwrap();
        assert_eq!(parking.parked(), 2);

        a_client.write_all(b"GET").unwrap();
        let (mut socket, resume) = woken.recv().await.unwrap();
        assert_eq!(resume, 1);
        assert_eq!(parking.parked(), 1);
        // The bytes are still in the socket, unread.
        socket.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 3];
        socket.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"GET");

        close.cancel();
        task.await.unwrap();
        assert_eq!(parking.parked(), 0);
    }

    #[tokio::test]
    async fn a_client_closing_wakes_its_connection() {
        let parking = Arc::new(Parking::new(IntGauge::new("parked", "parked").unwrap()).unwrap());
        let (close, mut woken, task) = start(&parking);
        let (a, a_client) = pair();
        parking.park(a, Duration::from_secs(60), 7).unwrap();
        drop(a_client);
        let (_, resume) = woken.recv().await.unwrap();
        assert_eq!(resume, 7);
        close.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_expired_connection_is_closed_and_close_closes_the_rest() {
        let parking = Arc::new(Parking::new(IntGauge::new("parked", "parked").unwrap()).unwrap());
        let (close, mut woken, task) = start(&parking);
        let (a, mut a_client) = pair();
        let (b, mut b_client) = pair();
        parking.park(a, Duration::from_millis(50), 1).unwrap();
        parking.park(b, Duration::from_secs(60), 2).unwrap();
        // The client of the expired one sees the close (EOF).
        let mut buf = [0u8; 1];
        let n = tokio::task::spawn_blocking(move || a_client.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(parking.parked(), 1);

        close.cancel();
        task.await.unwrap();
        assert_eq!(parking.parked(), 0);
        let n = tokio::task::spawn_blocking(move || b_client.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        assert!(woken.try_recv().is_err(), "nothing was woken");
    }

    #[tokio::test]
    async fn a_slot_reused_after_a_wake_keeps_its_own_deadline() {
        let parking = Arc::new(Parking::new(IntGauge::new("parked", "parked").unwrap()).unwrap());
        let (close, mut woken, task) = start(&parking);
        let (a, mut a_client) = pair();
        parking.park(a, Duration::from_millis(100), 1).unwrap();
        a_client.write_all(b"x").unwrap();
        let _ = woken.recv().await.unwrap();
        // Same slab slot, new generation and a long deadline: the stale
        // 100 ms entry must not close it.
        let (b, mut b_client) = pair();
        parking.park(b, Duration::from_secs(60), 2).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(parking.parked(), 1);
        b_client.write_all(b"y").unwrap();
        let (_, resume) = woken.recv().await.unwrap();
        assert_eq!(resume, 2);
        close.cancel();
        task.await.unwrap();
    }
}
