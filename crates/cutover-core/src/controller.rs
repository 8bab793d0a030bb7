//! The controller: the only writer of routing and state.
//!
//! Every command on a site runs under that site's lock, so commands on one
//! site apply one at a time in arrival order (tokio's mutex is fair). A
//! command validates, gates (health, smoke, version), then commits: the new
//! state is saved durably, the new routing snapshot is published with one
//! `store`, and only then is the command acknowledged. A refusal is recorded
//! in history and changes nothing else.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use cutover_config::{Config, Health as HealthConfig, Require, Site, Target};
use cutover_metrics::Metrics;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{Endpoint, Health};
use crate::error::ControlError;
use crate::history::{self, HistoryEntry};
use crate::routing::{RoutingTable, SiteRoute, TargetPool};
use crate::state::{SiteState, State, StateError, StateStore, TargetSpec, STATE_VERSION};
use crate::upstream::Pool;
use crate::view::{EndpointView, ModeView, SiteView, TargetView};
use crate::{health, smoke};

/// Idle upstream connections kept per endpoint.
const POOL_MAX_IDLE: usize = 256;
/// How long an idle upstream connection is kept (shorter than common upstream keep-alives).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// The mutable state behind the command lock.
struct Inner {
    state: State,
    /// (site, target) → drain deadline of a target that was live.
    drains: HashMap<(String, String), Instant>,
}

type EndpointKey = (String, String, String);

/// The control plane of one running cutover.
pub struct Controller {
    config: Arc<Config>,
    sites: BTreeMap<String, Arc<Site>>,
    health: BTreeMap<String, Arc<HealthConfig>>,
    table: Arc<ArcSwap<RoutingTable>>,
    metrics: Metrics,
    store: Arc<dyn StateStore>,
    inner: tokio::sync::Mutex<Inner>,
    site_locks: BTreeMap<String, Arc<tokio::sync::Mutex<()>>>,
    endpoints: Mutex<HashMap<EndpointKey, (Arc<Endpoint>, CancellationToken)>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("sites", &self.sites.keys()).finish()
    }
}

impl Controller {
    /// Loads state from `store`, reconciles it with `config`, publishes the
    /// first snapshot and starts the health checks. Must run inside a tokio runtime.
    pub fn start(config: Config, store: Arc<dyn StateStore>, metrics: Metrics) -> Result<Arc<Self>, StateError> {
        let loaded = store.load()?;
        let state = reconcile(&config, loaded);
        let sites: BTreeMap<_, _> = config.sites.iter().map(|s| (s.name.clone(), Arc::new(s.clone()))).collect();
        let controller = Arc::new(Self {
            health: sites.iter().map(|(n, s)| (n.clone(), Arc::new(s.health.clone()))).collect(),
            site_locks: sites.keys().map(|n| (n.clone(), Arc::default())).collect(),
            sites,
            config: Arc::new(config),
            table: Arc::new(ArcSwap::from_pointee(RoutingTable::default())),
            metrics,
            store,
            endpoints: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            inner: tokio::sync::Mutex::new(Inner { state: State::default(), drains: HashMap::new() }),
        });
        controller.publish(&state);
        controller.inner.try_lock().expect("fresh controller is unlocked").state = state;
        Ok(controller)
    }

