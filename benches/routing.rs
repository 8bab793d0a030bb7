//! Routing hot-path micro-benchmarks.
//!
//! Hypothesis: a route lookup is one `ArcSwap` load + one `HashMap` probe,
//! tens of ns, and stays flat while another thread publishes new snapshots.
//!
//! The table has 50 sites (49 with two named hosts each, one `*` default
//! site), two targets per site and two endpoints per target, built the way
//! the controller builds it: `Site`s from parsed YAML, one shared
//! `Arc<Endpoint>` per address, `TargetPool`s with pre-resolved metrics.
//!
//! Groups:
//! * `lookup/exact_host`      `site_for_host` with a lower-case known host.
//! * `lookup/uppercase_host`  the same host in mixed case (lower-cases a copy).
//! * `lookup/default_site`    an unknown host that falls back to the `*` site.
//! * `lookup/quiet`           what a request does: `load()` + `site_for_host` +
//!   clone of the live `Arc<TargetPool>` + `pick(&[])`, with no writer.
//! * `lookup/while_switching` the same while a background thread stores a new
//!   `Arc<RoutingTable>` (live target flipped) every ~100 µs.
//! * `pick/least_outstanding` `TargetPool::pick` over 4 healthy endpoints.
//!
//! No tokio runtime is needed: `Endpoint::new` spawns nothing.
//!
//! Run with `cargo bench --bench routing`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use cutover_config::Site;
use cutover_core::pause::PauseGate;
use cutover_core::routing::Settings;
use cutover_core::upstream::Pool;
use cutover_core::{Endpoint, Health, RoutingTable, SiteRoute, TargetPool};
use cutover_metrics::Metrics;
use tokio_util::sync::CancellationToken;

const SITES: usize = 50;
const EXACT_HOST: &str = "site-25.example.com";
const UPPER_HOST: &str = "Site-25.Example.COM";
const UNKNOWN_HOST: &str = "unknown.example.org";

/// A configuration with `SITES` sites; the last one is the `*` default site.
fn config_yaml() -> String {
    let mut y = String::from("listen:\n  http: 127.0.0.1:18090\nsites:\n");
    for i in 0..SITES {
        let hosts = if i == SITES - 1 {
            "[\"*\"]".to_string()
        } else {
            format!("[site-{i:02}.example.com, www.site-{i:02}.example.com]")
        };
        let port = 20000 + i * 10;
        let _ = write!(
            y,
            "  - name: site-{i:02}\n    hosts: {hosts}\n    live: blue\n    targets:\n      \
             blue: {{ endpoints: [127.0.0.1:{}, 127.0.0.1:{}], version: v1 }}\n      \
             green: {{ endpoints: [127.0.0.1:{}, 127.0.0.1:{}], version: v2 }}\n",
            port,
            port + 1,
            port + 2,
            port + 3
        );
    }
    y
}

/// Parsed sites, endpoints (shared across snapshots) and metrics.
struct Fixture {
    sites: Vec<Arc<Site>>,
    endpoints: HashMap<(String, String, String), Arc<Endpoint>>,
    metrics: Metrics,
}

impl Fixture {
    fn new() -> Self {
        let config = cutover_config::parse(&config_yaml(), Path::new(".")).expect("bench config is valid");
        assert_eq!(config.sites.len(), SITES);
        let metrics = Metrics::new();
        let mut endpoints = HashMap::new();
        for site in &config.sites {
            for (tname, target) in &site.targets {
                for addr in &target.endpoints {
                    let gauge = metrics.endpoint_healthy.with_label_values(&[&site.name, tname, addr]);
                    let e = Endpoint::new(addr.clone(), gauge, Pool::new(256, Duration::from_secs(30)));
                    e.set_health(Health::Healthy);
                    endpoints.insert((site.name.clone(), tname.clone(), addr.clone()), Arc::new(e));
                }
            }
        }
        Self { sites: config.sites.into_iter().map(Arc::new).collect(), endpoints, metrics }
    }

