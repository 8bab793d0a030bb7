//! The per-site history of admin actions (SPEC §4 `history`).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Entries kept per site; older ones are dropped.
pub const MAX_ENTRIES: usize = 500;

/// One recorded action, accepted or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Read only from the state file, where every other record refuses a field it does not know.
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    /// RFC 3339 time, UTC, milliseconds.
    pub at: String,
    /// `switch`, `rollback`, `automatic_rollback`, `set_target`, `mode`, `weights`, `pause`, `resume`.
    pub kind: String,
    /// Live target before (or the target concerned).
    pub from: Option<String>,
    /// Live target after (or the target concerned).
    pub to: Option<String>,
    /// `api`, `watch`, `deploy` or `reload`.
    pub actor: String,
    /// Why: the operator's words, or the reasons of a refusal.
    pub reason: Option<String>,
    /// `ok` or `refused`.
    pub result: String,
}

impl HistoryEntry {
    /// An entry stamped now.
    pub fn now(kind: &str, from: Option<&str>, to: Option<&str>, actor: &str, result: &str) -> Self {
        Self {
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind: kind.into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
            actor: actor.into(),
            reason: None,
            result: result.into(),
        }
    }

    /// The same entry with a reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// Appends `entry`, keeping at most [`MAX_ENTRIES`] (oldest dropped). Stored oldest first.
pub fn push(history: &mut Vec<HistoryEntry>, entry: HistoryEntry) {
    history.push(entry);
    if history.len() > MAX_ENTRIES {
        let excess = history.len() - MAX_ENTRIES;
        history.drain(..excess);
    }
}
