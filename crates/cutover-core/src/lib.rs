//! cutover's model and control plane.
//!
//! - [`routing`]: the immutable routing snapshot the data plane reads through
//!   one `ArcSwap` load per request.
//! - [`endpoint`] and [`upstream`]: one upstream address, its health atomics,
//!   its outstanding-request count and its keep-alive connection pool.
//! - [`controller`]: the only writer; applies switch, rollback and set-target
//!   one at a time per site (validate → gate → persist → publish → history).
//! - [`state`]: the durable state file; [`health`]: active probes.
//! - [`view`]: the JSON shapes the admin API answers with.
//! - [`hop_by_hop`]: the header fields that belong to one connection.
//!
//! No HTTP server lives here: the data plane is `cutover-proxy`, the admin API
//! `cutover-admin`.

pub mod controller;
pub mod deployment;
pub mod endpoint;
pub mod error;
pub mod health;
pub mod history;
pub mod hop_by_hop;
pub mod pause;
pub mod routing;
pub mod smoke;
pub mod state;
pub mod upstream;
pub mod view;

pub use controller::{Controller, SwitchRequest};

/// `now + d`, saturating far in the future instead of overflowing (a huge
/// timeout from a file or the API must never panic).
pub fn deadline_after(d: std::time::Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(d).unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 24 * 3600))
}
pub use endpoint::{Endpoint, Health};
pub use error::ControlError;
pub use routing::{RoutingTable, SiteRoute, TargetPool};
