//! Serves the admin API on a bound listener until a shutdown future resolves.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::api::Admin;

/// Serves `admin` on `listener` until `shutdown` resolves; open admin
/// connections then get a few seconds to finish.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let admin = admin.clone();
        // Each command runs in its own task: a client that hangs up cannot
        // cancel it half-way through (between saving state and publishing it).
        let service = service_fn(move |req| {
            let admin = admin.clone();
            async move {
                match tokio::spawn(async move { admin.handle(req).await }).await {
                    Ok(answer) => Ok::<_, Infallible>(answer),
                    Err(e) => {
                        tracing::error!(error = %e, "admin command failed");
                        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                            b"internal error\n",
                        )));
                        *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                        Ok(r)
                    }
                }
            }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
