//! cutover's configuration file.
//!
//! [`file`] mirrors the YAML exactly (`deny_unknown_fields`); [`load`] and
//! [`parse`] turn it into the validated [`Config`] of [`model`], running every
//! cross-field check and collecting **all** errors, each with its field path
//! and value. This crate is pure: it reads files, never opens a socket.

mod error;
pub mod file;
pub mod model;
pub mod tls;
mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use model::*;
pub use validate::{load, parse, validate_endpoint, validate_site_name};
