//! How long a request waits for its upstream's answer: until the upstream
//! has been silent for the response timeout, or until the drain deadline of
//! the target it went to (SPEC §3: what is still in flight on a draining
//! target at its deadline is closed).

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::BodyProgress;

/// How long a request waits for its answer before it also watches its
/// target's drain token: a quick answer registers nothing with the token
/// (whose waiter list all the workers share).
pub const DRAIN_WATCH_AFTER: Duration = Duration::from_millis(200);

/// Why cutover stopped waiting for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// The upstream, after the request's last byte.
    Upstream,
    /// The client, in the middle of its request body (the upstream was
    /// waiting for more of it).
    ClientBody,
    /// The drain deadline of the request's target passed.
    Drained,
}

/// `answer`, unless the upstream has not given it after `timeout`
/// ([`Silence::Upstream`]) or the target's drain deadline (`drain`) passed
/// first ([`Silence::Drained`], noticed from [`DRAIN_WATCH_AFTER`] on). One
/// timer, as `tokio::time::timeout` would use. `answer` comes pinned (`pin!`
/// where it is made), so that the exchange's large future is not moved again.
pub async fn answer_within<F: Future + Unpin>(
    mut answer: F,
    timeout: Duration,
    drain: &CancellationToken,
) -> Result<F::Output, Silence> {
    let start = Instant::now();
    let mut timer = pin!(tokio::time::sleep_until(start + timeout.min(DRAIN_WATCH_AFTER)));
    tokio::select! {
        biased;
        out = &mut answer => return Ok(out),
        () = &mut timer => {}
    }
    if timeout <= DRAIN_WATCH_AFTER {
        return Err(Silence::Upstream);
    }
    timer.as_mut().reset(start + timeout);
    tokio::select! {
        biased;
        out = &mut answer => Ok(out),
        () = &mut timer => Err(Silence::Upstream),
        () = drain.cancelled() => Err(Silence::Drained),
    }
}

/// Resolves once the drain deadline of the target `drain` belongs to has
/// passed, noticed from [`DRAIN_WATCH_AFTER`] into the wait on.
pub async fn drained(drain: &CancellationToken) -> Silence {
    tokio::time::sleep(DRAIN_WATCH_AFTER).await;
    drain.cancelled().await;
    Silence::Drained
}

/// Resolves when an exchange has been silent for `timeout`: counted from the
/// request body's last byte when it has one (an upload keeps it alive), and
/// telling a client that stopped sending its body from a silent upstream.
pub async fn response_deadline(progress: Option<&BodyProgress>, timeout: Duration) -> Silence {
    let Some(p) = progress else {
        tokio::time::sleep(timeout).await;
        return Silence::Upstream;
    };
    loop {
        let idle = p.idle_for();
        if idle >= timeout && p.done() {
            return Silence::Upstream;
        }
        tokio::time::sleep(timeout.saturating_sub(idle).max(Duration::from_millis(50))).await;
        if !p.done() && p.idle_for() >= timeout {
            // Stuck on the client, or on an upstream that stopped reading it.
            return if p.waiting_on_client() { Silence::ClientBody } else { Silence::Upstream };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn later(ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_is_given() {
        let drain = CancellationToken::new();
        assert_eq!(answer_within(pin!(later(50)), Duration::from_secs(1), &drain).await, Ok(50));
        assert_eq!(answer_within(pin!(later(900)), Duration::from_secs(1), &drain).await, Ok(900));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_is_silence_whatever_the_timeout() {
        let drain = CancellationToken::new();
        assert_eq!(answer_within(pin!(later(150)), Duration::from_millis(100), &drain).await, Err(Silence::Upstream));
        assert_eq!(answer_within(pin!(later(1500)), Duration::from_secs(1), &drain).await, Err(Silence::Upstream));
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_deadline_cuts_the_wait_once_it_is_watched() {
        let drain = CancellationToken::new();
        let start = Instant::now();
        let cancel = drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cancel.cancel();
        });
        assert_eq!(answer_within(pin!(later(5000)), Duration::from_secs(60), &drain).await, Err(Silence::Drained));
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        // Already past: noticed when the watch starts.
        let start = Instant::now();
        assert_eq!(answer_within(pin!(later(5000)), Duration::from_secs(60), &drain).await, Err(Silence::Drained));
        assert_eq!(start.elapsed(), DRAIN_WATCH_AFTER);
        assert_eq!(drained(&drain).await, Silence::Drained);
        // A quick answer is given even on a drained target.
        assert_eq!(answer_within(pin!(later(10)), Duration::from_secs(60), &drain).await, Ok(10));
    }
}
