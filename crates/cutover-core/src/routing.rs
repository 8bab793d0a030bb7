//! The routing snapshot: everything the data plane needs to route one
//! request, immutable, published with one `ArcSwap::store`.
//!
//! A request does one `load()`, finds its site by host, and clones out the
//! `Arc<TargetPool>` it will use, so a switch while it runs cannot change
//! where it goes or how it is counted.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cutover_config::{Config, Protocol, Site};
use cutover_metrics::TargetMetrics;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{Endpoint, Health};
use crate::pause::PauseGate;

/// Data-plane settings that a reload may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Peers whose forwarded headers are trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// Time to open an upstream connection.
    pub connect_timeout: Duration,
    /// Time for an upstream to answer with a response head.
    pub response_timeout: Duration,
    /// Port of the HTTPS listener, for `redirect_https`.
    pub https_port: Option<u16>,
}

impl Settings {
    /// The data-plane settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            trusted_proxies: config.trusted_proxies.clone(),
            connect_timeout: config.limits.upstream_connect_timeout,
            response_timeout: config.limits.upstream_response_timeout,
            https_port: config.listen.https.map(|a| a.port()),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        let limits = cutover_config::Limits::default();
        Self {
            trusted_proxies: Vec::new(),
            connect_timeout: limits.upstream_connect_timeout,
            response_timeout: limits.upstream_response_timeout,
            https_port: None,
        }
    }
}

/// The whole routing state of the process at one instant.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// Sites in configuration order.
    pub sites: Vec<Arc<SiteRoute>>,
    /// Data-plane settings.
    pub settings: Settings,
    /// Lower-cased host name → index into `sites`, and the target a preview host names.
    hosts: HashMap<Box<str>, (usize, Option<Box<str>>)>,
    /// The site whose hosts include `*`.
    default_site: Option<usize>,
}

impl RoutingTable {
    /// Builds the host index over `sites`.
    pub fn new(sites: Vec<Arc<SiteRoute>>, settings: Settings) -> Self {
        let mut hosts = HashMap::new();
        let mut default_site = None;
        for (i, site) in sites.iter().enumerate() {
            for h in &site.config.hosts {
                if h == "*" {
                    default_site = Some(i);
                } else {
                    hosts.insert(h.as_str().into(), (i, None));
                }
            }
            for (h, target) in &site.config.preview.hosts {
                hosts.insert(h.as_str().into(), (i, Some(target.as_str().into())));
            }
        }
        Self { sites, settings, hosts, default_site }
    }

    /// The site serving `host` (port already stripped; any case; a trailing
    /// dot ignored), or the `*` site, with the target named when `host` is one
    /// of its preview hosts.
    pub fn site_for_host(&self, host: &str) -> Option<(&Arc<SiteRoute>, Option<&str>)> {
        // `shop.example.com.` (fully qualified) is `shop.example.com`.
        let host = host.strip_suffix('.').unwrap_or(host);
        let found = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(host.to_ascii_lowercase().as_str())
        } else {
            self.hosts.get(host)
        };
        match found {
            Some((i, preview)) => Some((&self.sites[*i], preview.as_deref())),
            None => self.default_site.map(|i| (&self.sites[i], None)),
        }
    }

    /// Requests in flight on every target of every site.
    pub fn total_inflight(&self) -> i64 {
        self.sites.iter().flat_map(|s| &s.targets).map(|t| t.inflight()).sum()
    }

    /// The site named `name`.
    pub fn site(&self, name: &str) -> Option<&Arc<SiteRoute>> {
        self.sites.iter().find(|s| s.name() == name)
    }
}

/// One site as routed right now.
#[derive(Debug)]
pub struct SiteRoute {
    /// The site's configuration (hosts, modes' settings, health settings).
    pub config: Arc<Site>,
    /// The live target.
    pub live: Arc<TargetPool>,
    /// Every target, live included.
    pub targets: Vec<Arc<TargetPool>>,
    /// Writes refused (site mode).
    pub read_only: bool,
    /// Everything answered with the maintenance page.
    pub maintenance: bool,
    /// The maintenance page (the configured file, or the built-in page).
    pub maintenance_page: bytes::Bytes,
    /// Sticky canary split, when weights are set.
    pub canary: Option<Canary>,
    /// Holds requests while the site is paused (outlives snapshots).
    pub pause: Arc<PauseGate>,
}

