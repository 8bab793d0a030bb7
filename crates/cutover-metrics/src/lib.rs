//! cutover's Prometheus metrics.
//!
//! One [`Metrics`] per running app owns its own `Registry` (never the global
//! one). Metric names live in [`names`]. The data plane never looks a label
//! up per request: [`TargetMetrics`] resolves every labelled handle of one
//! target once, when a routing snapshot is built.

pub mod names;

pub use prometheus::{IntCounter, IntGauge};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric family of one running cutover.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Of `requests`, those cutover answered itself, by `site`, `target` and
    /// `5xx`/`all`: not exported, kept here so they outlive routing snapshots.
    own_answers: IntCounterVec,
    /// `cutover_requests_total{site,target,code}`
    pub requests: IntCounterVec,
    /// `cutover_request_duration_seconds{site,target}`
    pub request_duration: HistogramVec,
    /// `cutover_upstream_errors_total{site,target,kind}`
    pub upstream_errors: IntCounterVec,
    /// `cutover_inflight_requests{site,target}`
    pub inflight: IntGaugeVec,
    /// `cutover_live_target{site,target}`
    pub live_target: IntGaugeVec,
    /// `cutover_target_weight{site,target}`
    pub target_weight: IntGaugeVec,
    /// `cutover_endpoint_healthy{site,target,endpoint}`
    pub endpoint_healthy: IntGaugeVec,
    /// `cutover_switches_total{site,result}`
    pub switches: IntCounterVec,
    /// `cutover_rollbacks_total{site,reason}`
    pub rollbacks: IntCounterVec,
    /// `cutover_site_mode{site,mode}`
    pub site_mode: IntGaugeVec,
    /// `cutover_client_connections{listener}`
    pub client_connections: IntGaugeVec,
    /// `cutover_client_connections_refused_total{listener}` (beyond `max_connections`)
    pub client_connections_refused: IntCounterVec,
    /// `cutover_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `cutover_drain_forced_closes_total{site,target,kind}`
    pub drain_forced_closes: IntCounterVec,
    /// `cutover_held_requests{site}`
    pub held_requests: IntGaugeVec,
    /// `cutover_deployments_total{site,state}`
    pub deployments: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl Metrics {
    /// Creates and registers every metric on a fresh registry.
    pub fn new() -> Self {
        use names::*;
        let r = Registry::new();
        let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let request_duration = HistogramVec::new(
            HistogramOpts::new(REQUEST_DURATION, "Time from request head to the end of the response body.")
                .buckets(buckets),
            &["site", "target"],
        )
        .expect("valid metric definition");
        r.register(Box::new(request_duration.clone())).expect("metric registered once");
        let m = Self {
            requests: counter(&r, REQUESTS, "Requests answered, by status class.", &["site", "target", "code"]),
            request_duration,
            upstream_errors: counter(&r, UPSTREAM_ERRORS, "Upstream failures.", &["site", "target", "kind"]),
            inflight: gauge(&r, INFLIGHT, "Requests in flight.", &["site", "target"]),
            live_target: gauge(&r, LIVE_TARGET, "1 for the live target of a site.", &["site", "target"]),
            target_weight: gauge(&r, TARGET_WEIGHT, "Canary weight of a target, in percent.", &["site", "target"]),
            endpoint_healthy: gauge(
                &r,
                ENDPOINT_HEALTHY,
                "1 healthy, 0 unhealthy, -1 not checked yet.",
                &["site", "target", "endpoint"],
            ),
            switches: counter(&r, SWITCHES, "Switch attempts.", &["site", "result"]),
            rollbacks: counter(&r, ROLLBACKS, "Rollbacks.", &["site", "reason"]),
            site_mode: gauge(&r, SITE_MODE, "1 when the mode is on.", &["site", "mode"]),
            client_connections: gauge(&r, CLIENT_CONNECTIONS, "Open client connections.", &["listener"]),
            client_connections_refused: counter(
                &r,
                CLIENT_CONNECTIONS_REFUSED,
                "Client connections closed at once, beyond limits.max_connections.",
                &["listener"],
            ),
            config_reloads: counter(&r, CONFIG_RELOADS, "Configuration reloads.", &["result"]),
            drain_forced_closes: counter(
                &r,
                DRAIN_FORCED_CLOSES,
                "Connections closed at a drain deadline.",
                &["site", "target", "kind"],
            ),
            held_requests: gauge(&r, HELD_REQUESTS, "Requests held by a pause.", &["site"]),
            deployments: counter(&r, DEPLOYMENTS, "Deployments finished, by final state.", &["site", "state"]),
            own_answers: IntCounterVec::new(
                Opts::new("own_answers", "Requests cutover answered itself."),
                &["site", "target", "class"],
            )
            .expect("valid metric definition"),
            registry: r,
        };
        for result in ["ok", "error"] {
            m.config_reloads.with_label_values(&[result]);
        }
        m
    }

    /// Renders every metric in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Makes `site`'s counters exist at zero, so that every metric family
    /// shows from the start, not only after its first event.
    pub fn seed_site(&self, site: &str) {
        for result in SWITCH_RESULTS {
            self.switches.with_label_values(&[site, result]);
        }
        for reason in ROLLBACK_REASONS {
            self.rollbacks.with_label_values(&[site, reason]);
        }
        for state in DEPLOYMENT_STATES {
            self.deployments.with_label_values(&[site, state]);
        }
        self.held_requests.with_label_values(&[site]);
    }

    /// Resolves every per-target handle of `site`/`target` once.
    pub fn target(&self, site: &str, target: &str) -> TargetMetrics {
        let err = |k: &str| self.upstream_errors.with_label_values(&[site, target, k]);
        TargetMetrics {
            by_class: STATUS_CLASSES.map(|c| self.requests.with_label_values(&[site, target, c])),
            duration: self.request_duration.with_label_values(&[site, target]),
            inflight: self.inflight.with_label_values(&[site, target]),
            connect_errors: err("connect"),
            timeout_errors: err("timeout"),
            reset_errors: err("reset"),
            forced_upgrade_closes: self.drain_forced_closes.with_label_values(&[site, target, "upgrade"]),
            forced_stream_closes: self.drain_forced_closes.with_label_values(&[site, target, "stream"]),
            own: ["5xx", "all"].map(|class| self.own_answers.with_label_values(&[site, target, class])),
        }
    }

    /// Removes every series labelled with `site` and `target` (a target deleted for good).
    pub fn forget_target(&self, site: &str, target: &str) {
        for class in ["5xx", "all"] {
            let _ = self.own_answers.remove_label_values(&[site, target, class]);
        }
        let _ = self.inflight.remove_label_values(&[site, target]);
        let _ = self.live_target.remove_label_values(&[site, target]);
        let _ = self.target_weight.remove_label_values(&[site, target]);
        let _ = self.request_duration.remove_label_values(&[site, target]);
        for class in STATUS_CLASSES {
            let _ = self.requests.remove_label_values(&[site, target, class]);
        }
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = self.upstream_errors.remove_label_values(&[site, target, kind]);
        }
        for kind in FORCED_CLOSE_KINDS {
            let _ = self.drain_forced_closes.remove_label_values(&[site, target, kind]);
        }
    }

    /// Removes the site-level series of `site` (a site deleted by a reload);
    /// its targets go with [`Metrics::forget_target`].
    pub fn forget_site(&self, site: &str) {
        for result in SWITCH_RESULTS {
            let _ = self.switches.remove_label_values(&[site, result]);
        }
        for reason in ROLLBACK_REASONS {
            let _ = self.rollbacks.remove_label_values(&[site, reason]);
        }
        for state in DEPLOYMENT_STATES {
            let _ = self.deployments.remove_label_values(&[site, state]);
        }
        for mode in SITE_MODES {
            let _ = self.site_mode.remove_label_values(&[site, mode]);
        }
        let _ = self.held_requests.remove_label_values(&[site]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The label values each labelled family takes (SPEC §6), so that series
/// are made and removed alike.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const UPSTREAM_ERROR_KINDS: [&str; 3] = ["connect", "timeout", "reset"];
const FORCED_CLOSE_KINDS: [&str; 2] = ["upgrade", "stream"];
const SWITCH_RESULTS: [&str; 2] = ["ok", "refused"];
const ROLLBACK_REASONS: [&str; 2] = ["manual", "automatic"];
const DEPLOYMENT_STATES: [&str; 3] = ["succeeded", "failed", "rolled_back"];
const SITE_MODES: [&str; 3] = ["read_only", "maintenance", "paused"];

/// Per-target handles the data plane uses without any label lookup.
#[derive(Clone, Debug)]
pub struct TargetMetrics {
    by_class: [IntCounter; 5],
    duration: Histogram,
    /// In-flight requests of this target (also the drain counter).
    pub inflight: IntGauge,
    connect_errors: IntCounter,
    timeout_errors: IntCounter,
    reset_errors: IntCounter,
    /// Upgraded connections closed at a drain deadline.
    pub forced_upgrade_closes: IntCounter,
    /// Streaming responses cut at a drain deadline.
    pub forced_stream_closes: IntCounter,
    /// Of the requests counted, those cutover answered itself (a site mode,
    /// a redirect, a preview refusal): 5xx ones and all. Not the target's
    /// doing, so [`TargetMetrics::totals`] leaves them out.
    own: [IntCounter; 2],
}

/// What went wrong talking to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The connection could not be made.
    Connect,
    /// The upstream did not answer in time.
    Timeout,
    /// The connection broke mid-exchange.
    Reset,
}

impl TargetMetrics {
    /// Counts one answered request of `status` that took `seconds`.
    pub fn observe(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    /// Counts one upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        match kind {
            UpstreamErrorKind::Connect => self.connect_errors.inc(),
            UpstreamErrorKind::Timeout => self.timeout_errors.inc(),
            UpstreamErrorKind::Reset => self.reset_errors.inc(),
        }
    }

    /// Counts one request cutover answered itself with `status` (a site
    /// mode, a redirect, a preview refusal): in `cutover_requests_total`, but
    /// not in [`TargetMetrics::totals`], since the target had no part in it.
    pub fn observe_own(&self, status: u16, seconds: f64) {
        // Its own counters first: [`TargetMetrics::totals`] reads them last,
        // so an answer counted meanwhile is never taken for the target's.
        if status >= 500 {
            self.own[0].inc();
        }
        self.own[1].inc();
        self.observe(status, seconds);
    }

    /// Requests the target answered so far with a 5xx status, and in all
    /// (those cutover answered itself left out). Never more than the
    /// target's own; while an answer of cutover's is being counted, maybe
    /// one less for a moment.
    pub fn totals(&self) -> (u64, u64) {
        let all: u64 = self.by_class.iter().map(IntCounter::get).sum();
        let errors = self.by_class[4].get();
        let (own_errors, own_all) = (self.own[0].get(), self.own[1].get());
        (errors.saturating_sub(own_errors), all.saturating_sub(own_all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_handles_feed_the_labelled_series() {
        let m = Metrics::new();
        let t = m.target("shop", "blue");
        t.observe(200, 0.01);
        t.observe(503, 0.02);
        t.upstream_error(UpstreamErrorKind::Connect);
        t.inflight.inc();
        let text = m.encode();
        assert!(text.contains(r#"cutover_requests_total{code="2xx",site="shop",target="blue"} 1"#), "{text}");
        assert!(text.contains(r#"cutover_requests_total{code="5xx",site="shop",target="blue"} 1"#));
        assert!(text.contains(r#"cutover_upstream_errors_total{kind="connect",site="shop",target="blue"} 1"#));
        assert!(text.contains(r#"cutover_inflight_requests{site="shop",target="blue"} 1"#));
        assert_eq!(t.totals(), (1, 2));
        // An answer cutover gave itself is exported, but is not the target's.
        t.observe_own(503, 0.0);
        assert!(m.encode().contains(r#"cutover_requests_total{code="5xx",site="shop",target="blue"} 2"#));
        assert_eq!(m.target("shop", "blue").totals(), (1, 2), "kept across snapshots");
    }

    #[test]
    fn two_resolutions_share_one_series() {
        let m = Metrics::new();
        m.target("s", "t").inflight.inc();
        assert_eq!(m.target("s", "t").inflight.get(), 1);
    }
}