    /// The routing snapshot the data plane reads.
    pub fn table(&self) -> Arc<ArcSwap<RoutingTable>> {
        self.table.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The metrics of this process.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops every health check.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    fn site_lock(&self, site: &str) -> Result<Arc<tokio::sync::Mutex<()>>, ControlError> {
        self.site_locks.get(site).cloned().ok_or_else(|| not_found("site", site))
    }

    /// Every site, in configuration order.
    pub async fn sites(&self) -> Vec<SiteView> {
        let inner = self.inner.lock().await;
        let table = self.table.load();
        table.sites.iter().filter_map(|r| self.view(&inner, r.name()).ok()).collect()
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
        let lock = self.site_lock(site)?;
        let _guard = lock.lock().await;
        self.switch_locked(site, req, "switch", actor).await
    }

    /// Switches `site` back to its previous target.
    pub async fn rollback(&self, site: &str, force: bool, actor: Actor) -> Result<SiteView, ControlError> {
        let lock = self.site_lock(site)?;
        let _guard = lock.lock().await;
        let previous = {
            let inner = self.inner.lock().await;
            inner.state.sites.get(site).and_then(|s| s.previous.clone())
        };
        let Some(to) = previous else {
            let err = refused("nothing_to_roll_back", format!("site {site:?} has no previous target"), vec![]);
            self.record_refusal(site, "rollback", None, actor, &err).await;
            return Err(err);
        };
        let kind = if actor == Actor::Watch { "automatic_rollback" } else { "rollback" };
        let req = SwitchRequest { to, force, ..Default::default() };
        let view = self.switch_locked(site, req, kind, actor).await?;
        let reason = if actor == Actor::Watch { "automatic" } else { "manual" };
        self.metrics.rollbacks.with_label_values(&[site, reason]).inc();
        Ok(view)
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
        let lock = self.site_lock(site)?;
        let _guard = lock.lock().await;
        cutover_config::validate_site_name(target).map_err(|m| invalid("target", format!("{target:?} {m}")))?;
        if endpoints.is_empty() {
            return Err(invalid("endpoints", "at least one endpoint is required"));
        }
        for (i, e) in endpoints.iter().enumerate() {
            cutover_config::validate_endpoint(e)
                .map_err(|m| invalid(format!("endpoints[{i}]"), format!("{e:?}: {m}")))?;
        }
        let mut inner = self.inner.lock().await;
        let current = inner.state.sites.get(site).ok_or_else(|| not_found("site", site))?;
        if current.live == target {
            return Err(refused(
                "target_is_live",
                format!("target {target:?} is live on {site:?}; switch away from it first"),
                vec![],
            ));
        }
        let mut next = inner.state.clone();
        let s = next.sites.get_mut(site).expect("site checked above");
        s.targets.insert(target.to_string(), TargetSpec { endpoints: endpoints.clone(), version: version.clone() });
        let reason = format!(
            "endpoints {}{}",
            endpoints.join(", "),
            version.map(|v| format!(", version {v}")).unwrap_or_default()
        );
        history::push(
            &mut s.history,
            HistoryEntry::now("set_target", None, Some(target), actor.as_str(), "ok").reason(reason),
        );
        self.commit(&mut inner, next).await?;
        // A replaced target that was draining keeps its count; its deadline no longer matters.
        self.view(&inner, site)
    }

    async fn switch_locked(
        &self,
        site: &str,
        req: SwitchRequest,
        kind: &str,
        actor: Actor,
    ) -> Result<SiteView, ControlError> {
        let config = self.sites.get(site).ok_or_else(|| not_found("site", site))?.clone();
        let from = {
            let inner = self.inner.lock().await;
            inner.state.sites.get(site).map(|s| s.live.clone()).ok_or_else(|| not_found("site", site))?
        };
        let route = self.table.load().site(site).cloned().ok_or_else(|| not_found("site", site))?;
        let Some(target) = route.target(&req.to).cloned() else {
            return Err(not_found("target", &req.to));
        };
        if req.to == from {
            let inner = self.inner.lock().await;
            return self.view(&inner, site);
        }
        if let Err(err) = self.gate(&config, &target, &req).await {
            self.record_refusal(site, kind, Some((&from, &req.to)), actor, &err).await;
            return Err(err);
        }
        let mut inner = self.inner.lock().await;
        let mut next = inner.state.clone();
        let s = next.sites.get_mut(site).expect("site exists in state");
        s.previous = Some(from.clone());
        s.live = req.to.clone();
        let mut entry = HistoryEntry::now(kind, Some(&from), Some(&req.to), actor.as_str(), "ok");
        if req.force {
            entry = entry.reason("forced");
        }
        history::push(&mut s.history, entry);
        self.commit(&mut inner, next).await?;
        let drain = req.drain_timeout.unwrap_or(config.switch.drain_timeout);
        inner.drains.remove(&(site.to_string(), req.to.clone()));
        inner.drains.insert((site.to_string(), from.clone()), Instant::now() + drain);
        self.metrics.switches.with_label_values(&[site, "ok"]).inc();
        tracing::info!(site, from = %from, to = %req.to, kind, actor = actor.as_str(), "switched");
        self.view(&inner, site)
    }

    /// Checks health, version and smoke gates of `target`; `Err` lists every failure.
    async fn gate(&self, site: &Site, target: &TargetPool, req: &SwitchRequest) -> Result<(), ControlError> {
        if let Some(expected) = &req.expect_version {
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
            if !reasons.is_empty() {
                return Err(refused(
                    "version_mismatch",
                    format!("target {:?} does not run version {expected}", target.name),
                    reasons,
                ));
            }
        }
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
        let mut reasons = Vec::new();
        let host = site.health.host.as_deref();
        for e in &target.endpoints {
            for check in &site.switch.smoke {
                if let Err(why) = smoke::run(
                    &e.address,
                    host,
                    check,
                    self.config.limits.upstream_response_timeout.min(Duration::from_secs(10)),
                )
                .await
                {
                    reasons.push(format!("{} {}: {why}", target.name, e.address));
                }
            }
        }
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
        self.metrics.switches.with_label_values(&[site, "refused"]).inc();
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

    /// Saves `next` durably, then publishes it. On a save error nothing changes.
    async fn commit(&self, inner: &mut Inner, next: State) -> Result<(), ControlError> {
        let store = self.store.clone();
        let to_save = next.clone();
        tokio::task::spawn_blocking(move || store.save(&to_save))
            .await
            .map_err(|e| ControlError::Persist(e.to_string()))?
            .map_err(|e| ControlError::Persist(e.to_string()))?;
        self.publish(&next);
        inner.state = next;
        Ok(())
    }

    /// Builds the routing snapshot of `state` and publishes it with one store.
    fn publish(&self, state: &State) {
        let mut registry = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = Vec::new();
        let mut routes = Vec::new();
        for (name, site) in &self.sites {
            let Some(s) = state.sites.get(name) else { continue };
            let mut pools = Vec::new();
            for (tname, target) in effective_targets(site, s) {
                let endpoints = target
                    .endpoints
                    .iter()
                    .map(|addr| {
                        let key = (name.clone(), tname.clone(), addr.clone());
                        used.push(key.clone());
                        self.endpoint(&mut registry, key)
                    })
                    .collect();
                self.metrics.live_target.with_label_values(&[name, &tname]).set(i64::from(tname == s.live));
                pools.push(Arc::new(TargetPool {
                    metrics: self.metrics.target(name, &tname),
                    name: tname,
                    version: target.version.clone(),
                    endpoints,
                    read_only: target.read_only,
                    protocol: target.protocol,
                }));
            }
            let Some(live) = pools.iter().find(|p| p.name == s.live).cloned() else {
                tracing::error!(site = %name, live = %s.live, "live target missing; site not routed");
                continue;
            };
            routes.push(Arc::new(SiteRoute { config: site.clone(), live, targets: pools }));
        }
        registry.retain(|key, (_, stop)| {
            let keep = used.contains(key);
            if !keep {
                stop.cancel();
                let _ = self.metrics.endpoint_healthy.remove_label_values(&[&key.0, &key.1, &key.2]);
            }
            keep
        });
        self.table.store(Arc::new(RoutingTable::new(routes)));
    }

    fn endpoint(
        &self,
        registry: &mut HashMap<EndpointKey, (Arc<Endpoint>, CancellationToken)>,
        key: EndpointKey,
    ) -> Arc<Endpoint> {
        if let Some((e, _)) = registry.get(&key) {
            return e.clone();
        }
        let gauge = self.metrics.endpoint_healthy.with_label_values(&[&key.0, &key.1, &key.2]);
        let endpoint = Arc::new(Endpoint::new(key.2.clone(), gauge, Pool::new(POOL_MAX_IDLE, POOL_IDLE_TIMEOUT)));
        let stop = self.shutdown.child_token();
        let cfg = self.health.get(&key.0).cloned().unwrap_or_default();
        tokio::spawn(health::run(endpoint.clone(), cfg, stop.clone()));
        registry.insert(key, (endpoint.clone(), stop));
        endpoint
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
                let draining =
                    inner.drains.get(&(site.to_string(), t.name.clone())).is_some_and(|d| *d > now) && inflight > 0;
                let state = if t.name == s.live {
                    "live"
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
            mode: ModeView { read_only: s.mode.read_only, maintenance: s.mode.maintenance, paused: false },
            weights: s.weights.clone(),
            targets,
            watch: None,
        })
    }
}

/// The targets of a site: those of the configuration, with API-set ones laid over.
fn effective_targets(site: &Site, state: &SiteState) -> BTreeMap<String, Target> {
    let mut targets = site.targets.clone();
    for (name, spec) in &state.targets {
        let t = targets.entry(name.clone()).or_default();
        t.endpoints = spec.endpoints.clone();
        t.version = spec.version.clone();
    }
    targets
}

/// Merges loaded state with the configuration: stale entries are dropped with a warning.
fn reconcile(config: &Config, loaded: Option<State>) -> State {
    let mut loaded = loaded.unwrap_or_default();
    let mut state = State { version: STATE_VERSION, sites: BTreeMap::new() };
    for name in loaded.sites.keys() {
        if !config.sites.iter().any(|s| &s.name == name) {
            tracing::warn!(site = %name, "state has a site the configuration no longer has; dropped");
        }
    }
    for site in &config.sites {
        let mut s = loaded
            .sites
            .remove(&site.name)
            .unwrap_or_else(|| SiteState { live: site.live.clone(), ..Default::default() });
        let known = |t: &str, s: &SiteState| site.targets.contains_key(t) || s.targets.contains_key(t);
        if !known(&s.live, &s) {
            tracing::warn!(site = %site.name, target = %s.live, "state's live target no longer exists; using the configured live target");
            s.live = site.live.clone();
        }
        if let Some(p) = s.previous.clone() {
            if !known(&p, &s) || p == s.live {
                tracing::warn!(site = %site.name, target = %p, "state's previous target no longer exists; dropped");
                s.previous = None;
            }
        }
        if let Some(w) = &s.weights {
            if w.keys().any(|t| !known(t, &s)) {
                tracing::warn!(site = %site.name, "state's weights name a target that no longer exists; dropped");
                s.weights = None;
            }
        }
        state.sites.insert(site.name.clone(), s);
    }
    state
}

fn not_found(kind: &'static str, name: &str) -> ControlError {
    ControlError::NotFound { kind, name: name.to_string() }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ControlError {
    ControlError::Invalid { field: field.into(), message: message.into() }
}

fn refused(code: &'static str, message: impl Into<String>, reasons: Vec<String>) -> ControlError {
    ControlError::Refused { code, message: message.into(), reasons }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let yaml = r#"
listen: { http: 127.0.0.1:0 }
sites:
  - name: shop
    hosts: [shop.test]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:1] }
      green: { endpoints: [127.0.0.1:2] }
"#;
        cutover_config::parse(yaml, std::path::Path::new(".")).unwrap()
    }

    fn site_state(live: &str, previous: Option<&str>) -> SiteState {
        SiteState { live: live.into(), previous: previous.map(Into::into), ..Default::default() }
    }

    #[test]
    fn without_state_the_configured_live_target_is_used() {
        let state = reconcile(&config(), None);
        assert_eq!(state.sites["shop"].live, "blue");
        assert_eq!(state.version, STATE_VERSION);
    }

    #[test]
    fn state_wins_over_the_configuration() {
        let mut loaded = State { version: STATE_VERSION, ..Default::default() };
        loaded.sites.insert("shop".into(), site_state("green", Some("blue")));
        let state = reconcile(&config(), Some(loaded));
        assert_eq!(state.sites["shop"].live, "green");
        assert_eq!(state.sites["shop"].previous.as_deref(), Some("blue"));
    }

    #[test]
    fn stale_sites_and_targets_are_dropped() {
        let mut loaded = State { version: STATE_VERSION, ..Default::default() };
        loaded.sites.insert("gone".into(), site_state("blue", None));
        let mut shop = site_state("purple", Some("orange"));
        shop.weights = Some([("blue".to_string(), 50), ("mauve".to_string(), 50)].into());
        loaded.sites.insert("shop".into(), shop);
        let state = reconcile(&config(), Some(loaded));
        assert!(!state.sites.contains_key("gone"));
        let shop = &state.sites["shop"];
        assert_eq!(shop.live, "blue");
        assert_eq!(shop.previous, None);
        assert_eq!(shop.weights, None);
    }

    #[test]
    fn targets_set_through_the_api_are_kept() {
        let mut loaded = State { version: STATE_VERSION, ..Default::default() };
        let mut shop = site_state("clone", Some("blue"));
        shop.targets.insert("clone".into(), TargetSpec { endpoints: vec!["127.0.0.1:3".into()], version: None });
        loaded.sites.insert("shop".into(), shop);
        let state = reconcile(&config(), Some(loaded));
        assert_eq!(state.sites["shop"].live, "clone");
        let targets = effective_targets(&config().sites[0], &state.sites["shop"]);
        assert_eq!(targets.keys().collect::<Vec<_>>(), ["blue", "clone", "green"]);
    }
}
