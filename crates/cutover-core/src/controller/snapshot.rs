//! Building routing snapshots from configuration and state.
//!
//! The [`Registry`] keeps what must outlive any one snapshot: one
//! [`Endpoint`] per (site, target, address) with its health probe, and the
//! current drain token of each target. A snapshot is rebuilt on every
//! change, reusing those objects, so counts and health survive it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cutover_config::{Health as HealthConfig, Protocol, Site, Target};
use cutover_metrics::Metrics;
use tokio_util::sync::CancellationToken;

use super::reconcile::effective_targets;
use crate::endpoint::Endpoint;
use crate::health;
use crate::pause::PauseGate;
use crate::routing::{Canary, RoutingTable, Settings, SiteRoute, TargetPool};
use crate::state::State;
use crate::upstream::{Pool, UpstreamTls};

/// Idle upstream connections kept per endpoint.
const POOL_MAX_IDLE: usize = 256;
/// How long an idle upstream connection is kept: shorter than common upstream
/// keep-alives (Node 5 s, gunicorn 2 s is the odd one out), so cutover closes first.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// (site, target, address)
type EndpointKey = (String, String, String);
/// (site, target)
pub(crate) type TargetKey = (String, String);

struct EndpointEntry {
    endpoint: Arc<Endpoint>,
    probe: CancellationToken,
    health: Arc<HealthConfig>,
}

/// Objects that outlive snapshots.
pub(crate) struct Registry {
    endpoints: HashMap<EndpointKey, EndpointEntry>,
    drains: HashMap<TargetKey, CancellationToken>,
    pauses: HashMap<String, Arc<PauseGate>>,
    /// Upstream TLS connectors by (ca, server_name, h2); cleared on reload.
    tls: HashMap<(Option<std::path::PathBuf>, Option<String>, bool), Arc<UpstreamTls>>,
    metrics: Metrics,
    /// Parent of every probe's stop token.
    shutdown: CancellationToken,
}

impl Registry {
    pub(crate) fn new(metrics: Metrics, shutdown: CancellationToken) -> Self {
        Self {
            endpoints: HashMap::new(),
            drains: HashMap::new(),
            pauses: HashMap::new(),
            tls: HashMap::new(),
            metrics,
            shutdown,
        }
    }

    /// Forgets cached upstream TLS connectors (CA files are read again).
    pub(crate) fn clear_tls(&mut self) {
        self.tls.clear();
    }

    /// The upstream TLS connector of `target`, when it says `tls: true`. A CA
    /// that cannot be read fails closed: no handshake to that target succeeds.
    fn upstream_tls(&mut self, target: &Target) -> Option<Arc<UpstreamTls>> {
        if !target.tls {
            return None;
        }
        let h2 = target.protocol == Protocol::H2;
        let key = (target.ca.clone(), target.server_name.clone(), h2);
        let made = self.tls.entry(key).or_insert_with(|| {
            let name = target.server_name.as_deref();
            let tls = UpstreamTls::new(target.ca.as_deref(), name, h2).unwrap_or_else(|e| {
                tracing::error!(error = %e, "upstream TLS roots unreadable: connections to this target will fail");
                UpstreamTls::closed()
            });
            Arc::new(tls)
        });
        Some(made.clone())
    }

    /// The pause gate of `site` (created on first use; it outlives snapshots).
    pub(crate) fn pause_gate(&mut self, site: &str) -> Arc<PauseGate> {
        let metrics = &self.metrics;
        self.pauses
            .entry(site.to_string())
            .or_insert_with(|| Arc::new(PauseGate::new(metrics.held_requests.with_label_values(&[site]))))
            .clone()
    }

    /// Cancels the drain token of `key` (closing what started under it) and starts a fresh one.
    pub(crate) fn rotate_drain(&mut self, key: &TargetKey) {
        if let Some(old) = self.drains.insert(key.clone(), CancellationToken::new()) {
            old.cancel();
        }
    }

