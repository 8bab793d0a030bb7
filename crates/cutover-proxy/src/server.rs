//! The data-plane server: a function of a bound listener and a shutdown future.
//!
//! Each accepted connection is served by hyper-util's auto builder (HTTP/1.1,
//! or h2c with prior knowledge) with a timer set, so `header_read_timeout`
//! really cuts slow clients. Beyond `max_connections` new connections are
//! closed at once. On shutdown the listener closes, every connection is asked
//! to finish gracefully, and the caller's deadline bounds the wait.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cutover_config::Limits;
use cutover_metrics::IntGauge;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::forward::{ClientConn, Proxy};

/// h2 streams one client connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// h2 reset streams a client may leave pending (rapid-reset guard).
const H2_MAX_PENDING_RESETS: usize = 20;

/// How one listener serves its connections.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// `http` or `https` (sets `X-Forwarded-Proto`).
    pub scheme: &'static str,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// Open client connections of this listener (`cutover_client_connections`).
    pub connections: IntGauge,
}

/// Serves `listener` until `shutdown` resolves, then drains open connections
/// for at most `drain_deadline`. Returns when all are closed or the deadline passed.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    config: ListenerConfig,
    shutdown: impl Future<Output = ()>,
    drain_deadline: Duration,
) {
    let builder = Arc::new(builder(&config.limits));
    let permits = Arc::new(Semaphore::new(config.limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = config.limits.max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let client = ClientConn { peer, scheme: config.scheme };
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { proxy.handle(req, client).await }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        let gauge = config.connections.clone();
        gauge.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
            gauge.dec();
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain_deadline) => {
            tracing::warn!(?drain_deadline, "shutdown deadline reached with connections still open");
        }
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}
