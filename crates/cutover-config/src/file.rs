//! The configuration file exactly as written: raw serde structs.
//!
//! Every struct denies unknown keys. Values that need checking against other
//! fields (addresses, endpoints, targets) stay strings here and are checked in
//! `validate`, so that every error can be reported with its path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// `listen:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListen {
    pub http: Option<String>,
    pub https: Option<String>,
}

/// `tls:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub certificates: Vec<FileCertificate>,
}

/// One entry of `tls.certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertificate {
    pub cert: String,
    pub key: String,
}

/// `admin:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: Option<String>,
    pub token_env: Option<String>,
    pub token_file: Option<String>,
}

/// `state:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileState {
    pub path: Option<String>,
}

/// `limits:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub upstream_connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub upstream_response_timeout: Option<Duration>,
}

/// One entry of `sites:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSite {
    pub name: String,
    pub hosts: Vec<String>,
    pub live: String,
    pub targets: BTreeMap<String, FileTarget>,
    pub health: Option<FileHealth>,
    pub switch: Option<FileSwitch>,
    pub read_only: Option<FileReadOnly>,
    pub maintenance: Option<FileMaintenance>,
    pub pause: Option<FilePause>,
    pub redirect_https: Option<bool>,
    pub preview: Option<FilePreview>,
    pub canary: Option<FileCanary>,
}

/// One entry of `sites[].targets`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTarget {
    pub endpoints: Vec<String>,
    pub version: Option<String>,
    pub read_only: Option<bool>,
    pub protocol: Option<String>,
    pub tls: Option<bool>,
    pub ca: Option<String>,
    pub server_name: Option<String>,
}

/// `sites[].health`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    pub path: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub expect_status: Option<serde_yaml::Value>,
    pub version_header: Option<String>,
    pub host: Option<String>,
}

/// `sites[].switch`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSwitch {
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub close_spread: Option<Duration>,
    pub require: Option<String>,
    #[serde(default)]
    pub smoke: Vec<FileSmoke>,
    pub watch: Option<FileWatch>,
}

/// One entry of `sites[].switch.smoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSmoke {
    pub path: String,
    pub expect_status: Option<serde_yaml::Value>,
    pub expect_body_contains: Option<String>,
}

/// `sites[].switch.watch`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWatch {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub max_error_rate: Option<f64>,
    pub min_requests: Option<u64>,
}

/// `sites[].read_only`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReadOnly {
    #[serde(default, with = "humantime_serde")]
    pub retry_after: Option<Duration>,
    #[serde(default)]
    pub allow_paths: Vec<String>,
}

/// `sites[].maintenance`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMaintenance {
    pub page: Option<String>,
}

/// `sites[].pause`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePause {
    pub max_held: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub resume_spread: Option<Duration>,
}

/// `sites[].preview`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePreview {
    pub header: Option<String>,
    pub token_env: Option<String>,
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
}

/// `sites[].canary`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCanary {
    pub cookie: Option<String>,
}
