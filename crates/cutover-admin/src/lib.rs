//! cutover's admin HTTP API (SPEC §4) and `/metrics`.
//!
//! [`api`] turns HTTP requests into controller commands and answers with
//! JSON; [`server`] serves it on a bound listener until a shutdown future
//! resolves. The admin API never touches data-plane sockets.

pub mod api;
pub mod server;

pub use api::Admin;
pub use server::serve;