    /// Site routes with `live` as every site's live target, like `Controller::publish`.
    fn routes(&self, live: &str) -> Vec<Arc<SiteRoute>> {
        self.sites
            .iter()
            .map(|site| {
                let targets: Vec<Arc<TargetPool>> = site
                    .targets
                    .iter()
                    .map(|(tname, target)| {
                        Arc::new(TargetPool {
                            name: tname.clone(),
                            version: target.version.clone(),
                            endpoints: target
                                .endpoints
                                .iter()
                                .map(|a| self.endpoints[&(site.name.clone(), tname.clone(), a.clone())].clone())
                                .collect(),
                            read_only: target.read_only,
                            protocol: target.protocol,
                            metrics: self.metrics.target(&site.name, tname),
                            drain: CancellationToken::new(),
                        })
                    })
                    .collect();
                let live = targets.iter().find(|t| t.name == live).cloned().expect("live target exists");
                Arc::new(SiteRoute {
                    config: site.clone(),
                    live,
                    targets,
                    read_only: false,
                    maintenance: false,
                    maintenance_page: bytes::Bytes::new(),
                    canary: None,
                    pause: Arc::new(PauseGate::new(self.metrics.held_requests.with_label_values(&[&site.name]))),
                })
            })
            .collect()
    }
}

/// What the data plane does per request before it talks to an upstream.
#[inline]
fn route(swap: &ArcSwap<RoutingTable>, host: &str) -> Option<usize> {
    let table = swap.load();
    let (site, _) = table.site_for_host(host)?;
    let pool = site.live.clone();
    pool.pick(&[])
}

fn lookup(c: &mut Criterion) {
    let fx = Fixture::new();
    let table = RoutingTable::new(fx.routes("blue"), Settings::default());
    assert_eq!(table.site_for_host(EXACT_HOST).map(|(s, _)| s.name()), Some("site-25"));
    assert_eq!(table.site_for_host(UPPER_HOST).map(|(s, _)| s.name()), Some("site-25"));
    assert_eq!(table.site_for_host(UNKNOWN_HOST).map(|(s, _)| s.name()), Some("site-49"));

    let mut g = c.benchmark_group("lookup");
    g.bench_function("exact_host", |b| b.iter(|| black_box(&table).site_for_host(black_box(EXACT_HOST)).is_some()));
    g.bench_function("uppercase_host", |b| b.iter(|| black_box(&table).site_for_host(black_box(UPPER_HOST)).is_some()));
    g.bench_function("default_site", |b| b.iter(|| black_box(&table).site_for_host(black_box(UNKNOWN_HOST)).is_some()));

    let blue = fx.routes("blue");
    let green = fx.routes("green");
    let swap = Arc::new(ArcSwap::from_pointee(RoutingTable::new(blue.clone(), Settings::default())));
    g.bench_function("quiet", |b| b.iter(|| route(&swap, black_box(EXACT_HOST))));

    // A writer publishing a freshly built snapshot (live target flipped) every ~100 µs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let swap = swap.clone();
        let stop = stop.clone();
        thread::spawn(move || {
            let mut published = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sites = if published.is_multiple_of(2) { green.clone() } else { blue.clone() };
                swap.store(Arc::new(RoutingTable::new(sites, Settings::default())));
                published += 1;
                thread::sleep(Duration::from_micros(100));
            }
            published
        })
    };
    g.bench_function("while_switching", |b| b.iter(|| route(&swap, black_box(EXACT_HOST))));
    stop.store(true, Ordering::Relaxed);
    let published = writer.join().expect("writer thread");
    eprintln!("lookup/while_switching: the writer published {published} snapshots");
    g.finish();
}

fn pick(c: &mut Criterion) {
    let metrics = Metrics::new();
    let endpoints = (0..4)
        .map(|i| {
            let addr = format!("127.0.0.1:{}", 3001 + i);
            let gauge = metrics.endpoint_healthy.with_label_values(&["s", "t", &addr]);
            let e = Endpoint::new(addr, gauge, Pool::new(256, Duration::from_secs(30)));
            e.set_health(Health::Healthy);
            e.outstanding.store([3, 1, 4, 2][i], Ordering::Relaxed);
            Arc::new(e)
        })
        .collect();
    let pool = TargetPool {
        name: "t".into(),
        version: None,
        endpoints,
        read_only: false,
        protocol: cutover_config::Protocol::Http1,
        metrics: metrics.target("s", "t"),
        drain: CancellationToken::new(),
    };
    assert_eq!(pool.pick(&[]), Some(1));
    let mut g = c.benchmark_group("pick");
    g.bench_function("least_outstanding", |b| b.iter(|| black_box(&pool).pick(black_box(&[]))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = lookup, pick
}
criterion_main!(benches);
