//! cutover's data plane.
//!
//! - [`server`]: the accept loop and per-connection server (HTTP/1.1
//!   and h2c), connection limit, graceful shutdown.
//! - `h1_server`: cutover's own HTTP/1.1 server for `GET` and `HEAD` without
//!   a body; anything else goes on to hyper's (`handover`: there and back,
//!   one request at a time, each message's end told by `message_end`).
//! - [`forward`]: the life of one request: route through one snapshot, pick
//!   an endpoint, forward, retry a connection that could not be made.
//! - [`headers`]: hop-by-hop removal, `X-Forwarded-*`, `X-Request-Id`.
//! - [`body`]: the response body type, which carries the in-flight guard
//!   until the last byte is sent and returns the upstream connection to its pool.
//! - [`modes`]: preview, sticky canary, maintenance and read-only answers.
//! - `upgrade`: WebSocket and other upgrades as tunnels closed at the drain deadline.
//! - [`activity`]: per-connection idle tracking; `quiet`: the timer for
//!   "nothing moved for this long" (a client that reads nothing, an upstream
//!   silent mid-body).
//! - [`sniff`]: HTTP/1 or HTTP/2 prior knowledge, from a connection's first read.
//! - [`tls`]: TLS termination with SNI and hot certificate reload.
//!
//! The data plane only reads the routing snapshot; it never changes state.

pub mod activity;
pub mod body;
pub mod forward;
mod h1_server;
mod handover;
pub mod headers;
mod message_end;
pub mod modes;
mod quiet;
pub mod server;
pub mod sniff;
pub mod tls;
mod upgrade;

pub use forward::Proxy;
pub use server::{serve, ListenerConfig};
