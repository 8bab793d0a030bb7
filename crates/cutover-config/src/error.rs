//! Configuration errors: every one names the field path and the offending value.

use std::fmt;

/// One problem in a configuration, located by its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted field path, e.g. `sites[0].targets.green.endpoints[1]`.
    pub path: String,
    /// The offending value as written (empty when the field is missing).
    pub value: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error at `path` about `value`.
    pub fn new(path: impl Into<String>, value: impl fmt::Display, message: impl Into<String>) -> Self {
        Self { path: path.into(), value: value.to_string(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else if self.value.is_empty() {
            write!(f, "{}: {}", self.path, self.message)
        } else {
            write!(f, "{}: {} (value: {:?})", self.path, self.message, self.value)
        }
    }
}

/// Every error found in one configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    /// The file that was read, if any (shown as a prefix of every line).
    pub file: Option<String>,
    /// The errors, in the order they were found.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match &self.file {
                Some(file) => write!(f, "{file}: {e}")?,
                None => write!(f, "{e}")?,
            }
        }
        Ok(())
    }
}
