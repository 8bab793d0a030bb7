//! The controller: the only writer of routing and state.
//!
//! Every command on a site runs under that site's lock, so commands on one
//! site apply one at a time in arrival order (tokio's mutex is fair). A
//! command validates, gates (health, smoke, version), then commits: the new
//! state is saved durably, the new routing snapshot is published with one
//! `store`, and only then is the command acknowledged. A refusal is recorded
//! in history and changes nothing else.
//!
//! After a switch the old target drains: it is `draining` while it has work in
//! flight, until `drain_timeout`; at that deadline its drain token is
//! cancelled, which closes the upgrades and streams still open on it.

mod deploy;
mod reconcile;
mod snapshot;
mod watch;

pub use crate::deployment::{Deployment, Step};
pub use deploy::DeployRequest;
pub use watch::{WatchOutcome, WatchView};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use cutover_config::{Config, ConfigErrors, Require, Site};
use cutover_metrics::Metrics;
use tokio_util::sync::CancellationToken;

use self::deploy::Deployments;
use self::reconcile::reconcile;
use self::snapshot::{Registry, TargetKey};
use self::watch::{Sampler, WatchHandle};
use crate::endpoint::Health;
use crate::error::ControlError;
use crate::history::{self, HistoryEntry};
use crate::routing::{RoutingTable, Settings, TargetPool};
use crate::smoke;
use crate::state::{State, StateError, StateStore, TargetSpec, WatchState};
use crate::view::{EndpointView, ModeView, SiteView, TargetView};

/// Who asked for an action (recorded in history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The admin API.
    Api,
    /// The post-switch watch.
    Watch,
    /// A deploy.
    Deploy,
    /// A configuration reload.
    Reload,
}

impl Actor {
    fn as_str(self) -> &'static str {
        match self {
            Actor::Api => "api",
            Actor::Watch => "watch",
            Actor::Deploy => "deploy",
            Actor::Reload => "reload",
        }
    }
}

/// A switch as asked for.
#[derive(Debug, Clone, Default)]
pub struct SwitchRequest {
    /// The target to make live.
    pub to: String,
    /// Skip health and smoke gates.
    pub force: bool,
    /// Override of `switch.drain_timeout` for the old target.
    pub drain_timeout: Option<Duration>,
    /// Refuse unless every endpoint runs this version.
    pub expect_version: Option<String>,
    /// Why, recorded in history.
    pub reason: Option<String>,
    /// Watch duration after the switch, instead of the site's `switch.watch.duration`.
    pub watch: Option<Duration>,
}

/// Why a reload did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid; nothing changed.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// No configuration file is known (the process was started without one).
    #[error("this process was not started from a configuration file")]
    NoFile,
    /// The reconciled state could not be saved; nothing changed.
    #[error("{0}")]
    Persist(ControlError),
}

/// What a successful reload did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadOutcome {
    /// Sites now configured.
    pub sites: Vec<String>,
    /// Settings that changed in the file but only apply after a restart.
    pub restart_required: Vec<String>,
}

/// Reports how a post-switch watch ended.
type WatchReceiver = tokio::sync::watch::Receiver<Option<WatchOutcome>>;

/// A post-switch watch about to run.
struct WatchPlan {
    /// As saved with the switch.
    saved: WatchState,
    /// Its thresholds and whole duration.
    cfg: cutover_config::Watch,
    /// The old target's answers before the switch.
    baseline: Option<watch::Totals>,
    /// What it has left, when a restart resumes it (else all of `cfg.duration`).
    left: Option<Duration>,
}

/// A running drain of a target that was live.
struct DrainTimer {
    deadline: Instant,
    task: tokio::task::AbortHandle,
}

/// The mutable state behind the command lock.
struct Inner {
    state: State,
    config: Arc<Config>,
    /// The configuration the process started with: its listeners, admin API,
    /// state file and connection limits stay in force until a restart.
    started: Arc<Config>,
    sites: BTreeMap<String, Arc<Site>>,
    drains: HashMap<TargetKey, DrainTimer>,
    /// The running post-switch watch of each site.
    watches: HashMap<String, WatchHandle>,
    /// site → its deployments in order: the first runs, the others wait.
    deploying: HashMap<String, std::collections::VecDeque<RunningDeploy>>,
}

/// A deployment in progress (or waiting for its turn) on a site.
struct RunningDeploy {
    id: String,
    /// The target it deploys to.
    target: String,
    /// Cancelled when an operator's forced switch or rollback takes the site
    /// over: the deploy stops where it is and never switches after it.
    overridden: CancellationToken,
    /// Cancelled when it ended: the next deploy on the site starts then.
    done: CancellationToken,
}

/// The control plane of one running cutover.
pub struct Controller {
    me: Weak<Controller>,
    table: Arc<ArcSwap<RoutingTable>>,
    metrics: Metrics,
    store: Arc<dyn StateStore>,
    config_path: Option<PathBuf>,
    inner: tokio::sync::Mutex<Inner>,
    site_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    registry: Mutex<Registry>,
    sampler: Sampler,
    deployments: Deployments,
    reload_hook: Mutex<Option<ReloadHook>>,
    shutdown: CancellationToken,
}

/// Applies the parts of a new configuration the controller does not own (TLS
/// certificates); an `Err` refuses the whole reload.
pub type ReloadHook = Box<dyn Fn(&Config) -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("config_path", &self.config_path).finish()
    }
}

fn sites_of(config: &Config) -> BTreeMap<String, Arc<Site>> {
    config.sites.iter().map(|s| (s.name.clone(), Arc::new(s.clone()))).collect()
}

