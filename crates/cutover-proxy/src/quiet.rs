//! "Nothing moved for this long": the timer behind a response write to a
//! client that reads nothing (`idle_timeout`) and an upstream that sends
//! nothing mid-body (`upstream_response_timeout`).

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A timer armed only once something has to wait, and re-armed only when it
/// fires early: progress costs no timer operation, only the next wait a
/// clock read.
#[derive(Debug)]
pub(crate) struct QuietTimer {
    limit: Duration,
    /// Since when the wait has lasted (none: nothing waits).
    since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl QuietTimer {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit, since: None, timer: None }
    }

    /// Something moved: a wait, if any, ended.
    pub(crate) fn progress(&mut self) {
        self.since = None;
    }

    /// Nothing can move now: whether nothing has for the limit (when not, the
    /// task is woken at the limit).
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let now = Instant::now();
        // A limit too far to add to the clock never comes.
        let Some(deadline) = self.since.get_or_insert(now).checked_add(self.limit) else { return false };
        loop {
            if now >= deadline {
                return true;
            }
            let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            // Armed for an earlier wait: wait for this one's end.
            timer.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    async fn expired_now(q: &mut QuietTimer) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(q.expired(cx))).await
    }

    #[tokio::test]
    async fn expires_a_limit_after_the_current_wait_began() {
        let limit = Duration::from_millis(100);
        let mut q = QuietTimer::new(limit);
        assert!(!expired_now(&mut q).await);
        tokio::time::sleep(limit * 2).await;
        q.progress();
        let began = Instant::now();
        assert!(!expired_now(&mut q).await, "progress starts the wait again");
        // The timer (armed for the first wait) wakes the task at this one's end.
        std::future::poll_fn(|cx| if q.expired(cx) { Poll::Ready(()) } else { Poll::Pending }).await;
        assert!(began.elapsed() >= limit);
    }
}
