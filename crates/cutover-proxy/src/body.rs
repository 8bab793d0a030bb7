//! The response body sent to clients, and the in-flight guard it carries.
//!
//! The guard is created when a request is routed and dropped when hyper is
//! done with the response body, so in-flight counts (the drain condition)
//! and the access log cover the whole response, not just its head.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use cutover_core::routing::{SiteRoute, TargetPool};
use cutover_core::upstream::Sender;
use cutover_core::Endpoint;
use http::{HeaderValue, Method, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Counts a request as in flight from routing until its response body is done,
/// then records its metrics and access-log line.
#[derive(Debug)]
pub struct RequestGuard {
    route: Option<(Arc<SiteRoute>, Arc<TargetPool>)>,
    endpoint: Option<Arc<Endpoint>>,
    start: Instant,
    method: Method,
    uri: Uri,
    request_id: Option<HeaderValue>,
    /// Status sent to the client.
    pub status: u16,
}

impl RequestGuard {
    /// Starts timing a request; counts it in flight on `route`'s target when given.
    pub fn new(route: Option<(Arc<SiteRoute>, Arc<TargetPool>)>, method: Method, uri: Uri) -> Self {
        if let Some((_, target)) = &route {
            target.metrics.inflight.inc();
        }
        Self { route, endpoint: None, start: Instant::now(), method, uri, request_id: None, status: 0 }
    }

    /// Records the request id for the access log.
    pub fn set_request_id(&mut self, id: HeaderValue) {
        self.request_id = Some(id);
    }

    /// Counts the request as outstanding on `endpoint` (released with the guard).
    pub fn set_endpoint(&mut self, endpoint: Arc<Endpoint>) {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.endpoint.replace(endpoint) {
            old.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        if let Some(e) = &self.endpoint {
            e.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        let (site, target) = match &self.route {
            Some((site, target)) => {
                target.metrics.inflight.dec();
                target.metrics.observe(self.status, elapsed.as_secs_f64());
                (site.name(), target.name.as_str())
            }
            None => ("-", "-"),
        };
        let request_id = self.request_id.as_ref().map(|v| v.to_str().unwrap_or("-")).unwrap_or("-");
        tracing::info!(
            target: "access",
            site,
            target,
            method = %self.method,
            path = ?self.uri.path(),
            status = self.status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            request_id,
        );
    }
}

/// Where the bytes of a response come from.
#[derive(Debug)]
enum Source {
    /// Streamed from an upstream; the connection goes back to the pool at the end.
    Upstream { body: Incoming, sender: Option<Sender>, endpoint: Arc<Endpoint> },
    /// Made by cutover itself.
    Full(Option<Bytes>),
}

/// A response body with its request's guard.
#[derive(Debug)]
pub struct ProxyBody {
    source: Source,
    _guard: Option<RequestGuard>,
}

impl ProxyBody {
    /// A body made by cutover.
    pub fn full(bytes: impl Into<Bytes>, guard: Option<RequestGuard>) -> Self {
        let bytes = bytes.into();
        Self { source: Source::Full((!bytes.is_empty()).then_some(bytes)), _guard: guard }
    }

    /// A body streamed from an upstream over `sender`'s connection.
    pub fn upstream(body: Incoming, sender: Sender, endpoint: Arc<Endpoint>, guard: RequestGuard) -> Self {
        Self { source: Source::Upstream { body, sender: Some(sender), endpoint }, _guard: Some(guard) }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().source {
            Source::Upstream { body, .. } => Pin::new(body).poll_frame(cx),
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upstream { body, .. } => body.is_end_stream(),
            Source::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream { body, .. } => body.size_hint(),
            Source::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Source::Full(None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Reuse the upstream connection only if its response was read to the end.
        if let Source::Upstream { body, sender, endpoint } = &mut self.source {
            if body.is_end_stream() {
                if let Some(s) = sender.take() {
                    endpoint.pool.checkin(s);
                }
            }
        }
    }
}
