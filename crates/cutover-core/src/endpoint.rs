//! One upstream endpoint: its address, health, load and connection pool.
//!
//! An `Endpoint` outlives routing snapshots: the controller keeps one per
//! (site, target, address) and hands the same `Arc` to every snapshot, so
//! outstanding counts and health survive a rebuild.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI8, AtomicUsize, Ordering};
use std::sync::Mutex;

use cutover_metrics::IntGauge;

use crate::upstream::{Pool, UpstreamTls};

/// Health of an endpoint as last decided by its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet (`healthy: null`).
    Unknown,
    /// Passing its checks.
    Healthy,
    /// Failing its checks, or taken out by a failed connection or exchange.
    Unhealthy,
}

impl Health {
    fn to_i8(self) -> i8 {
        match self {
            Health::Unknown => -1,
            Health::Unhealthy => 0,
            Health::Healthy => 1,
        }
    }

    fn from_i8(v: i8) -> Self {
        match v {
            1 => Health::Healthy,
            0 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// `Some(true)`, `Some(false)` or `None` (unknown), as the API shows it.
    pub fn as_option(self) -> Option<bool> {
        match self {
            Health::Unknown => None,
            Health::Healthy => Some(true),
            Health::Unhealthy => Some(false),
        }
    }
}

/// One `host:port` of a target.
#[derive(Debug)]
pub struct Endpoint {
    /// The address as configured, e.g. `127.0.0.1:3001` or `app:8080`.
    pub address: String,
    /// The address pre-parsed when it is a literal IP and port.
    pub socket_addr: Option<SocketAddr>,
    health: AtomicI8,
    /// Requests sent to this endpoint and not yet finished.
    pub outstanding: AtomicUsize,
    reported_version: Mutex<Option<String>>,
    healthy_gauge: IntGauge,
    /// Idle keep-alive connections to this endpoint.
    pub pool: Pool,
    /// TLS to this endpoint, when its target says `tls: true`.
    pub tls: arc_swap::ArcSwapOption<UpstreamTls>,
    /// Bumped by [`Endpoint::forget_health`]: a probe begun before is not counted.
    checks_generation: std::sync::atomic::AtomicU64,
}

impl Endpoint {
    /// A new endpoint, health unknown, with an empty pool.
    pub fn new(address: String, healthy_gauge: IntGauge, pool: Pool) -> Self {
        healthy_gauge.set(-1);
        Self {
            socket_addr: address.parse().ok(),
            address,
            health: AtomicI8::new(Health::Unknown.to_i8()),
            outstanding: AtomicUsize::new(0),
            reported_version: Mutex::new(None),
            healthy_gauge,
            pool,
            tls: arc_swap::ArcSwapOption::empty(),
            checks_generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health::from_i8(self.health.load(Ordering::Relaxed))
    }

    /// Sets the health (from a probe or from the data plane).
    pub fn set_health(&self, h: Health) {
        let prev = self.health.swap(h.to_i8(), Ordering::Relaxed);
        self.healthy_gauge.set(h.to_i8() as i64);
        if prev != h.to_i8() {
            tracing::info!(endpoint = %self.address, health = ?h, "endpoint health changed");
        }
    }

    /// Takes the endpoint out of rotation after a failed connection or exchange
    /// (passive health), until its active check passes again.
    pub fn mark_failed(&self) {
        if self.health() != Health::Unhealthy {
            self.set_health(Health::Unhealthy);
        }
    }

    /// Forgets what the checks learned (health, reported version): the
    /// endpoint was given to its target anew, maybe a new release at the
    /// same address.
    pub fn forget_health(&self) {
        self.checks_generation.fetch_add(1, Ordering::Relaxed);
        self.set_health(Health::Unknown);
        self.set_reported_version(None);
    }

    /// Which round of checks results now belong to (see [`Endpoint::forget_health`]).
    pub fn checks_generation(&self) -> u64 {
        self.checks_generation.load(Ordering::Relaxed)
    }

    /// The version the endpoint last reported through `health.version_header`.
    pub fn reported_version(&self) -> Option<String> {
        self.reported_version.lock().map(|v| v.clone()).unwrap_or(None)
    }

    /// Records the version the endpoint reports.
    pub fn set_reported_version(&self, v: Option<String>) {
        if let Ok(mut slot) = self.reported_version.lock() {
            *slot = v;
        }
    }
}
