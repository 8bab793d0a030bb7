//! The post-switch watch: after a switch, the new target's answers are
//! counted for `watch.duration`; when they are clearly bad the switch is
//! undone by itself (history kind `automatic_rollback`, actor `watch`).
//!
//! The rule, with `r` the new target's share of 5xx answers (cutover's own
//! 502/504 included) over `n` answers since the switch, and `r0` the old
//! target's share over `n0` answers in the `watch.duration` before the switch:
//! roll back when `n ≥ min_requests` and either `r > max_error_rate`, or
//! `n0 ≥ min_requests` and `r > 2·r0` and `r − r0 > max_error_rate / 2`
//! (clearly worse than what it replaced, though under the absolute limit).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use cutover_config::Watch;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::snapshot::TargetKey;
use crate::routing::RoutingTable;

/// How often every target's counters are sampled (for the baseline).
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept per target.
const MAX_SAMPLES: usize = 900;
/// How often a running watch looks at its target.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(100);

/// (5xx answers, all answers), cumulative.
pub(crate) type Totals = (u64, u64);

/// Periodic samples of each target's cumulative counters.
#[derive(Default)]
pub(crate) struct Sampler {
    history: Mutex<HashMap<TargetKey, VecDeque<(Instant, Totals)>>>,
}

impl Sampler {
    /// Records the counters of every target of `table` now.
    pub(crate) fn record(&self, table: &RoutingTable) {
        let now = Instant::now();
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for site in &table.sites {
            for t in &site.targets {
                let ring = history.entry((site.name().to_string(), t.name.clone())).or_default();
                ring.push_back((now, t.metrics.totals()));
                if ring.len() > MAX_SAMPLES {
                    ring.pop_front();
                }
            }
        }
    }

    /// The target's answers over (about) the last `window`, given its totals now.
    pub(crate) fn over_last(&self, key: &TargetKey, window: Duration, now: Totals) -> Option<Totals> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let ring = history.get(key)?;
        let since = Instant::now().checked_sub(window)?;
        let (_, then) = ring.iter().find(|(at, _)| *at >= since).or(ring.front())?;
        Some((now.0.saturating_sub(then.0), now.1.saturating_sub(then.1)))
    }
}

/// Why the watch rolls back, or `None` to keep watching.
pub(crate) fn verdict(cfg: &Watch, (errors, n): Totals, baseline: Option<Totals>) -> Option<String> {
    if n < cfg.min_requests {
        return None;
    }
    let r = errors as f64 / n as f64;
    if r > cfg.max_error_rate {
        return Some(format!(
            "error rate {:.1}% ({errors} of {n} answers) is above max_error_rate {:.1}%",
            r * 100.0,
            cfg.max_error_rate * 100.0
        ));
    }
    let (e0, n0) = baseline?;
    if n0 < cfg.min_requests {
        return None;
    }
    let r0 = e0 as f64 / n0 as f64;
    (r > 2.0 * r0 && r - r0 > cfg.max_error_rate / 2.0).then(|| {
        format!(
            "error rate {:.1}% ({errors} of {n} answers) is clearly worse than the previous target's {:.1}% ({e0} of {n0})",
            r * 100.0,
            r0 * 100.0
        )
    })
}

/// What a watch is doing, as the API shows it (`site.watch`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WatchView {
    /// The target being watched (the new live one).
    pub target: String,
    /// The target a rollback would return to.
    pub previous: String,
    /// When the watch started (RFC 3339).
    pub started_at: String,
    /// When a restart of cutover resumed it, or null: the answers counted
    /// are those since then, and there is no baseline.
    pub resumed_at: Option<String>,
    /// How long it lasts.
    pub duration: String,
    /// Answers counted so far.
    pub requests: u64,
    /// 5xx answers counted so far.
    pub errors: u64,
    /// `errors / requests`, or null before any answer.
    pub error_rate: Option<f64>,
    /// The previous target's error rate before the switch, when it had enough answers.
    pub baseline_error_rate: Option<f64>,
    /// The absolute limit.
    pub max_error_rate: f64,
    /// Answers needed before judging.
    pub min_requests: u64,
}

/// How a watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchOutcome {
    /// The whole duration passed without a rollback.
    Passed,
    /// It rolled back, for this reason.
    RolledBack(String),
    /// A later switch (or shutdown) ended it.
    Cancelled,
    /// It found the target failing but could not roll back (why).
    Failed(String),
}

/// A running watch of one site.
pub(crate) struct WatchHandle {
    pub(crate) stop: CancellationToken,
    pub(crate) view: std::sync::Arc<Mutex<WatchView>>,
    pub(crate) outcome: tokio::sync::watch::Sender<Option<WatchOutcome>>,
}

impl WatchHandle {
    /// Ends the watch without a rollback.
    pub(crate) fn cancel(&self) {
        self.stop.cancel();
        self.outcome.send_if_modified(|o| {
            let first = o.is_none();
            if first {
                *o = Some(WatchOutcome::Cancelled);
            }
            first
        });
    }
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Watch {
        Watch { duration: Duration::from_secs(60), max_error_rate: 0.05, min_requests: 20 }
    }

    #[test]
    fn nothing_is_judged_before_min_requests() {
        assert_eq!(verdict(&cfg(), (19, 19), None), None);
    }

    #[test]
    fn above_the_absolute_limit_rolls_back() {
        let why = verdict(&cfg(), (2, 20), None).unwrap();
        assert!(why.contains("10.0%") && why.contains("max_error_rate 5.0%"), "{why}");
        assert_eq!(verdict(&cfg(), (1, 20), None), None);
    }

    #[test]
    fn clearly_worse_than_the_old_target_rolls_back_below_the_limit() {
        // 4% is under the 5% limit, but the old target ran at 0.5%.
        let why = verdict(&cfg(), (4, 100), Some((1, 200))).unwrap();
        assert!(why.contains("clearly worse"), "{why}");
        // Not clearly worse: 4% against 3%.
        assert_eq!(verdict(&cfg(), (4, 100), Some((6, 200))), None);
        // A baseline with too few answers is not trusted.
        assert_eq!(verdict(&cfg(), (4, 100), Some((0, 10))), None);
    }
}
