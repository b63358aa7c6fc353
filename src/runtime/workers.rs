//! Worker threads, each with its own event loop.
//!
//! Sluice runs `runtime.workers` single-threaded tokio runtimes, one per
//! thread, the way HAProxy runs one event loop per thread and NGINX one per
//! worker process. Worker 0 is the runtime that calls
//! [`run`](super::run) (the process's main thread); the others are started
//! here. Each listener has one socket per worker (`SO_REUSEPORT`: the
//! kernel spreads new connections over them), and a connection lives its
//! whole life on the worker that accepted it: its task, its reactor
//! registration, its timers, its buffers and the backend connections it
//! borrows all belong to that worker, so a request never wakes or waits
//! for another thread. What workers share is read-mostly or atomic: the
//! config snapshot, the backends' counters and health, metrics.
//!
//! Control work (reloads, health checks, the admin server, signals) runs on
//! worker 0.

use std::cell::Cell;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::busy_poll;

thread_local! {
    /// The index of the worker running on this thread; 0 on every thread
    /// that is not one of the started workers.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The most workers any [`Workers`] of this process has had: per-worker
/// state is sized by it, so every worker's index fits.
static MOST: AtomicUsize = AtomicUsize::new(1);

/// The index of the worker running on this thread (0 off the workers).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How many slots per-worker state needs: every index [`current`] can
/// return is below it.
pub fn slots() -> usize {
    MOST.load(Ordering::Relaxed)
}

/// The worker count `runtime.workers` asks for: 0 means one per CPU.
pub fn resolve(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        n => n,
    }
}

/// The running workers. Dropping it stops the started ones: their
/// runtimes, and every task still on them, are dropped.
pub struct Workers {
    handles: Vec<Handle>,
    /// Cancelled on drop: the started runtimes end, and the pollers.
    stop: CancellationToken,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Workers {
    /// `count` workers (at least one): the current runtime as worker 0 and
    /// `count - 1` new threads. Must be called within a tokio runtime.
    pub fn start(count: usize) -> io::Result<Workers> {
        let count = count.max(1);
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        handles.push(Handle::current());
        for index in 1..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("sluice-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(stop.cancelled());
                })?;
        }
        MOST.fetch_max(count, Ordering::Relaxed);
        Ok(Workers { handles, stop })
    }

    /// Starts each worker's poller (`runtime.busy_poll` and
    /// `busy_poll_interval`); they stop with the workers.
    pub fn busy_poll(&self, window: Duration, interval: Duration) {
        for handle in &self.handles {
            handle.spawn(busy_poll::run(window, interval, self.stop.clone()));
        }
    }

    /// One handle per worker, by index.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_worker_runs_on_its_own_thread_and_knows_its_index() {
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.len(), 3);
        assert!(slots() >= 3);
        let mut seen = Vec::new();
        for handle in workers.handles() {
            let (index, thread) = handle
                .spawn(async { (current(), std::thread::current().id()) })
                .await
                .unwrap();
            seen.push((index, thread));
        }
        assert_eq!(
            seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(seen[0].1, std::thread::current().id());
        assert_ne!(seen[1].1, seen[2].1);
        assert_ne!(seen[1].1, seen[0].1);
    }

    #[tokio::test]
    async fn dropping_the_workers_stops_their_runtimes() {
        let workers = Workers::start(2).unwrap();
        let handle = workers.handles()[1].clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = handle.spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(workers);
        // The task is dropped with its runtime, and with it the sender.
        assert!(rx.await.is_err());
        assert!(waiting.await.unwrap_err().is_cancelled());
    }

    #[test]
    fn zero_means_one_per_cpu() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(resolve(0), cpus);
        assert_eq!(resolve(3), 3);
    }
}
