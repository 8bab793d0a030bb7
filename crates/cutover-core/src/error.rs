//! Why a control-plane action was not carried out.

use serde_json::{json, Value};

/// A refused or failed admin action. A refusal changes nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    /// No such site or target (404).
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// `site` or `target`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// A bad value in the request (400).
    #[error("{field}: {message}")]
    Invalid {
        /// The request field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The action is refused in the current state (409).
    #[error("{message}")]
    Refused {
        /// Machine-readable code, e.g. `target_unhealthy`.
        code: &'static str,
        /// One line for people.
        message: String,
        /// Every failed check, e.g. `127.0.0.1:4001: unhealthy`.
        reasons: Vec<String>,
    },
    /// The decision could not be made durable (500); nothing was applied.
    #[error("state could not be saved: {0}")]
    Persist(String),
}

impl ControlError {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::NotFound { .. } => 404,
            ControlError::Invalid { .. } => 400,
            ControlError::Refused { .. } => 409,
            ControlError::Persist(_) => 500,
        }
    }

    /// Machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::NotFound { kind: "site", .. } => "site_not_found",
            ControlError::NotFound { kind: "deployment", .. } => "deployment_not_found",
            ControlError::NotFound { .. } => "target_not_found",
            ControlError::Invalid { .. } => "invalid_request",
            ControlError::Refused { code, .. } => code,
            ControlError::Persist(_) => "state_write_failed",
        }
    }

    /// `details` object of the error body.
    pub fn details(&self) -> Value {
        match self {
            ControlError::NotFound { kind, name } => json!({ "kind": kind, "name": name }),
            ControlError::Invalid { field, .. } => json!({ "field": field }),
            ControlError::Refused { reasons, .. } => json!({ "reasons": reasons }),
            ControlError::Persist(_) => json!({}),
        }
    }

    /// The whole JSON error body of SPEC §4.
    pub fn to_json(&self) -> Value {
        json!({ "error": { "code": self.code(), "message": self.to_string(), "details": self.details() } })
    }
}