/// A weighted split: each of 100 buckets maps to one target.
#[derive(Debug)]
pub struct Canary {
    /// Bucket (0–99) → target.
    pub buckets: Vec<Arc<TargetPool>>,
}

impl Canary {
    /// The split of `weights` (percent by target, summing to 100) over `targets`.
    pub fn new(weights: &std::collections::BTreeMap<String, u8>, targets: &[Arc<TargetPool>]) -> Option<Self> {
        let mut buckets = Vec::with_capacity(100);
        for (name, pct) in weights {
            let t = targets.iter().find(|t| &t.name == name)?;
            buckets.extend(std::iter::repeat_n(t.clone(), usize::from(*pct)));
        }
        (buckets.len() == 100).then_some(Self { buckets })
    }

    /// The target of `bucket` (0–99).
    pub fn target(&self, bucket: u8) -> &Arc<TargetPool> {
        &self.buckets[usize::from(bucket) % self.buckets.len()]
    }
}

impl SiteRoute {
    /// The site's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The target named `name`.
    pub fn target(&self, name: &str) -> Option<&Arc<TargetPool>> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Whether `path` is in `read_only.allow_paths` (exact, or a prefix with a
    /// trailing `*`). A path an upstream could resolve elsewhere (`.`/`..`
    /// segments, `;` parameters, encoded dots, slashes or `%`, backslashes)
    /// is never allowed.
    pub fn allowed_path(&self, path: &str) -> bool {
        if !is_plain_path(path) {
            return false;
        }
        self.config.read_only.allow_paths.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => path == p,
        })
    }
}

/// No dot segments, no backslash, no `;` path parameters (servlet containers
/// strip them before resolving `..`, so `/a/..;/b` is `/b` there), and none
/// of those encoded, nor an encoded `%` (an upstream that decodes twice).
/// Nor the encodings lenient decoders also read as ASCII: overlong UTF-8
/// (`%c0%ae` is `.` to old Tomcat and IIS; lead byte C0 or C1, or E0 80–9F,
/// or F0 80–8F) and IIS's `%uXXXX`. None of these is valid UTF-8 or a valid
/// percent-encoding, so no real path is lost (found by the `router` fuzz target).
fn is_plain_path(path: &str) -> bool {
    let lower_has =
        |needle: &str| path.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()));
    !path.contains(['\\', ';'])
        && !path.split('/').any(|seg| seg == "." || seg == "..")
        && !["%2e", "%2f", "%5c", "%3b", "%25", "%c0", "%c1", "%e0%8", "%e0%9", "%f0%8", "%u"]
            .into_iter()
            .any(lower_has)
}

impl TargetPool {
    /// Whether any endpoint is healthy now.
    pub fn has_healthy_endpoint(&self) -> bool {
        self.endpoints.iter().any(|e| e.health() == Health::Healthy)
    }
}

/// One target: its endpoints and its pre-resolved metric handles.
#[derive(Debug)]
pub struct TargetPool {
    /// Target name.
    pub name: String,
    /// Declared version.
    pub version: Option<String>,
    /// Endpoints, shared with every snapshot that has this target.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Read-only whenever it serves.
    pub read_only: bool,
    /// Protocol to the endpoints.
    pub protocol: Protocol,
    /// Metric handles for this site/target (the in-flight gauge is also the drain count).
    pub metrics: TargetMetrics,
    /// Cancelled at this target's drain deadline: open upgrades and streams
    /// started under this token close then. Replaced afresh after each deadline.
    pub drain: CancellationToken,
}

