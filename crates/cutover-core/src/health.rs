//! Active health checks: one task per endpoint, probing `health.path` (or,
//! without a path, making a TCP connection) every `interval`.
//!
//! An endpoint not checked yet (after a start, or given to a target anew) is
//! healthy after `healthy_threshold` passing probes in a row and unhealthy
//! after `unhealthy_threshold` failing ones, as any other. A passive failure
//! (the data plane could not connect) makes the endpoint unhealthy, and it
//! needs `healthy_threshold` passing probes to come back. A probe answered
//! without `health.version_header` clears the version the endpoint reported.
//! Probes never touch the data plane's pool.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cutover_config::Health as HealthConfig;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::endpoint::{Endpoint, Health};
use crate::upstream::{connect_stream, UpstreamTls};

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether the endpoint passed.
    pub ok: bool,
    /// Version header value, when configured and present.
    pub version: Option<String>,
    /// Whether an HTTP answer came (so `version` says what the endpoint reports now).
    pub answered: bool,
    /// Why it failed, for logs and refusal reasons.
    pub detail: String,
}

/// Probes `address` once according to `cfg` (over TLS when `tls` is given).
pub async fn probe(address: &str, tls: Option<&UpstreamTls>, cfg: &HealthConfig) -> ProbeResult {
    match tokio::time::timeout(cfg.timeout, probe_inner(address, tls, cfg)).await {
        Ok(r) => r,
        Err(_) => ProbeResult {
            ok: false,
            version: None,
            answered: false,
            detail: format!("no answer within {:?}", cfg.timeout),
        },
    }
}

async fn probe_inner(address: &str, tls: Option<&UpstreamTls>, cfg: &HealthConfig) -> ProbeResult {
    let fail = |detail: String| ProbeResult { ok: false, version: None, answered: false, detail };
    let stream = match connect_stream(address, tls, cfg.timeout).await {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let Some(path) = &cfg.path else {
        return ProbeResult { ok: true, version: None, answered: false, detail: "connect ok".into() };
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(x) => x,
        Err(e) => return fail(format!("handshake failed: {e}")),
    };
    tokio::spawn(conn);
    let host = cfg.host.as_deref().unwrap_or(address);
    let req = Request::get(path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "cutover-health")
        .body(Empty::<Bytes>::new());
    let req = match req {
        Ok(r) => r,
        Err(e) => return fail(format!("bad probe request: {e}")),
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return fail(format!("request failed: {e}")),
    };
    let status = resp.status().as_u16();
    let version = cfg
        .version_header
        .as_deref()
        .and_then(|h| resp.headers().get(h))
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string());
    // Read the (small) body so the exchange completes cleanly.
    let _ = resp.into_body().collect().await;
    if cfg.expect_status.contains(status) {
        ProbeResult { ok: true, version, answered: true, detail: format!("status {status}") }
    } else {
        ProbeResult { ok: false, version, answered: true, detail: format!("status {status} not expected") }
    }
}

/// Rise/fall bookkeeping of one endpoint's checks.
#[derive(Debug, Default)]
pub struct Streak {
    successes: u32,
    failures: u32,
    last_set: Option<Health>,
}

impl Streak {
    /// Applies one probe result to `current` health; returns the new health.
    pub fn apply(&mut self, current: Health, ok: bool, cfg: &HealthConfig) -> Health {
        if self.last_set.is_some_and(|h| h != current) {
            // Someone else (passive health) changed it: start counting afresh.
            self.successes = 0;
            self.failures = 0;
        }
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let next = match current {
            Health::Unknown | Health::Unhealthy if self.successes >= cfg.healthy_threshold => Health::Healthy,
            Health::Unknown if self.failures >= cfg.unhealthy_threshold => Health::Unhealthy,
            Health::Healthy if self.failures >= cfg.unhealthy_threshold => Health::Unhealthy,
            other => other,
        };
        self.last_set = Some(next);
        next
    }
}

