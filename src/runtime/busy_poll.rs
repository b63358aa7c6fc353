//! Busy polling (`runtime.busy_poll`): a worker that has had work keeps
//! polling its reactor for a while instead of going to sleep.
//!
//! A worker with nothing to do sleeps in `epoll_wait`, and the next packet
//! for it has to wake it. On bare metal that is cheap. In a virtual
//! machine whose idle CPUs halt, the waker pays for an inter-processor
//! interrupt and the exits around it: measured here, a write that wakes a
//! thread sleeping on the other CPU took 7.9 µs instead of 1.0 µs. Under
//! load that cost lands on whatever sends to the proxy (clients and
//! backends sharing a machine with it pay it in their own CPU time) and
//! on latency. HAProxy's `busy-polling` answers the same problem by never
//! sleeping; this poller stops polling once the traffic stops.
//!
//! With a window set, each worker runs one more task, the poller. While
//! work keeps arriving (a new connection, a new request) it yields on
//! every turn, so the worker's loop asks the reactor for events without
//! waiting (`epoll_wait` with a zero timeout) instead of sleeping. Once a
//! whole window passes without new work it stops and waits for the next
//! piece of work like every other task, so an idle proxy sleeps as it
//! would without the setting. The CPU it spends while polling is real:
//! the setting trades CPU for latency and for its peers' CPU.
//!
//! With an interval (`runtime.busy_poll_interval`) the poller does not
//! spin: after a turn that brought no new work it puts the worker to sleep
//! on a timer for the interval, then lets it poll again. Data that arrives
//! meanwhile wakes nobody, since the worker is not waiting in `epoll_wait`;
//! it is picked up at the next poll, at the price of that much latency.
//! The timer wakes the worker on its own CPU, so the senders pay nothing,
//! and a sleeping worker spends no CPU.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

thread_local! {
    /// Work this worker has been given: connections and requests.
    static WORK: Cell<u64> = const { Cell::new(0) };
    /// The poller, while it waits for work.
    static WAITING: Cell<Option<Waker>> = const { Cell::new(None) };
    /// The poller's polling turns so far.
    static TURNS: Cell<u64> = const { Cell::new(0) };
}

/// Counts a piece of work (an accepted connection, a request) on the
/// current worker, waking its poller if it is waiting.
#[inline]
pub fn note_work() {
    WORK.with(|w| w.set(w.get().wrapping_add(1)));
    if let Some(poller) = WAITING.with(Cell::take) {
        poller.wake();
    }
}

fn work() -> u64 {
    WORK.with(Cell::get)
}

/// The poller's polling turns on this worker so far.
pub fn turns() -> u64 {
    TURNS.with(Cell::get)
}

/// The poller of the worker it runs on: polls for `window` after each new
/// piece of work, sleeping `interval` (if not zero) after each turn
/// without new work, until `stop`.
pub async fn run(window: Duration, interval: Duration, stop: CancellationToken) {
    stop.run_until_cancelled(poll_while_busy(window, interval))
        .await;
}

async fn poll_while_busy(window: Duration, interval: Duration) {
    loop {
        let mut seen = work();
        let mut since = Instant::now();
        loop {
            tokio::task::yield_now().await;
            TURNS.with(|t| t.set(t.get() + 1));
            let now = work();
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= window {
                break;
            } else if !interval.is_zero() {
                // Blocks the worker on purpose: it has nothing else to do
                // (the tasks that the last poll woke have run), and
                // sleeping here instead of in `epoll_wait` is the point.
                std::thread::sleep(interval);
            }
        }
        // A quiet window: wait, without polling, for the next work.
        poll_fn(|cx| {
            if work() != seen {
                return Poll::Ready(());
            }
            WAITING.with(|w| w.set(Some(cx.waker().clone())));
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The poller's turns on this thread while `during` elapses.
    async fn turns_during(during: Duration) -> u64 {
        let before = turns();
        tokio::time::sleep(during).await;
        turns() - before
    }

    #[tokio::test]
    async fn the_poller_polls_after_work_and_sleeps_once_a_window_passes_without_any() {
        let window = Duration::from_millis(150);
        let stop = CancellationToken::new();
        let poller = tokio::spawn(run(window, Duration::ZERO, stop.clone()));
        // Started: it polls for a window, then waits for work.
        assert!(turns_during(Duration::from_millis(50)).await > 0);
        tokio::time::sleep(window * 2).await;
        assert_eq!(turns_during(Duration::from_millis(100)).await, 0);
        // Work wakes it, and it polls again.
        note_work();
        assert!(turns_during(Duration::from_millis(50)).await > 0);
        tokio::time::sleep(window * 2).await;
        assert_eq!(turns_during(Duration::from_millis(100)).await, 0);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), poller)
            .await
            .expect("stopped")
            .unwrap();
    }

    /// With an interval the poller sleeps between polls that find no new
    /// work (at most one turn per interval), and still stops polling once a
    /// window passes without work.
    #[tokio::test]
    async fn with_an_interval_the_poller_sleeps_between_polls() {
        let (window, interval) = (Duration::from_millis(300), Duration::from_millis(20));
        let stop = CancellationToken::new();
        let poller = tokio::spawn(run(window, interval, stop.clone()));
        let during = Duration::from_millis(100);
        let started = Instant::now();
        let turns = turns_during(during).await;
        let elapsed = started.elapsed();
        // A sleep is never shorter than asked; 2 for the turns at the ends.
        let most = (elapsed.as_millis() / interval.as_millis()) as u64 + 2;
        assert!(turns > 0 && turns <= most, "{turns} turns in {elapsed:?}");
        tokio::time::sleep(window * 2).await;
        assert_eq!(turns_during(Duration::from_millis(100)).await, 0);
        // Without an interval, the same poller spins.
        stop.cancel();
        poller.await.unwrap();
        let stop = CancellationToken::new();
        let poller = tokio::spawn(run(window, Duration::ZERO, stop.clone()));
        let spinning = turns_during(during).await;
        assert!(
            spinning > most,
            "{spinning} turns spinning, {turns} sleeping"
        );
        stop.cancel();
        poller.await.unwrap();
    }

    #[tokio::test]
    async fn a_poller_stops_while_polling() {
        let stop = CancellationToken::new();
        let poller = tokio::spawn(run(Duration::from_secs(3600), Duration::ZERO, stop.clone()));
        assert!(turns_during(Duration::from_millis(20)).await > 0);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), poller)
            .await
            .expect("stopped")
            .unwrap();
        assert_eq!(turns_during(Duration::from_millis(50)).await, 0);
    }
}
