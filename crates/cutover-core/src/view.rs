//! The JSON shapes of sites and targets that the admin API answers with.
//! Site objects have the same shape everywhere (SPEC §4).

use std::collections::BTreeMap;

use serde::Serialize;

/// A site as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SiteView {
    /// Site name.
    pub name: String,
    /// Host names.
    pub hosts: Vec<String>,
    /// The live target.
    pub live: String,
    /// The target live before (rollback goes there).
    pub previous: Option<String>,
    /// Modes.
    pub mode: ModeView,
    /// Canary weights, or null.
    pub weights: Option<BTreeMap<String, u8>>,
    /// Requests held by a pause right now.
    pub held: usize,
    /// Targets by name.
    pub targets: BTreeMap<String, TargetView>,
    /// The running post-switch watch, or null.
    pub watch: Option<serde_json::Value>,
}

/// Site modes.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ModeView {
    /// Writes refused.
    pub read_only: bool,
    /// Maintenance page served.
    pub maintenance: bool,
    /// Requests held.
    pub paused: bool,
}

/// A target as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TargetView {
    /// Declared version.
    pub version: Option<String>,
    /// `live`, `draining`, `standby` or `canary`.
    pub state: &'static str,
    /// Requests in flight.
    pub inflight: i64,
    /// Read-only whenever it serves.
    pub read_only: bool,
    /// Endpoints.
    pub endpoints: Vec<EndpointView>,
}

/// An endpoint as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EndpointView {
    /// `host:port`.
    pub address: String,
    /// `true`, `false`, or null before the first check.
    pub healthy: Option<bool>,
    /// Requests outstanding.
    pub inflight: usize,
    /// Version the endpoint reports, or null.
    pub version: Option<String>,
}