/// Runs the checks of `endpoint` until `stop` is cancelled.
pub async fn run(endpoint: Arc<Endpoint>, cfg: Arc<HealthConfig>, stop: CancellationToken) {
    let mut streak = Streak::default();
    loop {
        let tls = endpoint.tls.load_full();
        let generation = endpoint.checks_generation();
        let result = tokio::select! {
            r = probe(&endpoint.address, tls.as_deref(), &cfg) => r,
            _ = stop.cancelled() => return,
        };
        // The endpoint was given to its target anew while this probe ran: the
        // answer may be the old release's. Start counting afresh.
        if endpoint.checks_generation() != generation {
            streak = Streak::default();
            continue;
        }
        if !result.ok {
            tracing::debug!(endpoint = %endpoint.address, detail = %result.detail, "health probe failed");
        }
        if cfg.version_header.is_some() && result.answered {
            endpoint.set_reported_version(result.version);
        }
        let next = streak.apply(endpoint.health(), result.ok, &cfg);
        if next != endpoint.health() {
            endpoint.set_health(next);
        }
        // This task is also the endpoint's pool timer.
        endpoint.pool.sweep();
        tokio::select! {
            _ = tokio::time::sleep(jitter(cfg.interval)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// `interval` ± up to 10 %, so probes of many endpoints do not align.
fn jitter(interval: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let spread = interval / 10;
    let offset = spread.mul_f64(f64::from(nanos % 1000) / 1000.0);
    interval - spread / 2 + offset
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rise: u32, fall: u32) -> HealthConfig {
        HealthConfig { healthy_threshold: rise, unhealthy_threshold: fall, ..Default::default() }
    }

    #[test]
    fn thresholds_apply_from_the_first_probe() {
        let c = cfg(2, 3);
        let mut s = Streak::default();
        let mut h = s.apply(Health::Unknown, true, &c);
        assert_eq!(h, Health::Unknown, "one pass of two");
        h = s.apply(h, true, &c);
        assert_eq!(h, Health::Healthy);
        let mut fresh = Streak::default();
        let mut u = Health::Unknown;
        for _ in 0..2 {
            u = fresh.apply(u, false, &c);
            assert_eq!(u, Health::Unknown);
        }
        assert_eq!(fresh.apply(u, false, &c), Health::Unhealthy, "three failures of three");
        // Two failures are not enough to fall (threshold 3).
        h = s.apply(h, false, &c);
        h = s.apply(h, false, &c);
        assert_eq!(h, Health::Healthy);
        h = s.apply(h, false, &c);
        assert_eq!(h, Health::Unhealthy);
        // One success is not enough to rise (threshold 2).
        h = s.apply(h, true, &c);
        assert_eq!(h, Health::Unhealthy);
        h = s.apply(h, true, &c);
        assert_eq!(h, Health::Healthy);
    }

    #[test]
    fn flapping_never_changes_state() {
        let c = cfg(2, 2);
        let mut s = Streak::default();
        let mut h = s.apply(Health::Unknown, true, &c);
        h = s.apply(h, true, &c);
        for i in 0..20 {
            h = s.apply(h, i % 2 == 0, &c);
            assert_eq!(h, Health::Healthy);
        }
    }

    #[test]
    fn passive_failure_needs_a_full_rise() {
        let c = cfg(3, 1);
        let mut s = Streak::default();
        let mut h = Health::Unknown;
        for _ in 0..3 {
            h = s.apply(h, true, &c);
        }
        assert_eq!(h, Health::Healthy);
        // The data plane marks it unhealthy behind the prober's back.
        let mut h = Health::Unhealthy;
        h = s.apply(h, true, &c);
        h = s.apply(h, true, &c);
        assert_eq!(h, Health::Unhealthy);
        h = s.apply(h, true, &c);
        assert_eq!(h, Health::Healthy);
    }
}