    /// Builds the snapshot of `state` over `sites`. Endpoints no longer used stop being probed.
    pub(crate) fn build(
        &mut self,
        sites: &BTreeMap<String, Arc<Site>>,
        state: &State,
        settings: Settings,
    ) -> RoutingTable {
        let mut used_endpoints = HashSet::new();
        let mut used_targets = HashSet::new();
        let mut routes = Vec::new();
        let mut sites_seen = HashSet::new();
        for (name, site) in sites {
            sites_seen.insert(name.clone());
            let Some(s) = state.sites.get(name) else { continue };
            let health = Arc::new(site.health.clone());
            let mut pools = Vec::new();
            for (tname, target) in effective_targets(site, s) {
                let tls = self.upstream_tls(&target);
                let endpoints: Vec<Arc<crate::endpoint::Endpoint>> = target
                    .endpoints
                    .iter()
                    .map(|addr| {
                        let key = (name.clone(), tname.clone(), addr.clone());
                        used_endpoints.insert(key.clone());
                        self.endpoint(key, &health, &tls)
                    })
                    .collect();
                let tkey = (name.clone(), tname.clone());
                let drain = self.drains.entry(tkey.clone()).or_default().clone();
                used_targets.insert(tkey);
                self.metrics.live_target.with_label_values(&[name, &tname]).set(i64::from(tname == s.live));
                pools.push(Arc::new(TargetPool {
                    metrics: self.metrics.target(name, &tname),
                    name: tname,
                    version: target.version.clone(),
                    endpoints,
                    read_only: target.read_only,
                    protocol: target.protocol,
                    drain,
                }));
            }
            let Some(live) = pools.iter().find(|p| p.name == s.live).cloned() else {
                tracing::error!(site = %name, live = %s.live, "live target missing; site not routed");
                continue;
            };
            let canary = s.weights.as_ref().and_then(|w| Canary::new(w, &pools));
            for p in &pools {
                let weight = match &s.weights {
                    Some(w) => w.get(&p.name).copied().unwrap_or(0),
                    None if p.name == s.live => 100,
                    None => 0,
                };
                self.metrics.target_weight.with_label_values(&[name, &p.name]).set(i64::from(weight));
            }
            self.metrics.site_mode.with_label_values(&[name, "read_only"]).set(i64::from(s.mode.read_only));
            self.metrics.site_mode.with_label_values(&[name, "maintenance"]).set(i64::from(s.mode.maintenance));
            self.metrics.seed_site(name);
            let pause = self.pause_gate(name);
            // A pause in the state (after a restart) holds requests from the start.
            if let (Some(timeout), false) = (s.mode.paused, pause.is_paused()) {
                pause.pause(timeout);
            }
            self.metrics.site_mode.with_label_values(&[name, "paused"]).set(i64::from(pause.is_paused()));
            routes.push(Arc::new(SiteRoute {
                config: site.clone(),
                live,
                targets: pools,
                read_only: s.mode.read_only,
                maintenance: s.mode.maintenance,
                maintenance_page: maintenance_page(site),
                canary,
                pause,
            }));
        }
        let metrics = &self.metrics;
        self.endpoints.retain(|key, entry| {
            let keep = used_endpoints.contains(key);
            if !keep {
                entry.probe.cancel();
                let _ = metrics.endpoint_healthy.remove_label_values(&[&key.0, &key.1, &key.2]);
            }
            keep
        });
        // A site removed by a reload: its pause ends (what it held is
        // released, to find no site), and its series go.
        self.pauses.retain(|site, gate| {
            let keep = sites_seen.contains(site);
            if !keep {
                gate.resume(std::time::Duration::ZERO);
                metrics.forget_site(site);
            }
            keep
        });
        self.drains.retain(|key, token| {
            let keep = used_targets.contains(key);
            if !keep {
                // A target removed by a reload: what still runs on it closes now.
                token.cancel();
                metrics.forget_target(&key.0, &key.1);
            }
            keep
        });
        RoutingTable::new(routes, settings)
    }

    /// The endpoint for `key`, created (and probed) when new; its probe is
    /// restarted when the site's health settings changed.
    fn endpoint(
        &mut self,
        key: EndpointKey,
        health: &Arc<HealthConfig>,
        tls: &Option<Arc<UpstreamTls>>,
    ) -> Arc<Endpoint> {
        if let Some(entry) = self.endpoints.get_mut(&key) {
            entry.endpoint.tls.store(tls.clone());
            if *entry.health != **health {
                entry.probe.cancel();
                entry.probe = self.shutdown.child_token();
                entry.health = health.clone();
                tokio::spawn(health::run(entry.endpoint.clone(), health.clone(), entry.probe.clone()));
            }
            return entry.endpoint.clone();
        }
        let gauge = self.metrics.endpoint_healthy.with_label_values(&[&key.0, &key.1, &key.2]);
        let endpoint = Arc::new(Endpoint::new(key.2.clone(), gauge, Pool::new(POOL_MAX_IDLE, POOL_IDLE_TIMEOUT)));
        // Before its first probe: a TLS endpoint must never be probed in plain text.
        endpoint.tls.store(tls.clone());
        let probe = self.shutdown.child_token();
        tokio::spawn(health::run(endpoint.clone(), health.clone(), probe.clone()));
        self.endpoints.insert(key, EndpointEntry { endpoint: endpoint.clone(), probe, health: health.clone() });
        endpoint
    }
}

/// The built-in maintenance page.
const MAINTENANCE_PAGE: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\n<body style=\"font-family:system-ui,sans-serif;text-align:center;padding-top:20vh\">\n<h1>Down for maintenance</h1><p>We will be back shortly. Please try again in a few minutes.</p>\n</body></html>\n";

/// The site's maintenance page: its configured file, or the built-in page
/// when none is set or the file cannot be read (logged).
fn maintenance_page(site: &Site) -> bytes::Bytes {
    match &site.maintenance_page {
        Some(path) => match std::fs::read(path) {
            Ok(page) => page.into(),
            Err(e) => {
                tracing::warn!(site = %site.name, file = %path.display(), error = %e, "maintenance page unreadable; using the built-in page");
                bytes::Bytes::from_static(MAINTENANCE_PAGE.as_bytes())
            }
        },
        None => bytes::Bytes::from_static(MAINTENANCE_PAGE.as_bytes()),
    }
}
