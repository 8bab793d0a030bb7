//! Deploys: set target → wait healthy → smoke → switch → drain → watch, as
//! one tracked deployment with steps and timestamps (SPEC §4 deploy). Only
//! one deploy runs per site: another one waits for its turn (queued, not
//! refused); meanwhile a switch or rollback there is refused
//! (`409 deploy_in_progress`) unless forced. Deployments are kept in memory
//! (the newest 200), and the newest of each site in the state file: saved
//! before the deploy is acknowledged, then as its steps go. A restart ends
//! each one it cut short, or lets one that went live follow its resumed
//! watch ([`Deployment::after_restart`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cutover_config::Require;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::watch::{now_rfc3339, WatchOutcome};
use super::{not_found, refused, Actor, Controller, Inner, RunningDeploy, SwitchRequest, WatchReceiver};
use crate::deployment::{Deployment, Step};
use crate::endpoint::Health;
use crate::error::ControlError;
use crate::state::State;

/// Deployments remembered.
const KEEP: usize = 200;
/// Deployments of each site kept in the state file.
const KEEP_SAVED: usize = 20;
/// Why a deploy ended when an operator took the site over.
const OVERRIDDEN: &str = "overridden by a forced switch or rollback";
/// Default wait for the new target to become healthy.
const DEFAULT_HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// A deploy as asked for.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The (non-live) target to deploy to.
    pub target: String,
    /// Its new endpoints.
    pub endpoints: Vec<String>,
    /// The version they run.
    pub version: Option<String>,
    /// Watch duration after the switch (default: the site's `switch.watch`).
    pub watch: Option<Duration>,
    /// How long to wait for the target to be healthy.
    pub healthy_timeout: Option<Duration>,
}

/// Every deployment this process ran (the newest [`KEEP`]).
#[derive(Default)]
pub(crate) struct Deployments {
    list: Mutex<VecDeque<Arc<Mutex<Deployment>>>>,
}

impl Deployments {
    pub(crate) fn add(&self, d: Deployment) -> Arc<Mutex<Deployment>> {
        let d = Arc::new(Mutex::new(d));
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.push_back(d.clone());
        if list.len() > KEEP {
            list.pop_front();
        }
        d
    }

    pub(crate) fn get(&self, id: &str) -> Option<Deployment> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).clone()).find(|d| d.id == id)
    }
}

/// Writes the progress of one deployment; each change is saved soon after
/// ([`Controller::track`]).
pub(super) struct Tracker {
    d: Arc<Mutex<Deployment>>,
    changed: Arc<Notify>,
    metrics: cutover_metrics::Metrics,
}

