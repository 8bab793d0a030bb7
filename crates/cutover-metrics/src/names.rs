//! Metric names, in one place (SPEC §6).

pub const REQUESTS: &str = "cutover_requests_total";
pub const REQUEST_DURATION: &str = "cutover_request_duration_seconds";
pub const UPSTREAM_ERRORS: &str = "cutover_upstream_errors_total";
pub const INFLIGHT: &str = "cutover_inflight_requests";
pub const LIVE_TARGET: &str = "cutover_live_target";
pub const TARGET_WEIGHT: &str = "cutover_target_weight";
pub const ENDPOINT_HEALTHY: &str = "cutover_endpoint_healthy";
pub const SWITCHES: &str = "cutover_switches_total";
pub const ROLLBACKS: &str = "cutover_rollbacks_total";
pub const SITE_MODE: &str = "cutover_site_mode";
pub const CLIENT_CONNECTIONS: &str = "cutover_client_connections";
pub const CLIENT_CONNECTIONS_REFUSED: &str = "cutover_client_connections_refused_total";
pub const CONFIG_RELOADS: &str = "cutover_config_reloads_total";
pub const DRAIN_FORCED_CLOSES: &str = "cutover_drain_forced_closes_total";
pub const HELD_REQUESTS: &str = "cutover_held_requests";
pub const DEPLOYMENTS: &str = "cutover_deployments_total";
