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
//!
//! No HTTP server lives here: the data plane is `cutover-proxy`, the admin API
//! `cutover-admin`.

pub mod controller;
pub mod endpoint;
pub mod error;
pub mod health;
pub mod history;
pub mod pause;
pub mod routing;
pub mod smoke;
pub mod state;
pub mod upstream;
pub mod view;

pub use controller::{Controller, SwitchRequest};
pub use endpoint::{Endpoint, Health};
pub use error::ControlError;
pub use routing::{RoutingTable, SiteRoute, TargetPool};
