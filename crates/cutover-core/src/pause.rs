//! Pause: requests to a paused site are held, not refused, until `resume`
//! (or the pause timeout, then `503`). Held requests are released in arrival
//! order, spread over `pause.resume_spread`, and then routed to the live
//! target of that moment, so pause → switch → resume gives no error at all.
//!
//! One [`PauseGate`] per site outlives routing snapshots. The data plane's
//! check is one atomic load; only a held request touches the channel.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use cutover_metrics::IntGauge;
use tokio::sync::watch;
use tokio::time::Instant;

/// Why a held request was not released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldError {
    /// `pause.max_held` requests are already held.
    Full,
    /// The pause timeout passed before a resume.
    Timeout,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Requests pass; `release` describes the last resume.
    Running { release: Option<Release> },
    /// Requests are held for at most `timeout`.
    Paused { timeout: Duration },
}

#[derive(Debug, Clone, Copy)]
struct Release {
    at: Instant,
    first_ticket: u64,
    count: u64,
    spread: Duration,
}

/// The pause state of one site.
#[derive(Debug)]
pub struct PauseGate {
    paused: AtomicBool,
    phase: watch::Sender<Phase>,
    held: AtomicUsize,
    next_ticket: AtomicU64,
    paused_at_ticket: AtomicU64,
    gauge: IntGauge,
}

impl PauseGate {
    /// A running (not paused) gate counting held requests in `gauge`.
    pub fn new(gauge: IntGauge) -> Self {
        Self {
            paused: AtomicBool::new(false),
            phase: watch::Sender::new(Phase::Running { release: None }),
            held: AtomicUsize::new(0),
            next_ticket: AtomicU64::new(0),
            paused_at_ticket: AtomicU64::new(0),
            gauge,
        }
    }

    /// Whether requests are being held now.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Requests held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Starts holding requests, each for at most `timeout`.
    pub fn pause(&self, timeout: Duration) {
        self.paused_at_ticket.store(self.next_ticket.load(Ordering::Relaxed), Ordering::Relaxed);
        self.phase.send_replace(Phase::Paused { timeout });
        self.paused.store(true, Ordering::Release);
    }

    /// Releases the held requests in arrival order over `spread`.
    pub fn resume(&self, spread: Duration) {
        let first_ticket = self.paused_at_ticket.load(Ordering::Relaxed);
        let count = self.next_ticket.load(Ordering::Relaxed).saturating_sub(first_ticket).max(1);
        self.paused.store(false, Ordering::Release);
        self.phase.send_replace(Phase::Running {
            release: Some(Release { at: Instant::now(), first_ticket, count, spread }),
        });
    }

    /// Holds one request until it may go on; `max_held` bounds the queue.
    pub async fn hold(&self, max_held: usize) -> Result<(), HoldError> {
        if self.held.fetch_add(1, Ordering::AcqRel) >= max_held {
            self.held.fetch_sub(1, Ordering::AcqRel);
            return Err(HoldError::Full);
        }
        self.gauge.inc();
        let _held = HeldGuard(self);
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let mut rx = self.phase.subscribe();
        let mut deadline = None;
        let release = loop {
            match *rx.borrow_and_update() {
                Phase::Running { release } => break release,
                Phase::Paused { timeout } => {
                    deadline.get_or_insert_with(|| Instant::from_std(crate::deadline_after(timeout)));
                }
            }
            let until = deadline.unwrap_or_else(Instant::now);
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(HoldError::Timeout),
            }
        };
        // In arrival order, spread over the window: the upstream is not hit by the whole queue at once.
        if let Some(r) = release {
            if ticket >= r.first_ticket {
                let slot = (ticket - r.first_ticket).min(r.count - 1);
                let delay = r.spread.mul_f64(slot as f64 / r.count as f64);
                tokio::time::sleep_until(r.at + delay).await;
            }
        }
        Ok(())
    }
}

struct HeldGuard<'a>(&'a PauseGate);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn gate() -> Arc<PauseGate> {
        Arc::new(PauseGate::new(IntGauge::new("held", "held").unwrap()))
    }

    #[tokio::test]
    async fn running_gate_lets_requests_pass() {
        let g = gate();
        assert!(!g.is_paused());
        assert_eq!(g.hold(10).await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_are_released_in_order_over_the_spread() {
        let g = gate();
        g.pause(Duration::from_secs(30));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let g = g.clone();
            tasks.push(tokio::spawn(async move {
                g.hold(10).await.unwrap();
                Instant::now()
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(g.held(), 4);
        let resumed = Instant::now();
        g.resume(Duration::from_millis(400));
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap() - resumed);
        }
        assert_eq!(times, [0, 100, 200, 300].map(Duration::from_millis));
        assert_eq!(g.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_and_queue_bound() {
        let g = gate();
        g.pause(Duration::from_millis(500));
        let first = tokio::spawn({
            let g = g.clone();
            async move { g.hold(1).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(g.hold(1).await, Err(HoldError::Full));
        assert_eq!(first.await.unwrap(), Err(HoldError::Timeout));
    }
}