impl Controller {
    /// Loads state from `store`, reconciles it with `config`, publishes the
    /// first snapshot and starts the health checks. `config_path` is re-read
    /// by [`Controller::reload_file`]. Must run inside a tokio runtime.
    pub fn start(
        config: Config,
        config_path: Option<PathBuf>,
        store: Arc<dyn StateStore>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, StateError> {
        let loaded = store.load()?;
        let mut state = reconcile(&config, loaded.clone());
        deploy::after_restart(&mut state, &metrics);
        // What reconciling changed (and recorded in the history) is saved, so
        // the next start does not record it again.
        if loaded.is_some_and(|l| l != state) {
            if let Err(e) = store.save(&state) {
                tracing::warn!(error = %e, "could not save the state reconciled with the configuration");
            }
        }
        let shutdown = CancellationToken::new();
        let config = Arc::new(config);
        let inner = Inner {
            state,
            sites: sites_of(&config),
            started: config.clone(),
            config,
            drains: HashMap::new(),
            watches: HashMap::new(),
            deploying: HashMap::new(),
        };
        let controller = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            table: Arc::new(ArcSwap::from_pointee(RoutingTable::default())),
            registry: Mutex::new(Registry::new(metrics.clone(), shutdown.clone())),
            metrics,
            store,
            config_path,
            site_locks: Mutex::new(HashMap::new()),
            sampler: Sampler::default(),
            deployments: Deployments::default(),
            reload_hook: Mutex::new(None),
            shutdown,
            inner: tokio::sync::Mutex::new(inner),
        });
        {
            let mut inner = controller.inner.try_lock().expect("fresh controller is unlocked");
            controller.publish(&inner);
            let mut resumed = controller.resume_watches(&mut inner);
            // The saved deployments answer by id again; one in its resumed watch follows it.
            let saved: Vec<_> = inner.state.sites.values().flat_map(|s| s.deployments.iter().cloned()).collect();
            for d in saved {
                let running = d.is_running();
                let (site, d) = (d.site.clone(), controller.deployments.add(d));
                if running {
                    let tracker = controller.track(d);
                    controller.follow_resumed(&mut inner, tracker, resumed.remove(&site));
                }
            }
        }
        // Samples every target's counters: the baseline of post-switch watches.
        let (me, stop) = (Arc::downgrade(&controller), controller.shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(watch::SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let Some(c) = me.upgrade() else { return };
                c.sampler.record(&c.table.load());
            }
        });
        Ok(controller)
    }

    /// Runs `hook` on every reload, before anything changes.
    pub fn on_reload(&self, hook: ReloadHook) {
        *self.reload_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// The routing snapshot the data plane reads.
    pub fn table(&self) -> Arc<ArcSwap<RoutingTable>> {
        self.table.clone()
    }

    /// The configuration in force.
    pub async fn config(&self) -> Arc<Config> {
        self.inner.lock().await.config.clone()
    }

    /// The metrics of this process.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops every health check and drain timer.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        if let Ok(inner) = self.inner.try_lock() {
            for d in inner.drains.values() {
                d.task.abort();
            }
            for w in inner.watches.values() {
                w.cancel();
            }
        }
    }

    fn site_lock(&self, site: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.site_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(site.to_string()).or_default().clone()
    }

    /// Every site, in configuration order.
    pub async fn sites(&self) -> Vec<SiteView> {
        let inner = self.inner.lock().await;
        inner.config.sites.iter().filter_map(|s| self.view(&inner, &s.name).ok()).collect()
    }

    /// One site.
    pub async fn site(&self, site: &str) -> Result<SiteView, ControlError> {
        let inner = self.inner.lock().await;
        self.view(&inner, site)
    }

    /// A site's history, newest first.
    pub async fn history(&self, site: &str) -> Result<Vec<HistoryEntry>, ControlError> {
        let inner = self.inner.lock().await;
        let s = inner.state.sites.get(site).ok_or_else(|| not_found("site", site))?;
        Ok(s.history.iter().rev().cloned().collect())
    }

    /// Makes `req.to` the live target of `site`, after its gates pass.
    pub async fn switch(&self, site: &str, req: SwitchRequest, actor: Actor) -> Result<SiteView, ControlError> {
        self.switch_as(site, req, actor).await.map(|(view, _)| view)
    }

    /// A switch, also returning the outcome of the watch it started, if any.
    async fn switch_as(
        &self,
        site: &str,
        req: SwitchRequest,
        actor: Actor,
    ) -> Result<(SiteView, Option<WatchReceiver>), ControlError> {
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        let overriding = self.refuse_during_deploy(site, "switch", Some(&req.to), req.force, actor).await?;
        let switched = self.switch_locked(site, req, "switch", actor).await?;
        self.override_deploy(site, overriding).await;
        Ok(switched)
    }

    /// An operator's forced switch or rollback, done while a deploy runs on
    /// `site`, ends that deploy when it moved the site off the deploy's
    /// target: the deploy never switches after the operator.
    async fn override_deploy(&self, site: &str, overriding: Option<(Vec<CancellationToken>, String)>) {
        let Some((overridden, target)) = overriding else { return };
        let live = self.inner.lock().await.state.sites.get(site).map(|s| s.live.clone());
        if live.as_deref() != Some(target.as_str()) {
            // The running deploy, and those waiting behind it.
            overridden.iter().for_each(CancellationToken::cancel);
        }
    }

    /// While a deploy runs (or waits) on `site`, other switches and
    /// rollbacks need `force`. `Ok` with the tokens of the site's deploys and
    /// the running one's target when an operator forces one (see
    /// [`Controller::override_deploy`]).
    async fn refuse_during_deploy(
        &self,
        site: &str,
        kind: &str,
        to: Option<&str>,
        force: bool,
        actor: Actor,
    ) -> Result<Option<(Vec<CancellationToken>, String)>, ControlError> {
        let (running, tokens, live) = {
            let inner = self.inner.lock().await;
            let live = inner.state.sites.get(site).map(|s| s.live.clone()).unwrap_or_default();
            let queue = inner.deploying.get(site);
            let running = queue.and_then(|q| q.front()).map(|d| (d.id.clone(), d.overridden.clone(), d.target.clone()));
            let tokens: Vec<CancellationToken> = queue.into_iter().flatten().map(|d| d.overridden.clone()).collect();
            (running, tokens, live)
        };
        if actor == Actor::Deploy {
            // The deploy's own switch, unless an operator took the site over meanwhile.
            return match running {
                Some((id, overridden, _)) if overridden.is_cancelled() => {
                    let why = format!("deployment {id} was overridden by a forced switch or rollback");
                    let err = refused("deploy_overridden", why, vec![]);
                    self.record_refusal(site, kind, to.map(|t| (live.as_str(), t)), actor, &err).await;
                    Err(err)
                }
                _ => Ok(None),
            };
        }
        if actor == Actor::Watch {
            return Ok(None);
        }
        if force {
            return Ok(running.filter(|_| actor == Actor::Api).map(|(_, _, target)| (tokens, target)));
        }
        let running = running.map(|(id, _, _)| id);
        let Some(id) = running else { return Ok(None) };
        let err = refused(
            "deploy_in_progress",
            format!("deployment {id} is running on {site:?}; use force to override"),
            vec![],
        );
        self.record_refusal(site, kind, to.map(|t| (live.as_str(), t)), actor, &err).await;
        Err(err)
    }

    /// Switches `site` back to its previous target.
    pub async fn rollback(&self, site: &str, force: bool, actor: Actor) -> Result<SiteView, ControlError> {
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        let previous = {
            let inner = self.inner.lock().await;
            inner.state.sites.get(site).ok_or_else(|| not_found("site", site))?.previous.clone()
        };
        let overriding = self.refuse_during_deploy(site, "rollback", previous.as_deref(), force, actor).await?;
        let Some(to) = previous else {
            let err = refused("nothing_to_roll_back", format!("site {site:?} has no previous target"), vec![]);
            self.record_refusal(site, "rollback", None, actor, &err).await;
            return Err(err);
        };
        let req = SwitchRequest { to, force, ..Default::default() };
        let (view, _) = self.switch_locked(site, req, "rollback", actor).await?;
        self.override_deploy(site, overriding).await;
        self.metrics.rollbacks.with_label_values(&[site, "manual"]).inc();
        Ok(view)
    }

    /// The watch of `target` on `site` found it failing: switch back. `Ok(false)`
    /// when a later switch already ended the watch.
    async fn watch_rollback(
        &self,
        site: &str,
        target: &str,
        stop: &CancellationToken,
        reason: String,
    ) -> Result<bool, ControlError> {
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        let previous = {
            let inner = self.inner.lock().await;
            let Some(s) = inner.state.sites.get(site) else { return Ok(false) };
            if stop.is_cancelled() || s.live != target {
                return Ok(false);
            }
            s.previous.clone()
        };
        let Some(to) = previous else {
            return Err(refused("nothing_to_roll_back", format!("site {site:?} has no previous target"), vec![]));
        };
        // Undo at once: the old target is the known-good one, so no gates.
        let req = SwitchRequest { to, force: true, reason: Some(reason.clone()), ..Default::default() };
        match self.switch_locked(site, req, "automatic_rollback", Actor::Watch).await {
            Ok(_) => {
                self.metrics.rollbacks.with_label_values(&[site, "automatic"]).inc();
                tracing::warn!(site, target, %reason, "automatic rollback");
                Ok(true)
            }
            Err(e) => {
                tracing::error!(site, target, error = %e, "automatic rollback failed");
                Err(e)
            }
        }
    }

    /// `404` unless the configuration has `site`.
    pub async fn site_exists(&self, site: &str) -> Result<(), ControlError> {
        if self.inner.lock().await.sites.contains_key(site) {
            Ok(())
        } else {
            Err(not_found("site", site))
        }
    }

    /// Creates or replaces the non-live target `target` of `site`.
    pub async fn set_target(
        &self,
        site: &str,
        target: &str,
        endpoints: Vec<String>,
        version: Option<String>,
        actor: Actor,
    ) -> Result<SiteView, ControlError> {
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        self.site_exists(site).await?;
        check_new_target(target, &endpoints, version.as_deref())?;
        let live = {
            let inner = self.inner.lock().await;
            inner.state.sites.get(site).ok_or_else(|| not_found("site", site))?.live.clone()
        };
        if live == target {
            let err = refused(
                "target_is_live",
                format!("target {target:?} is live on {site:?}; switch away from it first"),
                vec![],
            );
            self.record_refusal(site, "set_target", Some((&live, target)), actor, &err).await;
            return Err(err);
        }
        let mut inner = self.inner.lock().await;
        let mut next = inner.state.clone();
        let configured = inner.config.sites.iter().any(|c| c.name == site && c.targets.contains_key(target));
        let s = next.sites.get_mut(site).expect("site checked above");
        let spec = TargetSpec { endpoints: endpoints.clone(), version: version.clone(), configured };
        s.targets.insert(target.to_string(), spec);
        let reason = format!(
            "endpoints {}{}",
            endpoints.join(", "),
            version.map(|v| format!(", version {v}")).unwrap_or_default()
        );
        let entry = HistoryEntry::now("set_target", None, Some(target), actor.as_str(), "ok").reason(reason);
        history::push(&mut s.history, entry);
        self.commit(&mut inner, next).await?;
        // New endpoints, or a new release at the same addresses: what the
        // checks knew of the old one must not pass the new one's health gate.
        if let Some(t) = self.table.load().site(site).and_then(|s| s.target(target)) {
            for e in &t.endpoints {
                e.forget_health();
            }
        }
        self.view(&inner, site)
    }

    /// Turns site modes on or off (`None` leaves one as it is).
    pub async fn set_mode(
        &self,
        site: &str,
        read_only: Option<bool>,
        maintenance: Option<bool>,
        actor: Actor,
    ) -> Result<SiteView, ControlError> {
        if read_only.is_none() && maintenance.is_none() {
            return Err(invalid("mode", "give read_only and/or maintenance"));
        }
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        let mut inner = self.inner.lock().await;
        let mut next = inner.state.clone();
        let s = next.sites.get_mut(site).ok_or_else(|| not_found("site", site))?;
        let mut changes = Vec::new();
        for (name, wanted, slot) in
            [("read_only", read_only, &mut s.mode.read_only), ("maintenance", maintenance, &mut s.mode.maintenance)]
        {
            if let Some(on) = wanted {
                *slot = on;
                changes.push(format!("{name} {}", if on { "on" } else { "off" }));
            }
        }
        let entry = HistoryEntry::now("mode", None, None, actor.as_str(), "ok").reason(changes.join(", "));
        history::push(&mut s.history, entry);
        self.commit(&mut inner, next).await?;
        tracing::info!(site, change = %changes.join(", "), "mode changed");
        self.view(&inner, site)
    }

    /// Holds new requests to `site` (each for at most `timeout`) until [`Controller::resume`].
    pub async fn pause(&self, site: &str, timeout: Duration, actor: Actor) -> Result<SiteView, ControlError> {
        if timeout.is_zero() {
            return Err(invalid("timeout", "must be greater than zero"));
        }
        let reason = format!("timeout {}", humantime::format_duration(timeout));
        self.pause_change(site, actor, "pause", reason, Some(timeout), |g, _| g.pause(timeout)).await
    }

    /// Releases the requests held on `site`, spread over `pause.resume_spread`.
    pub async fn resume(&self, site: &str, actor: Actor) -> Result<SiteView, ControlError> {
        self.pause_change(site, actor, "resume", String::new(), None, |g, cfg| g.resume(cfg.pause.resume_spread)).await
    }

    async fn pause_change(
        &self,
        site: &str,
        actor: Actor,
        kind: &str,
        reason: String,
        paused: Option<Duration>,
        apply: impl FnOnce(&crate::pause::PauseGate, &Site),
    ) -> Result<SiteView, ControlError> {
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        let mut inner = self.inner.lock().await;
        let config = inner.sites.get(site).ok_or_else(|| not_found("site", site))?.clone();
        let gate = self.registry.lock().unwrap_or_else(|e| e.into_inner()).pause_gate(site);
        let held = gate.held();
        // Saved first, like every mode (the requests held at a crash die with the process).
        let mut next = inner.state.clone();
        let s = next.sites.get_mut(site).ok_or_else(|| not_found("site", site))?;
        s.mode.paused = paused;
        let reason = if kind == "resume" { format!("{held} held request(s) released") } else { reason };
        history::push(&mut s.history, HistoryEntry::now(kind, None, None, actor.as_str(), "ok").reason(reason));
        self.commit(&mut inner, next).await?;
        apply(&gate, &config);
        self.metrics.site_mode.with_label_values(&[site, "paused"]).set(i64::from(gate.is_paused()));
        tracing::info!(site, kind, held, "pause changed");
        self.view(&inner, site)
    }

    /// Sets a sticky canary split (percent by target, summing to 100).
    /// Refused (`409 target_unhealthy`) when a target given a share, other
    /// than the live one, is known to be down: every endpoint failing its
    /// checks (one not checked yet does not refuse it).
    pub async fn set_weights(
        &self,
        site: &str,
        weights: BTreeMap<String, u8>,
        actor: Actor,
    ) -> Result<SiteView, ControlError> {
        let sum: u32 = weights.values().map(|&w| u32::from(w)).sum();
        if sum != 100 {
            return Err(invalid("weights", format!("must sum to 100, not {sum}")));
        }
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        let route = self.table.load().site(site).cloned().ok_or_else(|| not_found("site", site))?;
        if let Some(unknown) = weights.keys().find(|t| route.target(t).is_none()) {
            return Err(not_found("target", unknown));
        }
        let weights: BTreeMap<String, u8> = weights.into_iter().filter(|(_, w)| *w > 0).collect();
        let down: Vec<String> = weights
            .keys()
            .filter_map(|name| route.target(name))
            .filter(|t| t.name != route.live.name)
            .filter(|t| t.endpoints.iter().all(|e| e.health() == Health::Unhealthy))
            .flat_map(|t| t.endpoints.iter().map(|e| format!("{} {}: unhealthy", t.name, e.address)))
            .collect();
        if !down.is_empty() {
            let err = refused("target_unhealthy", "a target given a share of the traffic is down", down);
            self.record_refusal(site, "weights", None, actor, &err).await;
            return Err(err);
        }
        self.change_weights(site, Some(weights), actor).await
    }

    /// Ends the canary split: 100 % to the live target.
    pub async fn clear_weights(&self, site: &str, actor: Actor) -> Result<SiteView, ControlError> {
        let lock = self.site_lock(site);
        let _guard = lock.lock().await;
        self.change_weights(site, None, actor).await
    }

    async fn change_weights(
        &self,
        site: &str,
        weights: Option<BTreeMap<String, u8>>,
        actor: Actor,
    ) -> Result<SiteView, ControlError> {
        let mut inner = self.inner.lock().await;
        let mut next = inner.state.clone();
        let s = next.sites.get_mut(site).ok_or_else(|| not_found("site", site))?;
        let reason = match &weights {
            Some(w) => w.iter().map(|(t, p)| format!("{t}={p}")).collect::<Vec<_>>().join(", "),
            None => format!("cleared: 100 % {}", s.live),
        };
        s.weights = weights;
        history::push(&mut s.history, HistoryEntry::now("weights", None, None, actor.as_str(), "ok").reason(reason));
        self.commit(&mut inner, next).await?;
        self.view(&inner, site)
    }

    /// Re-reads the configuration file this process started from.
    pub async fn reload_file(&self) -> Result<ReloadOutcome, ReloadError> {
        let Some(path) = &self.config_path else {
            return Err(ReloadError::NoFile);
        };
        let config = match cutover_config::load(path) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::warn!(errors = %e, "reload refused: the configuration is invalid; nothing changed");
                return Err(ReloadError::Invalid(e));
            }
        };
        self.reload(config).await
    }

    /// Applies a new, valid configuration as one new snapshot: sites, targets,
    /// health and smoke settings, trusted proxies and upstream timeouts.
    /// Listeners are not re-bound; settings that need it are reported.
    pub async fn reload(&self, config: Config) -> Result<ReloadOutcome, ReloadError> {
        // Hold every site's lock so no command is half-way through across the change.
        let names: Vec<String> = {
            let inner = self.inner.lock().await;
            inner.sites.keys().chain(config.sites.iter().map(|s| &s.name)).cloned().collect()
        };
        let mut names = names;
        names.sort();
        names.dedup();
        let locks: Vec<_> = names.iter().map(|n| self.site_lock(n)).collect();
        let mut guards = Vec::with_capacity(locks.len());
        for l in &locks {
            guards.push(l.lock().await);
        }
        let mut inner = self.inner.lock().await;
        if let Some(hook) = &*self.reload_hook.lock().unwrap_or_else(|e| e.into_inner()) {
            if let Err(message) = hook(&config) {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                let error = cutover_config::ConfigError::new("tls.certificates", "", message);
                return Err(ReloadError::Invalid(ConfigErrors {
                    file: self.config_path.as_ref().map(|p| p.display().to_string()),
                    errors: vec![error],
                }));
            }
        }
        // Against what is in force, not the last file read: a second reload
        // of a changed port still says it needs a restart.
        let restart_required = restart_required(&inner.started, &config);
        let next = reconcile(&config, Some(inner.state.clone()));
        let old = (inner.config.clone(), std::mem::take(&mut inner.sites));
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).clear_tls();
        inner.sites = sites_of(&config);
        inner.config = Arc::new(config);
        if let Err(e) = self.commit(&mut inner, next).await {
            (inner.config, inner.sites) = old;
            self.metrics.config_reloads.with_label_values(&["error"]).inc();
            return Err(ReloadError::Persist(e));
        }
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        if !restart_required.is_empty() {
            tracing::warn!(settings = ?restart_required, "reloaded; these changed settings apply only after a restart");
        }
        tracing::info!(sites = inner.sites.len(), "configuration reloaded");
        Ok(ReloadOutcome { sites: inner.sites.keys().cloned().collect(), restart_required })
    }

    async fn switch_locked(
        &self,
        site: &str,
        req: SwitchRequest,
        kind: &str,
        actor: Actor,
    ) -> Result<(SiteView, Option<WatchReceiver>), ControlError> {
        let (config, from) = {
            let inner = self.inner.lock().await;
            let config = inner.sites.get(site).ok_or_else(|| not_found("site", site))?.clone();
            let from = inner.state.sites.get(site).map(|s| s.live.clone()).ok_or_else(|| not_found("site", site))?;
            (config, from)
        };
        let route = self.table.load().site(site).cloned().ok_or_else(|| not_found("site", site))?;
        let Some(target) = route.target(&req.to).cloned() else {
            return Err(not_found("target", &req.to));
        };
        if req.to == from {
            // Already live: nothing to gate but the version it must run, and
            // nothing to do but end a canary split.
            if let Err(err) = version_gate(&target, &req) {
                self.record_refusal(site, kind, Some((&from, &req.to)), actor, &err).await;
                return Err(err);
            }
            let mut inner = self.inner.lock().await;
            if inner.state.sites.get(site).is_some_and(|s| s.weights.is_some()) {
                let mut next = inner.state.clone();
                let s = next.sites.get_mut(site).ok_or_else(|| not_found("site", site))?;
                s.weights = None;
                history::push(
                    &mut s.history,
                    HistoryEntry::now(kind, Some(&from), Some(&req.to), actor.as_str(), "ok"),
                );
                self.commit(&mut inner, next).await?;
                self.metrics.switches.with_label_values(&[site, "ok"]).inc();
            }
            return Ok((self.view(&inner, site)?, None));
        }
        if let Err(err) = self.gate(&config, &target, &req).await {
            self.record_refusal(site, kind, Some((&from, &req.to)), actor, &err).await;
            return Err(err);
        }
        let mut inner = self.inner.lock().await;
        let mut next = inner.state.clone();
        let s = next.sites.get_mut(site).ok_or_else(|| not_found("site", site))?;
        s.previous = Some(from.clone());
        s.live = req.to.clone();
        // A switch ends any canary split: 100 % to the new live target.
        s.weights = None;
        // It ends the running watch too; a forward switch saves the one it
        // starts with it, so that a restart resumes it.
        let watch = if kind == "switch" { watch_config(&config, req.watch) } else { None };
        s.watch = watch.as_ref().map(|cfg| WatchState {
            target: req.to.clone(),
            previous: from.clone(),
            started_at: watch::now_rfc3339(),
            duration: cfg.duration,
        });
        let saved_watch = s.watch.clone();
        let mut entry = HistoryEntry::now(kind, Some(&from), Some(&req.to), actor.as_str(), "ok");
        // Forced by an operator; the watch's and a deploy's own rollbacks skip the gates, but nobody forced them.
        match (&req.reason, req.force && actor == Actor::Api) {
            (Some(r), true) => entry = entry.reason(format!("{r} (forced)")),
            (Some(r), false) => entry = entry.reason(r.clone()),
            (None, true) => entry = entry.reason("forced"),
            (None, false) => {}
        }
        history::push(&mut s.history, entry);
        self.commit(&mut inner, next).await?;
        // Switching back to a draining target cancels its drain.
        if let Some(d) = inner.drains.remove(&(site.to_string(), req.to.clone())) {
            d.task.abort();
        }
        let drain = req.drain_timeout.unwrap_or(config.switch.drain_timeout);
        self.start_drain(&mut inner, (site.to_string(), from.clone()), drain);
        self.settle_pools(&inner);
        self.metrics.switches.with_label_values(&[site, "ok"]).inc();
        tracing::info!(site, from = %from, to = %req.to, kind, actor = actor.as_str(), "switched");
        // A switch ends the site's running watch; a forward switch starts a new one.
        // The watch's own rollback leaves it to report `RolledBack` itself.
        if let Some(w) = inner.watches.remove(site) {
            if actor == Actor::Watch {
                w.stop.cancel();
            } else {
                w.cancel();
            }
        }
        let outcome = match (watch, saved_watch) {
            (Some(cfg), Some(saved)) => {
                let baseline = self.baseline(site, &from, cfg.duration);
                Some(self.start_watch(&mut inner, site, target, WatchPlan { saved, cfg, baseline, left: None }))
            }
            _ => None,
        };
        Ok((self.view(&inner, site)?, outcome))
    }

    /// The answers of `from` over the `window` before now: a new watch's baseline.
    fn baseline(&self, site: &str, from: &str, window: Duration) -> Option<watch::Totals> {
        let key = (site.to_string(), from.to_string());
        let now = self.table.load().site(site).and_then(|s| s.target(from)).map(|t| t.metrics.totals())?;
        self.sampler.over_last(&key, window, now)
    }

    /// Resumes, after a start, each site's saved watch for the time it has
    /// left. (The answers before the restart and the old target's baseline
    /// went with the process: it judges the answers from now on.)
    fn resume_watches(&self, inner: &mut Inner) -> HashMap<String, WatchReceiver> {
        let saved: Vec<(String, WatchState)> =
            inner.state.sites.iter().filter_map(|(name, s)| Some((name.clone(), s.watch.clone()?))).collect();
        let now = std::time::SystemTime::now();
        let mut resumed = HashMap::new();
        for (site, saved) in saved {
            let Some(config) = inner.sites.get(&site).cloned() else { continue };
            let Some(target) = self.table.load().site(&site).and_then(|s| s.target(&saved.target)).cloned() else {
                continue;
            };
            let (Some(left), Some(cfg)) = (saved.left_at(now), watch_config(&config, Some(saved.duration))) else {
                continue;
            };
            tracing::info!(site = %site, target = %saved.target, left = ?left, "post-switch watch resumed");
            let plan = WatchPlan { saved, cfg, baseline: None, left: Some(left) };
            resumed.insert(site.clone(), self.start_watch(inner, &site, target, plan));
        }
        resumed
    }

    /// Runs the watch `plan` of `target` on `site`.
    fn start_watch(&self, inner: &mut Inner, site: &str, target: Arc<TargetPool>, plan: WatchPlan) -> WatchReceiver {
        let WatchPlan { saved, cfg, baseline, left } = plan;
        let rate = |(e, n): (u64, u64)| (n > 0).then(|| e as f64 / n as f64);
        let view = Arc::new(Mutex::new(WatchView {
            target: target.name.clone(),
            previous: saved.previous.clone(),
            started_at: saved.started_at.clone(),
            resumed_at: left.map(|_| watch::now_rfc3339()),
            duration: humantime::format_duration(cfg.duration).to_string(),
            requests: 0,
            errors: 0,
            error_rate: None,
            baseline_error_rate: baseline.filter(|b| b.1 >= cfg.min_requests).and_then(rate),
            max_error_rate: cfg.max_error_rate,
            min_requests: cfg.min_requests,
        }));
        let (outcome, receiver) = tokio::sync::watch::channel(None);
        let stop = self.shutdown.child_token();
        let handle = WatchHandle { stop: stop.clone(), view: view.clone(), outcome: outcome.clone() };
        inner.watches.insert(site.to_string(), handle);
        let (me, site) = (self.me.clone(), site.to_string());
        let start_totals = target.metrics.totals();
        tokio::spawn(async move {
            let until = crate::deadline_after(left.unwrap_or(cfg.duration));
            let mut tick = tokio::time::interval(watch::CHECK_EVERY);
            let result = loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let now = target.metrics.totals();
                let seen = (now.0.saturating_sub(start_totals.0), now.1.saturating_sub(start_totals.1));
                if let Ok(mut v) = view.lock() {
                    (v.errors, v.requests, v.error_rate) = (seen.0, seen.1, rate(seen));
                }
                if let Some(reason) = watch::verdict(&cfg, seen, baseline) {
                    let Some(c) = me.upgrade() else { return };
                    break match c.watch_rollback(&site, &target.name, &stop, reason.clone()).await {
                        Ok(true) => WatchOutcome::RolledBack(reason),
                        Ok(false) => WatchOutcome::Cancelled,
                        Err(e) => WatchOutcome::Failed(format!("{reason}, but the automatic rollback failed: {e}")),
                    };
                }
                if Instant::now() >= until {
                    break WatchOutcome::Passed;
                }
            };
            // Over: no longer saved (a rollback's switch has cleared it already).
            let over = matches!(result, WatchOutcome::Passed | WatchOutcome::Failed(_));
            outcome.send_replace(Some(result));
            if let Some(c) = me.upgrade() {
                c.watch_ended(&site, &stop, over.then_some(&saved)).await;
            }
        });
        receiver
    }

    /// A watch of `site` ended; one that is `over` is no longer saved (if a
    /// later switch has not replaced it meanwhile).
    async fn watch_ended(&self, site: &str, stop: &CancellationToken, over: Option<&WatchState>) {
        let mut inner = self.inner.lock().await;
        if inner.watches.get(site).is_some_and(|w| w.stop == *stop) {
            inner.watches.remove(site);
        }
        let Some(saved) = over else { return };
        if inner.state.sites.get(site).and_then(|s| s.watch.as_ref()) != Some(saved) {
            return;
        }
        let mut next = inner.state.clone();
        if let Some(s) = next.sites.get_mut(site) {
            s.watch = None;
        }
        if let Err(e) = self.commit(&mut inner, next).await {
            // A restart would resume it, and find its time over.
            tracing::warn!(site, error = %e, "could not save the end of a post-switch watch");
        }
    }

    /// Starts the drain of `key`: at the deadline, whatever still runs on it is closed.
    fn start_drain(&self, inner: &mut Inner, key: TargetKey, timeout: Duration) {
        let deadline = crate::deadline_after(timeout);
        let me = self.me.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            if let Some(c) = me.upgrade() {
                c.drain_deadline(task_key, deadline).await;
            }
        });
        if let Some(old) = inner.drains.insert(key, DrainTimer { deadline, task: task.abort_handle() }) {
            old.task.abort();
        }
    }

    /// The drain deadline of `key` passed: close what is left on it.
    async fn drain_deadline(&self, key: TargetKey, deadline: Instant) {
        let mut inner = self.inner.lock().await;
        if inner.drains.get(&key).is_none_or(|d| d.deadline != deadline) {
            return; // cancelled or superseded
        }
        inner.drains.remove(&key);
        let live = inner.state.sites.get(&key.0).map(|s| s.live.as_str());
        if live == Some(key.1.as_str()) {
            return;
        }
        let left = self.table.load().site(&key.0).and_then(|s| s.target(&key.1)).map_or(0, |t| t.inflight());
        if left > 0 {
            tracing::info!(site = %key.0, target = %key.1, inflight = left, "drain deadline: closing what is left");
        }
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).rotate_drain(&key);
        self.publish(&inner);
        // What finished meanwhile was closed; an h2 connection may be left.
        if let Some(t) = self.table.load().site(&key.0).and_then(|s| s.target(&key.1)) {
            for e in &t.endpoints {
                e.pool.close_idle();
            }
        }
    }

    /// Every smoke check of `site` on every endpoint of `target` that is not
    /// known to be down; the failures (one when no endpoint was left to test).
    async fn smoke_reasons(&self, site: &Site, target: &TargetPool) -> Vec<String> {
        let mut reasons = Vec::new();
        let host = site.health.host.as_deref();
        let timeout = self.table.load().settings.response_timeout.min(Duration::from_secs(10));
        // An endpoint that is down takes no traffic (`require: any_healthy`
        // lets a target go live without it): it is not smoke-tested either.
        // One not checked yet is, since it may take traffic.
        let testable: Vec<_> = target.endpoints.iter().filter(|e| e.health() != Health::Unhealthy).collect();
        if testable.is_empty() && !site.switch.smoke.is_empty() {
            reasons.push(format!("{}: no endpoint is up to be smoke-tested", target.name));
        }
        for e in testable {
            for check in &site.switch.smoke {
                if let Err(why) = smoke::run(&e.address, e.tls.load().as_deref(), host, check, timeout).await {
                    reasons.push(format!("{} {}: {why}", target.name, e.address));
                }
            }
        }
        reasons
    }

    /// Checks health, version and smoke gates of `target`; `Err` lists every failure.
    async fn gate(&self, site: &Site, target: &TargetPool, req: &SwitchRequest) -> Result<(), ControlError> {
        version_gate(target, req)?;
        if req.force {
            return Ok(());
        }
        let unhealthy: Vec<String> = target
            .endpoints
            .iter()
            .filter(|e| e.health() != Health::Healthy)
            .map(|e| {
                let why = if e.health() == Health::Unknown { "not checked yet" } else { "unhealthy" };
                format!("{} {}: {why}", target.name, e.address)
            })
            .collect();
        let healthy_count = target.endpoints.len() - unhealthy.len();
        let passes = match site.switch.require {
            Require::AllHealthy => unhealthy.is_empty(),
            Require::AnyHealthy => healthy_count > 0,
        };
        if !passes {
            return Err(refused("target_unhealthy", format!("target {:?} is not healthy", target.name), unhealthy));
        }
        let reasons = self.smoke_reasons(site, target).await;
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(refused("smoke_failed", format!("smoke checks of target {:?} failed", target.name), reasons))
        }
    }

    async fn record_refusal(
        &self,
        site: &str,
        kind: &str,
        fromto: Option<(&str, &str)>,
        actor: Actor,
        err: &ControlError,
    ) {
        if matches!(kind, "switch" | "rollback" | "automatic_rollback") {
            self.metrics.switches.with_label_values(&[site, "refused"]).inc();
        }
        let mut inner = self.inner.lock().await;
        let mut next = inner.state.clone();
        let Some(s) = next.sites.get_mut(site) else { return };
        let (from, to) =
            fromto.map_or((Some(s.live.clone()), None), |(f, t)| (Some(f.to_string()), Some(t.to_string())));
        let mut reason = err.to_string();
        if let ControlError::Refused { reasons, .. } = err {
            if !reasons.is_empty() {
                reason = format!("{reason}: {}", reasons.join("; "));
            }
        }
        let entry = HistoryEntry::now(kind, from.as_deref(), to.as_deref(), actor.as_str(), "refused").reason(reason);
        history::push(&mut s.history, entry);
        if let Err(e) = self.commit(&mut inner, next).await {
            tracing::warn!(site, error = %e, "could not record a refused action");
        }
    }

    /// Saves `next` durably, then publishes it. On a save error nothing
    /// changes: the state in force is saved again, since the failed save may
    /// have put its file in place already (a rename done, the directory's
    /// fsync failed), and a restart must not bring in an action that failed.
    async fn commit(&self, inner: &mut Inner, next: State) -> Result<(), ControlError> {
        if let Err(e) = self.save(next.clone()).await {
            if let Err(undo) = self.save(inner.state.clone()).await {
                tracing::error!(error = %undo, "could not save the state in force again after a failed save");
            }
            return Err(e);
        }
        inner.state = next;
        self.publish(inner);
        Ok(())
    }

    /// Writes `state` to the store, off the runtime's threads.
    async fn save(&self, state: State) -> Result<(), ControlError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.save(&state)).await {
            Ok(saved) => saved.map_err(|e| ControlError::Persist(e.to_string())),
            Err(e) => Err(ControlError::Persist(e.to_string())),
        }
    }

    /// Builds the routing snapshot of `inner` and publishes it with one store.
    fn publish(&self, inner: &Inner) {
        let settings = Settings::from_config(&inner.config);
        let table = self.registry.lock().unwrap_or_else(|e| e.into_inner()).build(&inner.sites, &inner.state, settings);
        self.table.store(Arc::new(table));
        self.settle_pools(inner);
    }

    /// Retires the connection pools of the targets draining after a switch
    /// (neither live nor weighted), so no idle connection to the old target
    /// outlives the switch, and puts every other target's pools back in use.
    fn settle_pools(&self, inner: &Inner) {
        let table = self.table.load();
        for route in &table.sites {
            let Some(s) = inner.state.sites.get(route.name()) else { continue };
            for t in &route.targets {
                let weighted = s.weights.as_ref().is_some_and(|w| w.get(&t.name).is_some_and(|&p| p > 0));
                let retired = t.name != s.live
                    && !weighted
                    && inner.drains.contains_key(&(route.name().to_string(), t.name.clone()));
                for e in &t.endpoints {
                    e.pool.set_retired(retired);
                }
            }
        }
    }

    fn view(&self, inner: &Inner, site: &str) -> Result<SiteView, ControlError> {
        let s = inner.state.sites.get(site).ok_or_else(|| not_found("site", site))?;
        let table = self.table.load();
        let route = table.site(site).ok_or_else(|| not_found("site", site))?;
        let now = Instant::now();
        let targets = route
            .targets
            .iter()
            .map(|t| {
                let inflight = t.inflight();
                let draining = inner.drains.get(&(site.to_string(), t.name.clone())).is_some_and(|d| d.deadline > now)
                    && inflight > 0;
                let weighted = s.weights.as_ref().is_some_and(|w| w.get(&t.name).is_some_and(|&p| p > 0));
                let state = if t.name == s.live {
                    "live"
                } else if weighted {
                    "canary"
                } else if draining {
                    "draining"
                } else {
                    "standby"
                };
                let endpoints = t
                    .endpoints
                    .iter()
                    .map(|e| EndpointView {
                        address: e.address.clone(),
                        healthy: e.health().as_option(),
                        inflight: e.outstanding.load(std::sync::atomic::Ordering::Relaxed),
                        version: e.reported_version(),
                    })
                    .collect();
                (
                    t.name.clone(),
                    TargetView { version: t.version.clone(), state, inflight, read_only: t.read_only, endpoints },
                )
            })
            .collect();
        Ok(SiteView {
            name: site.to_string(),
            hosts: route.config.hosts.clone(),
            live: s.live.clone(),
            previous: s.previous.clone(),
            mode: ModeView {
                read_only: s.mode.read_only,
                maintenance: s.mode.maintenance,
                paused: route.pause.is_paused(),
            },
            weights: s.weights.clone(),
            held: route.pause.held(),
            targets,
            watch: inner
                .watches
                .get(site)
                .and_then(|w| w.view.lock().ok().and_then(|v| serde_json::to_value(&*v).ok())),
        })
    }
}

