//! Deadlines over a reused timer, moved lazily.
//!
//! Registering a tokio timer and cancelling it costs a few hundred
//! instructions in the runtime's timer wheel. A keep-alive connection's
//! idle wait and a backend call's per-try limit come once per request,
//! and nearly always end before their deadline, so they reuse one
//! long-lived [`Sleep`] instead: it is left armed for an earlier deadline
//! (that of an earlier wait), fires early at most once per timeout, and is
//! moved to the real deadline only then.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::time::{Instant, Sleep};

/// Makes sure `timer` fires no later than `deadline`.
pub fn arm(timer: Pin<&mut Sleep>, deadline: Instant) {
    if timer.deadline() > deadline {
        timer.reset(deadline);
    }
}

/// Ready once `deadline` has passed, with `timer` [armed](arm) for it or
/// earlier.
pub fn poll_deadline(
    mut timer: Pin<&mut Sleep>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        ready!(timer.as_mut().poll(cx));
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        // It fired for an earlier deadline.
        timer.as_mut().reset(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn an_early_timer_is_moved_and_a_late_one_brought_forward() {
        let start = Instant::now();
        let mut timer = Box::pin(tokio::time::sleep_until(start + Duration::from_secs(1)));

        // Armed earlier than the deadline: left as it is, and fires early.
        let deadline = start + Duration::from_secs(3);
        arm(timer.as_mut(), deadline);
        assert_eq!(timer.deadline(), start + Duration::from_secs(1));
        poll_fn(|cx| poll_deadline(timer.as_mut(), deadline, cx)).await;
        assert_eq!(Instant::now(), deadline);

        // Armed later than the deadline: brought forward.
        let deadline = Instant::now() + Duration::from_millis(10);
        timer
            .as_mut()
            .reset(Instant::now() + Duration::from_secs(60));
        arm(timer.as_mut(), deadline);
        assert_eq!(timer.deadline(), deadline);
        poll_fn(|cx| poll_deadline(timer.as_mut(), deadline, cx)).await;
        assert_eq!(Instant::now(), deadline);
    }
}