thread_local! {
    /// Turns taken among tied endpoints on this thread: requests one at a
    /// time (every endpoint at zero outstanding) go round the endpoints.
    static TURN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl TargetPool {
    /// Requests in flight on this target.
    pub fn inflight(&self) -> i64 {
        self.metrics.inflight.get()
    }

    /// Picks an endpoint by least outstanding requests among the healthy ones,
    /// skipping those in `exclude`; ties are taken in turn (per worker thread:
    /// no shared counter to contend on). When no endpoint is healthy, every
    /// one not excluded is a candidate (fail open).
    pub fn pick(&self, exclude: &[usize]) -> Option<usize> {
        if self.endpoints.len() == 1 {
            return (!exclude.contains(&0)).then_some(0);
        }
        let choose = |healthy_only: bool| {
            let eligible =
                |i: usize| !exclude.contains(&i) && (!healthy_only || self.endpoints[i].health() == Health::Healthy);
            let load = |i: usize| self.endpoints[i].outstanding.load(Ordering::Relaxed);
            let least = (0..self.endpoints.len()).filter(|&i| eligible(i)).map(load).min()?;
            let ties = (0..self.endpoints.len()).filter(|&i| eligible(i) && load(i) == least);
            match ties.clone().count() {
                1 => ties.clone().next(),
                count => ties.clone().nth(TURN.with(|t| t.replace(t.get().wrapping_add(1))) % count),
            }
        };
        choose(true).or_else(|| choose(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Pool;
    use cutover_metrics::Metrics;
    use std::time::Duration;

    fn pool(m: &Metrics, n: usize) -> TargetPool {
        let endpoints = (0..n)
            .map(|i| {
                let gauge = m.endpoint_healthy.with_label_values(&["s", "t", &i.to_string()]);
                Arc::new(Endpoint::new(format!("127.0.0.1:{}", 1000 + i), gauge, Pool::new(4, Duration::from_secs(1))))
            })
            .collect();
        TargetPool {
            name: "t".into(),
            version: None,
            endpoints,
            read_only: false,
            protocol: Protocol::Http1,
            metrics: m.target("s", "t"),
            drain: CancellationToken::new(),
        }
    }

    #[test]
    fn pick_prefers_healthy_with_fewest_outstanding() {
        let m = Metrics::new();
        let p = pool(&m, 3);
        p.endpoints[0].set_health(Health::Healthy);
        p.endpoints[1].set_health(Health::Healthy);
        p.endpoints[2].set_health(Health::Unhealthy);
        p.endpoints[0].outstanding.store(5, Ordering::Relaxed);
        assert_eq!(p.pick(&[]), Some(1));
        assert_eq!(p.pick(&[1]), Some(0));
        // Only the unhealthy one is left: fail open.
        assert_eq!(p.pick(&[0, 1]), Some(2));
        assert_eq!(p.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn ties_go_round_the_endpoints() {
        let m = Metrics::new();
        let p = pool(&m, 3);
        p.endpoints.iter().for_each(|e| e.set_health(Health::Healthy));
        let mut picks: Vec<_> = (0..6).filter_map(|_| p.pick(&[])).collect();
        picks.sort_unstable();
        assert_eq!(picks, [0, 0, 1, 1, 2, 2]);
        // An unhealthy endpoint's turns are shared out evenly, not all given to its neighbour.
        p.endpoints[1].set_health(Health::Unhealthy);
        let mut picks: Vec<_> = (0..6).filter_map(|_| p.pick(&[])).collect();
        picks.sort_unstable();
        assert_eq!(picks, [0, 0, 0, 2, 2, 2]);
        p.endpoints[1].set_health(Health::Healthy);
        // The one with fewer outstanding requests still wins over the turn.
        p.endpoints[0].outstanding.store(1, Ordering::Relaxed);
        p.endpoints[2].outstanding.store(1, Ordering::Relaxed);
        assert!((0..6).all(|_| p.pick(&[]) == Some(1)));
    }

    #[test]
    fn paths_an_upstream_could_resolve_elsewhere_are_not_plain() {
        for bad in [
            "/api/../orders",
            "/api/./x",
            "/api/%2e%2e/orders",
            "/a%2Fb",
            "/a\\b",
            "/..",
            "/a/%5C",
            "/api/..;/orders",
            "/api/.;/x",
            "/api/x;jsessionid=1",
            "/api/..%3B/orders",
            "/api/%252e%252e/orders",
            "/api/%c0%ae%c0%ae/orders",
            "/api/%C1%9Corders",
            "/api/%e0%80%ae%e0%80%ae/orders",
            "/api/%f0%80%80%ae./orders",
            "/api/%u002e%u002e/orders",
        ] {
            assert!(!is_plain_path(bad), "{bad}");
        }
        for good in
            ["/", "/api/search/q", "/a.b/c..d", "/.well-known/acme", "/caf%C3%A9", "/%E0%A4%85", "/%F0%9F%98%80"]
        {
            assert!(is_plain_path(good), "{good}");
        }
    }

    #[test]
    fn unknown_endpoints_are_tried_when_none_is_healthy() {
        let m = Metrics::new();
        let p = pool(&m, 2);
        p.endpoints[0].outstanding.store(1, Ordering::Relaxed);
        assert_eq!(p.pick(&[]), Some(1));
    }
}