/// Settings that differ between `old` (in force since the start) and `new`
/// but need a restart to apply.
fn restart_required(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |name: &str, changed: bool| {
        if changed {
            out.push(name.to_string());
        }
    };
    check("listen.http", old.listen.http != new.listen.http);
    check("listen.https", matches!((old.listen.https, new.listen.https), (Some(a), Some(b)) if a != b));
    check("listen.https", old.listen.https.is_some() != new.listen.https.is_some());
    check("admin", old.admin != new.admin);
    check("state.path", old.state_path != new.state_path);
    check("shutdown_timeout", old.shutdown_timeout != new.shutdown_timeout);
    let (a, b) = (&old.limits, &new.limits);
    check("limits.header_read_timeout", a.header_read_timeout != b.header_read_timeout);
    check("limits.idle_timeout", a.idle_timeout != b.idle_timeout);
    check("limits.max_header_bytes", a.max_header_bytes != b.max_header_bytes);
    check("limits.max_connections", a.max_connections != b.max_connections);
    out
}

fn not_found(kind: &'static str, name: &str) -> ControlError {
    ControlError::NotFound { kind, name: name.to_string() }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ControlError {
    ControlError::Invalid { field: field.into(), message: message.into() }
}

/// The watch a switch of `config`'s site starts: the site's `switch.watch`
/// (or the defaults), lasting `duration` when the switch gives one; `None`
/// when it lasts zero.
fn watch_config(config: &Site, duration: Option<Duration>) -> Option<cutover_config::Watch> {
    let mut cfg = config.switch.watch.clone().unwrap_or(cutover_config::Watch {
        duration: Duration::ZERO,
        max_error_rate: 0.05,
        min_requests: 20,
    });
    if let Some(d) = duration {
        cfg.duration = d;
    }
    (!cfg.duration.is_zero()).then_some(cfg)
}

/// Checks a target's name and endpoints as given to the API (`set_target`, deploys).
fn check_new_target(target: &str, endpoints: &[String], version: Option<&str>) -> Result<(), ControlError> {
    cutover_config::validate_site_name(target).map_err(|m| invalid("target", format!("{target:?} {m}")))?;
    if version.is_some_and(|v| v.trim().is_empty()) {
        return Err(invalid("version", "must not be empty (leave it out for none)"));
    }
    if endpoints.is_empty() {
        return Err(invalid("endpoints", "at least one endpoint is required"));
    }
    for (i, e) in endpoints.iter().enumerate() {
        cutover_config::validate_endpoint(e).map_err(|m| invalid(format!("endpoints[{i}]"), format!("{e:?}: {m}")))?;
        if let Some(first) = endpoints[..i].iter().position(|other| other == e) {
            return Err(invalid(format!("endpoints[{i}]"), format!("{e:?} is listed twice (also endpoints[{first}])")));
        }
    }
    Ok(())
}

/// `expect_version` (never skipped, not even by `force`): every endpoint
/// must report that version, or, reporting none, the target must declare it.
fn version_gate(target: &TargetPool, req: &SwitchRequest) -> Result<(), ControlError> {
    let Some(expected) = &req.expect_version else { return Ok(()) };
    let reasons: Vec<String> = target
        .endpoints
        .iter()
        .filter_map(|e| {
            let runs = e.reported_version().or_else(|| target.version.clone());
            (runs.as_deref() != Some(expected.as_str())).then(|| {
                format!(
                    "{} {}: runs {}, expected {expected}",
                    target.name,
                    e.address,
                    runs.as_deref().unwrap_or("no known version")
                )
            })
        })
        .collect();
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(refused("version_mismatch", format!("target {:?} does not run version {expected}", target.name), reasons))
    }
}

fn refused(code: &'static str, message: impl Into<String>, reasons: Vec<String>) -> ControlError {
    ControlError::Refused { code, message: message.into(), reasons }
}