impl Tracker {
    fn with<R>(&self, f: impl FnOnce(&mut Deployment) -> R) -> R {
        let r = f(&mut self.d.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_one();
        r
    }

    fn id(&self) -> String {
        self.d.lock().unwrap_or_else(|e| e.into_inner()).id.clone()
    }

    fn start(&self, i: usize) {
        self.with(|d| {
            d.steps[i].state = "running".into();
            d.steps[i].started_at = Some(now_rfc3339());
        });
    }

    fn finish(&self, i: usize, state: &str, message: impl Into<String>) {
        self.with(|d| {
            let s = &mut d.steps[i];
            if s.started_at.is_none() {
                s.started_at = Some(now_rfc3339());
            }
            s.state = state.into();
            s.finished_at = Some(now_rfc3339());
            s.message = Some(message.into());
        });
    }

    /// Ends the deployment in `state`, counted in `cutover_deployments_total`
    /// before anyone can read that it ended.
    fn end(&self, state: &str, error: Option<String>) {
        self.with(|d| {
            self.metrics.deployments.with_label_values(&[&d.site, state]).inc();
            d.state = state.into();
            d.error = error;
        });
    }
}

/// Ends, in `state` as loaded at a start, each deployment the restart cut
/// short (counted in `cutover_deployments_total` as it ends); one that went
/// live and whose watch resumes runs on.
pub(super) fn after_restart(state: &mut State, metrics: &cutover_metrics::Metrics) {
    let now = now_rfc3339();
    for (site, s) in &mut state.sites {
        let watched = s.watch.as_ref().map(|w| w.target.clone());
        for d in s.deployments.iter_mut().filter(|d| d.is_running()) {
            d.after_restart(&s.live, watched.as_deref() == Some(d.target.as_str()), &now);
            if !d.is_running() {
                metrics.deployments.with_label_values(&[site, &d.state]).inc();
            }
        }
    }
}

fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("d{ms:x}{:04x}", COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

const STEPS: [&str; 6] = ["set_target", "wait_healthy", "smoke", "switch", "drain", "watch"];

impl Controller {
    /// Starts a deploy on `site`; returns its id at once (`202`). Refuses what
    /// would fail at its first step: unknown site, bad endpoints, the live
    /// target. While another deploy runs on the site, this one waits for it
    /// (`running`, every step `pending`), then starts.
    pub async fn deploy(&self, site: &str, req: DeployRequest) -> Result<String, ControlError> {
        self.site_exists(site).await?;
        super::check_new_target(&req.target, &req.endpoints, req.version.as_deref())?;
        let id = new_id();
        let live = {
            let inner = self.inner.lock().await;
            inner.state.sites.get(site).ok_or_else(|| not_found("site", site))?.live.clone()
        };
        // A refused deploy is recorded as the switch it would have made.
        if live == req.target {
            let err = refused("target_is_live", format!("target {:?} is live on {site:?}", req.target), vec![]);
            self.record_refusal(site, "switch", Some((&live, &req.target)), Actor::Deploy, &err).await;
            return Err(err);
        }
        let steps = STEPS
            .iter()
            .map(|name| Step {
                name: name.to_string(),
                state: "pending".into(),
                started_at: None,
                finished_at: None,
                message: None,
            })
            .collect();
        let record = Deployment {
            id: id.clone(),
            site: site.to_string(),
            target: req.target.clone(),
            version: req.version.clone(),
            state: "running".into(),
            steps,
            error: None,
        };
        // Durable before it is acknowledged: a restart then reports how it ended.
        self.save_deployment(&record).await?;
        let tracker = self.track(self.deployments.add(record));
        // In the site's queue before the answer: from now on switches there
        // are refused, and deploys run in the order they were asked for.
        let (overridden, done) = (CancellationToken::new(), CancellationToken::new());
        let previous = {
            let mut inner = self.inner.lock().await;
            let queue = inner.deploying.entry(site.to_string()).or_default();
            let previous = queue.back().map(|d| d.done.clone());
            let running = RunningDeploy {
                id: id.clone(),
                target: req.target.clone(),
                overridden: overridden.clone(),
                done: done.clone(),
            };
            queue.push_back(running);
            previous
        };
        let me = self.me.clone();
        let site = site.to_string();
        let own_id = id.clone();
        tokio::spawn(async move {
            if let Some(previous) = previous {
                previous.cancelled().await;
            }
            let Some(c) = me.upgrade() else { return };
            if overridden.is_cancelled() {
                // An operator took the site over while this one waited.
                let why = "overridden by a forced switch or rollback before it started".to_string();
                (0..STEPS.len()).for_each(|i| tracker.finish(i, "skipped", why.clone()));
                tracker.end("failed", Some(why));
            } else {
                c.run_deploy(&site, req, &tracker, &overridden).await;
            }
            c.deploy_ended(&site, &own_id, &done).await;
        });
        Ok(id)
    }

    /// A deployment `id` of `site` ended (or stopped at a shutdown): out of
    /// the site's queue, and the next one may start.
    async fn deploy_ended(&self, site: &str, id: &str, done: &CancellationToken) {
        {
            let mut inner = self.inner.lock().await;
            if let Some(queue) = inner.deploying.get_mut(site) {
                queue.retain(|d| d.id != id);
                if queue.is_empty() {
                    inner.deploying.remove(site);
                }
            }
        }
        done.cancel();
    }

    /// A deployment by id.
    pub fn deployment(&self, id: &str) -> Result<Deployment, ControlError> {
        self.deployments.get(id).ok_or_else(|| not_found("deployment", id))
    }

    /// Runs the steps, to the deployment's end. `overridden`: an operator's
    /// forced switch or rollback took the site over, which ends the deploy.
    async fn run_deploy(&self, site: &str, req: DeployRequest, t: &Tracker, overridden: &CancellationToken) {
        let fail = |i: usize, why: String| {
            t.finish(i, "failed", why.clone());
            for j in i + 1..STEPS.len() {
                t.finish(j, "skipped", "an earlier step failed");
            }
            t.end("failed", Some(why));
        };
        // 1. set_target
        t.start(0);
        let set = self.set_target(site, &req.target, req.endpoints.clone(), req.version.clone(), Actor::Deploy).await;
        if let Err(e) = set {
            return fail(0, e.to_string());
        }
        t.finish(0, "succeeded", format!("{} → {}", req.target, req.endpoints.join(", ")));
        // 2. wait_healthy
        t.start(1);
        let timeout = req.healthy_timeout.unwrap_or(DEFAULT_HEALTHY_TIMEOUT);
        let started = Instant::now();
        let healthy = tokio::select! {
            r = self.wait_healthy(site, &req.target, timeout) => r,
            _ = overridden.cancelled() => return fail(1, OVERRIDDEN.into()),
        };
        match healthy {
            Ok(()) => t.finish(1, "succeeded", format!("healthy after {:.1}s", started.elapsed().as_secs_f64())),
            Err(reasons) => return fail(1, format!("not healthy within {timeout:?}: {}", reasons.join("; "))),
        }
        // 3. smoke
        t.start(2);
        let Some(route) = self.table.load().site(site).cloned() else {
            return fail(2, format!("site {site:?} is gone"));
        };
        let Some(target) = route.target(&req.target).cloned() else {
            return fail(2, format!("target {:?} is gone", req.target));
        };
        if route.config.switch.smoke.is_empty() {
            t.finish(2, "skipped", "no smoke checks configured");
        } else {
            let reasons = tokio::select! {
                r = self.smoke_reasons(&route.config, &target) => r,
                _ = overridden.cancelled() => return fail(2, OVERRIDDEN.into()),
            };
            if !reasons.is_empty() {
                return fail(2, format!("smoke checks failed: {}", reasons.join("; ")));
            }
            t.finish(
                2,
                "succeeded",
                format!("{} check(s) passed on every endpoint that is up", route.config.switch.smoke.len()),
            );
        }
        // 4. switch
        t.start(3);
        // The release going live must be the one deployed: with a version
        // given, endpoints reporting another one refuse the switch.
        let switch = SwitchRequest {
            to: req.target.clone(),
            reason: Some(format!("deployment {}", t.id())),
            watch: req.watch,
            expect_version: req.version.clone(),
            ..Default::default()
        };
        let (from, outcome) = match self.switch_as(site, switch, Actor::Deploy).await {
            Ok((view, outcome)) => (view.previous.unwrap_or_default(), outcome),
            Err(e) => return fail(3, e.to_string()),
        };
        t.finish(3, "succeeded", format!("{from} → {}", req.target));
        // 5. drain
        t.start(4);
        let drained = tokio::select! {
            d = self.wait_drained(site, &from) => d,
            _ = overridden.cancelled() => format!("{from} was draining when the deploy was {OVERRIDDEN}"),
        };
        t.finish(4, "succeeded", drained);
        // 6. watch
        let Some(outcome) = outcome.filter(|_| !overridden.is_cancelled()) else {
            let why = match overridden.is_cancelled() {
                true => self.undone(site, &req.target).await,
                false => None,
            };
            if let Some(why) = why {
                t.finish(5, "skipped", why.clone());
                t.end("rolled_back", Some(why));
                return;
            }
            t.finish(5, "skipped", "no watch configured");
            t.end("succeeded", None);
            return;
        };
        t.start(5);
        self.watch_step(site, &req.target, t, outcome).await
    }

    /// The watch step of a deploy of `target` on `site` that went live, and
    /// the deployment's end, as the watch's `outcome` says. A watch that a shutdown ended
    /// leaves the deployment `running`: the next start resumes both.
    async fn watch_step(&self, site: &str, target: &str, t: &Tracker, mut outcome: WatchReceiver) {
        let result = loop {
            if let Some(o) = outcome.borrow_and_update().clone() {
                break o;
            }
            if outcome.changed().await.is_err() {
                break WatchOutcome::Cancelled;
            }
        };
        if result == WatchOutcome::Cancelled && self.shutdown.is_cancelled() {
            return;
        }
        match result {
            WatchOutcome::Passed => {
                t.finish(5, "succeeded", "no rollback needed");
                t.end("succeeded", None);
            }
            WatchOutcome::RolledBack(why) => {
                t.finish(5, "failed", format!("rolled back: {why}"));
                t.end("rolled_back", Some(why));
            }
            WatchOutcome::Failed(why) => {
                t.finish(5, "failed", why.clone());
                t.end("failed", Some(why));
            }
            WatchOutcome::Cancelled => match self.undone(site, target).await {
                Some(why) => {
                    t.finish(5, "skipped", format!("the watch was ended: {why}"));
                    t.end("rolled_back", Some(why));
                }
                None => {
                    t.finish(5, "skipped", "the watch was ended by a later switch");
                    t.end("succeeded", None);
                }
            },
        }
    }

    /// Why a deploy of `target` that went live counts as taken back: another
    /// target is live on `site` (an operator's switch or rollback).
    async fn undone(&self, site: &str, target: &str) -> Option<String> {
        let inner = self.inner.lock().await;
        let live = inner.state.sites.get(site).map(|s| s.live.clone()).unwrap_or_default();
        (live != target).then(|| format!("{OVERRIDDEN}: {live} is live"))
    }

    /// Follows `tracker`'s deployment, which a restart found in its watch,
    /// through the resumed watch's `outcome` (ended now when there is none).
    /// Meanwhile it is the site's running deploy, as before the restart: a
    /// switch there is refused unless forced, and a next deploy waits.
    pub(super) fn follow_resumed(&self, inner: &mut Inner, tracker: Tracker, outcome: Option<WatchReceiver>) {
        let (id, site, target) = tracker.with(|d| (d.id.clone(), d.site.clone(), d.target.clone()));
        let done = CancellationToken::new();
        let running = RunningDeploy {
            id: id.clone(),
            target: target.clone(),
            overridden: CancellationToken::new(),
            done: done.clone(),
        };
        inner.deploying.entry(site.clone()).or_default().push_front(running);
        let me = self.me.clone();
        tokio::spawn(async move {
            let Some(c) = me.upgrade() else { return };
            match outcome {
                Some(outcome) => c.watch_step(&site, &target, &tracker, outcome).await,
                None => {
                    tracker.finish(5, "skipped", "the watch did not resume after a restart of cutover");
                    tracker.end("succeeded", None);
                }
            }
            c.deploy_ended(&site, &id, &done).await;
        });
    }

    /// A tracker of `d` whose changes are saved as they come, the last one
    /// (the deployment's end) included.
    pub(super) fn track(&self, d: Arc<Mutex<Deployment>>) -> Tracker {
        let changed = Arc::new(Notify::new());
        let (me, saved, wake) = (self.me.clone(), d.clone(), changed.clone());
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                let Some(c) = me.upgrade() else { return };
                let now = saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Err(e) = c.save_deployment(&now).await {
                    tracing::warn!(deployment = %now.id, error = %e, "could not save a deployment's progress");
                }
                if !now.is_running() {
                    return;
                }
            }
        });
        Tracker { d, changed, metrics: self.metrics.clone() }
    }

    /// Saves `d` with its site's state (the newest [`KEEP_SAVED`] of the site).
    async fn save_deployment(&self, d: &Deployment) -> Result<(), ControlError> {
        let mut inner = self.inner.lock().await;
        let mut next = inner.state.clone();
        let Some(s) = next.sites.get_mut(&d.site) else { return Ok(()) };
        match s.deployments.iter_mut().find(|saved| saved.id == d.id) {
            Some(saved) if saved == d => return Ok(()),
            Some(saved) => *saved = d.clone(),
            None => {
                s.deployments.push(d.clone());
                // The oldest that ended go first; a running one stays.
                let mut over = s.deployments.len().saturating_sub(KEEP_SAVED);
                s.deployments.retain(|saved| {
                    let goes = over > 0 && !saved.is_running();
                    over -= usize::from(goes);
                    !goes
                });
            }
        }
        self.commit(&mut inner, next).await
    }

    /// Waits until `target` passes the site's health requirement; `Err` lists what is not healthy.
    async fn wait_healthy(&self, site: &str, target: &str, timeout: Duration) -> Result<(), Vec<String>> {
        let deadline = crate::deadline_after(timeout);
        loop {
            let table = self.table.load();
            let Some(route) = table.site(site) else { return Err(vec![format!("site {site:?} is gone")]) };
            let Some(t) = route.target(target) else { return Err(vec![format!("target {target:?} is gone")]) };
            let not_healthy: Vec<String> = t
                .endpoints
                .iter()
                .filter(|e| e.health() != Health::Healthy)
                .map(|e| {
                    format!(
                        "{} {}",
                        e.address,
                        if e.health() == Health::Unknown { "not checked yet" } else { "unhealthy" }
                    )
                })
                .collect();
            let ok = match route.config.switch.require {
                Require::AllHealthy => not_healthy.is_empty(),
                Require::AnyHealthy => not_healthy.len() < t.endpoints.len(),
            };
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(not_healthy);
            }
            drop(table);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `target` of `site` has nothing in flight or its drain ended.
    async fn wait_drained(&self, site: &str, target: &str) -> String {
        let started = Instant::now();
        loop {
            let inflight = self.table.load().site(site).and_then(|s| s.target(target)).map_or(0, |t| t.inflight());
            let draining = self.inner.lock().await.drains.contains_key(&(site.to_string(), target.to_string()));
            if inflight == 0 {
                return format!("{target} drained in {:.1}s", started.elapsed().as_secs_f64());
            }
            if !draining {
                return format!("{target} reached its drain deadline with {inflight} in flight");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
