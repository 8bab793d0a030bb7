//! The validated configuration: every value checked, every default applied.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// A whole, valid configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the data plane listens.
    pub listen: Listen,
    /// Certificates for `listen.https` (empty without it).
    pub tls: Vec<Certificate>,
    /// The admin API.
    pub admin: Admin,
    /// Where runtime state is kept (SPEC §5).
    pub state_path: PathBuf,
    /// Timeouts and sizes of the data plane.
    pub limits: Limits,
    /// How long in-flight work may run after SIGTERM.
    pub shutdown_timeout: Duration,
    /// Peers whose `X-Forwarded-*` headers are trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// The sites, in file order.
    pub sites: Vec<Site>,
}

/// `listen:` — the data-plane listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Plain HTTP/1.1 and h2c.
    pub http: SocketAddr,
    /// TLS, when configured.
    pub https: Option<SocketAddr>,
}

/// One TLS certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `admin:` — the admin API listener and its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Admin listener address.
    pub listen: SocketAddr,
    /// Bearer token every `/v1/` call must carry, when set.
    pub token: Option<String>,
}

/// `limits:` — data-plane limits, with the SPEC's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total time a client has to send a request head.
    pub header_read_timeout: Duration,
    /// How long an idle client connection is kept.
    pub idle_timeout: Duration,
    /// Largest request head accepted (larger → 431).
    pub max_header_bytes: usize,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Time to open a connection to an upstream.
    pub upstream_connect_timeout: Duration,
    /// Time for an upstream to answer with a response head.
    pub upstream_response_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 65536,
            max_connections: 10_000,
            upstream_connect_timeout: Duration::from_secs(3),
            upstream_response_timeout: Duration::from_secs(60),
        }
    }
}

/// One site: a set of host names and its targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// `[a-z0-9-]+`, unique.
    pub name: String,
    /// Lower-cased host names; `*` makes this the default site.
    pub hosts: Vec<String>,
    /// Live target when the state file has no entry for this site.
    pub live: String,
    /// Targets by name.
    pub targets: BTreeMap<String, Target>,
    /// Active health checks of every endpoint.
    pub health: Health,
    /// How switches are gated and drained.
    pub switch: Switch,
    /// Read-only mode settings.
    pub read_only: ReadOnly,
    /// Maintenance page file, if any.
    pub maintenance_page: Option<PathBuf>,
    /// Pause settings.
    pub pause: Pause,
    /// Redirect plain HTTP to HTTPS.
    pub redirect_https: bool,
    /// Preview routing.
    pub preview: Preview,
    /// Name of the sticky canary cookie.
    pub canary_cookie: String,
}

/// The protocol spoken to a target's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http1,
    /// HTTP/2 (gRPC upstreams).
    H2,
}

/// One target: a pool of endpoints running one release.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Target {
    /// `host:port` addresses.
    pub endpoints: Vec<String>,
    /// The version the operator declares.
    pub version: Option<String>,
    /// Always read-only while it serves (a clone).
    pub read_only: bool,
    /// Protocol to the endpoints.
    pub protocol: Protocol,
    /// Speak TLS to the endpoints.
    pub tls: bool,
    /// CA file for upstream TLS.
    pub ca: Option<PathBuf>,
    /// SNI name for upstream TLS.
    pub server_name: Option<String>,
}

/// `health:` — active health checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Path probed on each endpoint; `None` means a TCP connect check only.
    pub path: Option<String>,
    /// Time between probes.
    pub interval: Duration,
    /// Time one probe may take.
    pub timeout: Duration,
    /// Consecutive successes to become healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Status codes that count as success.
    pub expect_status: StatusRanges,
    /// Response header that carries the version the endpoint runs.
    pub version_header: Option<String>,
    /// Host header sent with probes.
    pub host: Option<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            path: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expect_status: StatusRanges::default(),
            version_header: None,
            host: None,
        }
    }
}

/// A set of accepted status codes, e.g. `200-399` or `200,204`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRanges(pub Vec<RangeInclusive<u16>>);

impl StatusRanges {
    /// Whether `status` is accepted.
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|r| r.contains(&status))
    }
}

impl Default for StatusRanges {
    fn default() -> Self {
        Self(vec![200..=399])
    }
}

/// Which endpoints of a candidate must be healthy for a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Require {
    /// Every endpoint healthy.
    #[default]
    AllHealthy,
    /// At least one endpoint healthy.
    AnyHealthy,
}

/// `switch:` — gates and drain.
#[derive(Debug, Clone, PartialEq)]
pub struct Switch {
    /// How long the old target may finish its work.
    pub drain_timeout: Duration,
    /// Window over which leftover upgraded connections are closed.
    pub close_spread: Duration,
    /// Health requirement for the candidate.
    pub require: Require,
    /// Requests sent to the candidate before it goes live.
    pub smoke: Vec<Smoke>,
    /// Post-switch watch, if any.
    pub watch: Option<Watch>,
}

impl Default for Switch {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            close_spread: Duration::from_secs(2),
            require: Require::AllHealthy,
            smoke: Vec::new(),
            watch: None,
        }
    }
}

/// One smoke check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smoke {
    /// Path requested.
    pub path: String,
    /// Accepted statuses.
    pub expect_status: StatusRanges,
    /// Text the body must contain.
    pub expect_body_contains: Option<String>,
}

/// Post-switch watch.
#[derive(Debug, Clone, PartialEq)]
pub struct Watch {
    /// How long after a switch.
    pub duration: Duration,
    /// Error share that triggers a rollback.
    pub max_error_rate: f64,
    /// Requests needed before the rate is judged.
    pub min_requests: u64,
}

/// `read_only:` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOnly {
    /// Sent as whole seconds in `Retry-After`.
    pub retry_after: Duration,
    /// Paths that pass anyway (exact, or prefix with a trailing `*`).
    pub allow_paths: Vec<String>,
}

impl Default for ReadOnly {
    fn default() -> Self {
        Self { retry_after: Duration::from_secs(30), allow_paths: Vec::new() }
    }
}

/// `pause:` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    /// Requests held at once; beyond it 503.
    pub max_held: usize,
    /// Window over which held requests are released.
    pub resume_spread: Duration,
}

impl Default for Pause {
    fn default() -> Self {
        Self { max_held: 10_000, resume_spread: Duration::from_millis(500) }
    }
}

/// `preview:` settings. Without a `preview:` section nothing is previewable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    /// A `preview:` section is present: the header routes requests.
    pub enabled: bool,
    /// Request header naming a target.
    pub header: String,
    /// Token a preview request must carry, when set.
    pub token: Option<String>,
    /// Extra host names routed to a named target.
    pub hosts: BTreeMap<String, String>,
}

impl Default for Preview {
    fn default() -> Self {
        Self { enabled: false, header: "x-cutover-target".into(), token: None, hosts: BTreeMap::new() }
    }
}
