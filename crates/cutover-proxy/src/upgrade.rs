//! Upgraded connections (WebSocket and other `Upgrade`s): both sides are
//! joined into a tunnel that counts as in flight on the target it started
//! on, survives switches, and is closed at that target's drain deadline —
//! each tunnel after its own random delay within `switch.close_spread`, so a
//! thousand clients do not reconnect in the same millisecond.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use crate::body::RequestGuard;

/// How long a tunnel closed at the drain deadline waits for both sides to
/// close after its FIN, reading and dropping what they still send.
const LINGER: Duration = Duration::from_secs(1);

/// A random number (std's per-instance random hasher keys; no extra dependency).
pub(crate) fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// A random duration in `[0, spread)`.
pub(crate) fn jitter(spread: Duration) -> Duration {
    if spread.is_zero() {
        return spread;
    }
    Duration::from_nanos(random_u64() % spread.as_nanos().max(1) as u64)
}

/// Joins the client and upstream sides of an upgrade until either closes or
/// the target's drain deadline passes. `guard` keeps it in flight meanwhile.
pub(crate) async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    mut guard: RequestGuard,
    _hold: std::sync::Arc<crate::server::ConnectionHold>,
) {
    guard.detach_connection();
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let Some((site, target)) = guard.route().cloned() else { return };
    let deadline = async {
        target.drain.cancelled().await;
        tokio::time::sleep(jitter(site.config.switch.close_spread)).await;
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        _ = deadline => {
            target.metrics.forced_upgrade_closes.inc();
            tracing::info!(site = site.name(), target = %target.name, "drain deadline: upgraded connection closed");
            // FIN on both sides, not RST. A socket closed with bytes unread
            // sends RST, so what either side still sends is read and dropped
            // until it closes too (or LINGER passed: a TLS close_notify to a
            // client that reads nothing waits no longer). The tunnel no longer
            // counts as in flight meanwhile.
            drop(guard);
            let close = async {
                let _ = client.shutdown().await;
                let _ = upstream.shutdown().await;
                let (mut a, mut b) = (tokio::io::sink(), tokio::io::sink());
                let _ = tokio::join!(tokio::io::copy(&mut client, &mut a), tokio::io::copy(&mut upstream, &mut b));
            };
            let _ = tokio::time::timeout(LINGER, close).await;
        }
    }
}
