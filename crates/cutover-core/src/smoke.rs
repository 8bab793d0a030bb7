//! Smoke checks: requests sent to every endpoint of a candidate target
//! before it goes live (SPEC §2 `switch.smoke`).

use bytes::Bytes;
use cutover_config::Smoke;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::time::Duration;

use crate::upstream::{connect_stream, UpstreamTls};

/// Largest body read from a smoke answer.
const MAX_BODY: usize = 1 << 20;

/// Runs `check` against `address` (over TLS when `tls` is given); `Err` carries why it failed.
pub async fn run(
    address: &str,
    tls: Option<&UpstreamTls>,
    host: Option<&str>,
    check: &Smoke,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, run_inner(address, tls, host, check, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(format!("GET {} gave no answer within {timeout:?}", check.path)),
    }
}

async fn run_inner(
    address: &str,
    tls: Option<&UpstreamTls>,
    host: Option<&str>,
    check: &Smoke,
    timeout: Duration,
) -> Result<(), String> {
    let stream = connect_stream(address, tls, timeout).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake failed: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(check.path.as_str())
        .header(hyper::header::HOST, host.unwrap_or(address))
        .header(hyper::header::USER_AGENT, "cutover-smoke")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad smoke request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("GET {} failed: {e}", check.path))?;
    let status = resp.status().as_u16();
    if !check.expect_status.contains(status) {
        return Err(format!("GET {} answered {status}", check.path));
    }
    if let Some(needle) = &check.expect_body_contains {
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("GET {} body: {e}", check.path))?
            .to_bytes();
        if !String::from_utf8_lossy(&body).contains(needle.as_str()) {
            return Err(format!("GET {} body does not contain {needle:?}", check.path));
        }
    }
    Ok(())
}
