//! The response body sent to clients, and the in-flight guard it carries.
//!
//! The guard is created when a request is routed and dropped when hyper is
//! done with the response body (or, for an upgrade, when the tunnel closes),
//! so in-flight counts (the drain condition) and the access log cover the
//! whole exchange, not just its head. A body still streaming when its
//! target's drain deadline passes is cut, after a random delay within the
//! site's `close_spread`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use cutover_core::routing::{SiteRoute, TargetPool};
use cutover_core::upstream::{h1, BodyProgress, Sender};
use cutover_core::Endpoint;
use http::header::SET_COOKIE;
use http::{HeaderMap, Method, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::activity::Activity;
use crate::quiet::QuietTimer;

/// Errors a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts a request as in flight from routing until its response is done,
/// then records its metrics and access-log line.
#[derive(Debug)]
pub struct RequestGuard {
    route: Option<(Arc<SiteRoute>, Arc<TargetPool>)>,
    /// The site and target of an answer cutover gave itself: logged and
    /// counted under them, but not as the target's doing (no target: logged
    /// under the site only).
    own: Option<(Arc<SiteRoute>, Option<Arc<TargetPool>>)>,
    endpoint: Option<Arc<Endpoint>>,
    activity: Option<Arc<Activity>>,
    start: Instant,
    method: Method,
    uri: Uri,
    request_id: Option<crate::headers::RequestId>,
    /// Status sent to the client.
    pub status: u16,
}

impl RequestGuard {
    /// Starts timing a request on a connection with `activity`; counts it in
    /// flight on `route`'s target when given.
    pub fn new(
        route: Option<(Arc<SiteRoute>, Arc<TargetPool>)>,
        activity: Option<Arc<Activity>>,
        method: Method,
        uri: Uri,
    ) -> Self {
        if let Some((_, target)) = &route {
            target.metrics.inflight.inc();
        }
        if let Some(a) = &activity {
            a.request_started();
        }
        Self {
            route,
            own: None,
            endpoint: None,
            activity,
            start: Instant::now(),
            method,
            uri,
            request_id: None,
            status: 0,
        }
    }

    /// A guard for an answer cutover gives itself on `site` for a request
    /// meant for `target` (a mode refusal, a redirect): logged and counted in
    /// `cutover_requests_total` under them, but not against the target's
    /// error rate (the post-switch watch). Without a target (a preview
    /// refusal), it is logged under the site only.
    pub fn own_answer(
        site: Arc<SiteRoute>,
        target: Option<Arc<TargetPool>>,
        activity: Option<Arc<Activity>>,
        method: Method,
        uri: Uri,
    ) -> Self {
        let mut g = Self::new(None, activity, method, uri);
        g.own = Some((site, target));
        g
    }

    /// Records the request id for the access log.
    pub fn set_request_id(&mut self, id: crate::headers::RequestId) {
        self.request_id = Some(id);
    }

    /// Counts the request as outstanding on `endpoint` (released with the guard).
    pub fn set_endpoint(&mut self, endpoint: Arc<Endpoint>) {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.endpoint.replace(endpoint) {
            old.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The site and target the request was routed to.
    pub fn route(&self) -> Option<&(Arc<SiteRoute>, Arc<TargetPool>)> {
        self.route.as_ref()
    }

    /// Detaches the request from its client connection, which has become
    /// the request's tunnel (an upgrade).
    pub fn detach_connection(&mut self) {
        if let Some(a) = self.activity.take() {
            a.request_upgraded();
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        if let Some(e) = &self.endpoint {
            e.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(a) = self.activity.take() {
            a.request_finished();
        }
        let (site, target) = match &self.route {
            Some((site, target)) => {
                target.metrics.inflight.dec();
                // Status 0: the client went away before any answer; that is not an answer.
                if self.status != 0 {
                    target.metrics.observe(self.status, elapsed.as_secs_f64());
                }
                (site.name(), target.name.as_str())
            }
            None => match &self.own {
                Some((site, Some(target))) => {
                    target.metrics.observe_own(self.status, elapsed.as_secs_f64());
                    (site.name(), target.name.as_str())
                }
                Some((site, None)) => (site.name(), "-"),
                None => ("-", "-"),
            },
        };
        tracing::info!(
            target: "access",
            site,
            target,
            method = %self.method,
            path = %LoggedPath(self.uri.path()),
            status = self.status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            // (Fields are only evaluated when the access log is on.)
            request_id = self.request_id.as_ref().map_or("-", |id| id.as_str()),
        );
    }
}

/// A request path as the access log writes it: bytes outside visible ASCII
/// (which hyper lets through in a path as raw UTF-8) percent-encoded, so that
/// neither format carries a C1 control (8-bit CSI `\u{9b}` is a terminal
/// escape), a line or paragraph separator or a bidi override from a client
/// into the log. Visible ASCII is written as it came.
struct LoggedPath<'a>(&'a str);

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.bytes().all(|b| b.is_ascii_graphic()) {
            return f.write_str(self.0);
        }
        for b in self.0.bytes() {
            match b.is_ascii_graphic() {
                true => std::fmt::Write::write_char(f, char::from(b))?,
                false => write!(f, "%{b:02X}")?,
            }
        }
        Ok(())
    }
}

/// Where the bytes of a response come from.
#[derive(Debug)]
enum Source {
    /// Streamed from an upstream; an HTTP/1.1 connection goes back to the pool at the end.
    Upstream {
        body: Incoming,
        sender: Option<Sender>,
        /// The request body's progress: the connection is reusable only once it was all sent.
        request: Option<Arc<BodyProgress>>,
        endpoint: Arc<Endpoint>,
    },
    /// Read by cutover's own HTTP/1.1 client, which returns its connection
    /// itself; the upstream's fields until a server takes them.
    Direct(h1::ResponseBody, Option<h1::Fields>),
    /// Made by cutover itself.
    Full(Option<Bytes>),
}

/// Watching for the drain deadline of a body that is still streaming.
enum Drain {
    /// Not watching (yet): the body has not waited on its upstream so far.
    Idle,
    /// Waiting for the target's drain token.
    Armed(Pin<Box<WaitForCancellationFutureOwned>>),
    /// The deadline passed: closing after this jitter.
    Closing(Pin<Box<tokio::time::Sleep>>),
}

/// A response body with its request's guard.
pub struct ProxyBody {
    source: Source,
    drain: Drain,
    /// Cuts a body whose upstream sends nothing for
    /// `limits.upstream_response_timeout` while cutover waits on it (nginx's
    /// `proxy_read_timeout`); time the client takes to read does not count.
    silence: Option<QuietTimer>,
    guard: Option<RequestGuard>,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBody").field("source", &self.source).finish()
    }
}

impl ProxyBody {
    /// A body made by cutover.
    pub fn full(bytes: impl Into<Bytes>, guard: Option<RequestGuard>) -> Self {
        let bytes = bytes.into();
        Self { source: Source::Full((!bytes.is_empty()).then_some(bytes)), drain: Drain::Idle, silence: None, guard }
    }

    /// A body streamed from an upstream; `sender` is returned to the pool when
    /// this body was read to the end and the request body (`request`) was all
    /// sent. An upstream silent for `silence` is cut.
    pub fn upstream(
        body: Incoming,
        sender: Option<Sender>,
        request: Option<Arc<BodyProgress>>,
        endpoint: Arc<Endpoint>,
        guard: RequestGuard,
        silence: std::time::Duration,
    ) -> Self {
        Self {
            source: Source::Upstream { body, sender, request, endpoint },
            drain: Drain::Idle,
            silence: Some(QuietTimer::new(silence)),
            guard: Some(guard),
        }
    }

    /// A body read by cutover's own HTTP/1.1 client, with the upstream's
    /// fields, which are not in the response's map ([`ProxyBody::take_fields`]).
    /// An upstream silent for `silence` is cut.
    pub fn direct(
        body: h1::ResponseBody,
        fields: h1::Fields,
        guard: RequestGuard,
        silence: std::time::Duration,
    ) -> Self {
        Self {
            source: Source::Direct(body, Some(fields)),
            drain: Drain::Idle,
            silence: Some(QuietTimer::new(silence)),
            guard: Some(guard),
        }
    }

    /// The upstream's body failed before any of the response reached the
    /// client, which gets a `502` instead: counted and logged as one (the
    /// upstream failure was counted as the body failed).
    pub fn failed_before_sending(&mut self) {
        if let Some(g) = &mut self.guard {
            g.status = 502;
        }
    }

    /// The upstream's fields of a response read by cutover's own client, kept
    /// out of the response's map (which has only what cutover adds) so that
    /// none is built for them: cutover's own server writes them as they are,
    /// [`fields_into_map`] puts them into the map for hyper's.
    pub fn take_fields(&mut self) -> Option<h1::Fields> {
        match &mut self.source {
            Source::Direct(_, fields) => fields.take(),
            _ => None,
        }
    }

    /// Polls the drain watch; `true` when the body must be cut now.
    fn drain_due(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            match &mut self.drain {
                Drain::Idle => {
                    let Some((site, target)) = self.guard.as_ref().and_then(|g| g.route()) else { return false };
                    if !target.drain.is_cancelled() {
                        self.drain = Drain::Armed(Box::pin(target.drain.clone().cancelled_owned()));
                        continue;
                    }
                    let delay = crate::upgrade::jitter(site.config.switch.close_spread);
                    self.drain = Drain::Closing(Box::pin(tokio::time::sleep(delay)));
                }
                Drain::Armed(wait) => {
                    if wait.as_mut().poll(cx).is_pending() {
                        return false;
                    }
                    let spread = self.guard.as_ref().and_then(|g| g.route()).map(|(s, _)| s.config.switch.close_spread);
                    let delay = crate::upgrade::jitter(spread.unwrap_or_default());
                    self.drain = Drain::Closing(Box::pin(tokio::time::sleep(delay)));
                }
                Drain::Closing(sleep) => return sleep.as_mut().poll(cx).is_ready(),
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl ProxyBody {
    /// Readies the rest of the body to be spliced into the client's socket
    /// ([`ProxyBody::poll_splice`]): how much is left; none unless cutover's
    /// own client reads it from a plain connection (see [`h1::ResponseBody::prepare_splice`]).
    pub fn prepare_splice(&mut self) -> Option<u64> {
        match &mut self.source {
            Source::Direct(body, _) => body.prepare_splice(),
            _ => None,
        }
    }

    /// Splices the rest of a readied body into `to`: ready with the bytes
    /// moved (zero once done), pending while the sockets are not ready. While
    /// it waits on the upstream, the target's drain deadline may cut the body
    /// (as for a body read as frames); while it waits on the client, it does not.
    pub fn poll_splice(&mut self, cx: &mut Context<'_>, to: &tokio::net::TcpStream) -> Poll<Result<u64, BoxError>> {
        let Source::Direct(body, _) = &mut self.source else { return Poll::Ready(Ok(0)) };
        match body.poll_splice(cx, to) {
            Poll::Ready(r) => {
                if let Some(s) = &mut self.silence {
                    s.progress();
                }
                if let Err(e) = &r {
                    if e.is_upstreams() {
                        if let Some((_, target)) = self.guard.as_ref().and_then(|g| g.route()) {
                            target.metrics.upstream_error(cutover_metrics::UpstreamErrorKind::Reset);
                        }
                    }
                }
                Poll::Ready(r.map_err(Into::into))
            }
            Poll::Pending if body.splice_waits_on_client() => Poll::Pending,
            Poll::Pending => match self.pending(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }

    /// Whether a pending [`ProxyBody::poll_splice`] waits on the client (its
    /// socket is full), not on the upstream.
    pub fn splice_waits_on_client(&self) -> bool {
        matches!(&self.source, Source::Direct(body, _) if body.splice_waits_on_client())
    }
}

impl ProxyBody {
    /// The upstream has nothing yet: pending, unless the target's drain
    /// deadline cuts the body now, or the upstream has been silent too long.
    fn pending(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // While the client still uploads (a gRPC stream), the exchange is not silent.
        let uploading = matches!(&self.source, Source::Upstream { request: Some(r), .. } if !r.done());
        if !uploading && self.silence.as_mut().is_some_and(|s| s.expired(cx)) {
            if let Some((site, target)) = self.guard.as_ref().and_then(|g| g.route()) {
                target.metrics.upstream_error(cutover_metrics::UpstreamErrorKind::Timeout);
                tracing::warn!(site = site.name(), target = %target.name, "upstream silent mid-body: response cut");
            }
            return Poll::Ready(Some(Err("the upstream sent nothing for upstream_response_timeout".into())));
        }
        if self.drain_due(cx) {
            if let Some((site, target)) = self.guard.as_ref().and_then(|g| g.route()) {
                target.metrics.forced_stream_closes.inc();
                tracing::info!(site = site.name(), target = %target.name, "drain deadline: response stream closed");
            }
            return Poll::Ready(Some(Err("closed at the drain deadline of its target".into())));
        }
        Poll::Pending
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Full(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream { body, .. } => Pin::new(body).poll_frame(cx).map(|f| f.map(|f| f.map_err(Into::into))),
            Source::Direct(body, _) => Pin::new(body).poll_frame(cx).map(|f| f.map(|f| f.map_err(Into::into))),
        };
        match polled {
            Poll::Ready(Some(Err(e))) => {
                // The upstream broke off its body (a reset, a framing error):
                // the client's answer is cut, and the target's error counted.
                if let Some((site, target)) = this.guard.as_ref().and_then(|g| g.route()) {
                    target.metrics.upstream_error(cutover_metrics::UpstreamErrorKind::Reset);
                    tracing::debug!(site = site.name(), target = %target.name, error = %e, "upstream body broken off");
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(frame) => {
                if let Some(s) = &mut this.silence {
                    s.progress();
                }
                Poll::Ready(frame)
            }
            Poll::Pending => this.pending(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upstream { body, .. } => body.is_end_stream(),
            Source::Direct(body, _) => body.is_end_stream(),
            Source::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream { body, .. } => body.size_hint(),
            Source::Direct(body, _) => body.size_hint(),
            Source::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Source::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// `resp` with the upstream's fields ([`ProxyBody::take_fields`]) in its map,
/// for hyper's servers. A field cutover set wins over the upstream's of the
/// same name, except `Set-Cookie`, which may come many times.
pub fn fields_into_map(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let Some(fields) = resp.body_mut().take_fields() else { return resp };
    let mut map = HeaderMap::new();
    fields.append_to(&mut map);
    let added = std::mem::replace(resp.headers_mut(), map);
    for name in added.keys().filter(|&n| n != SET_COOKIE) {
        resp.headers_mut().remove(name);
    }
    for (name, value) in &added {
        resp.headers_mut().append(name, value.clone());
    }
    resp
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Reuse the upstream connection only if its response was read to the end.
        if let Source::Upstream { body, sender, request, endpoint } = &mut self.source {
            if body.is_end_stream() && request.as_ref().is_none_or(|r| r.done()) {
                if let Some(s) = sender.take() {
                    endpoint.pool.checkin(s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LoggedPath;

    #[test]
    fn a_logged_path_has_only_visible_ascii() {
        for (path, logged) in [
            ("/a/b%0d%0a?\"\\", "/a/b%0d%0a?\"\\"),
            ("/café", "/caf%C3%A9"),
            ("/a\u{9b}31m", "/a%C2%9B31m"),
            ("/x\u{202e}y", "/x%E2%80%AEy"),
        ] {
            assert_eq!(LoggedPath(path).to_string(), logged);
        }
    }
}
