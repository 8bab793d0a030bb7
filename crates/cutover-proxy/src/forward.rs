//! The life of one request, in order:
//!
//! 1. `reject_bad_request`: framing that could be read two ways, `CONNECT`,
//!    a missing or conflicting `Host` → 4xx, never forwarded.
//! 2. `route`: find the site by `Host` (or the absolute-form authority) with
//!    one snapshot load, and clone out the live target and the settings.
//! 3. `prepare`: rewrite the head for the upstream (origin-form URI, `Host`,
//!    hop-by-hop removal, underscore names dropped, forwarded headers,
//!    request id).
//! 4. `send`: pick an endpoint (least outstanding, healthy first), take a
//!    pooled connection or open one; a connection that cannot be made is
//!    retried on another endpoint, since nothing was sent. A request without
//!    a body to an HTTP/1.1 target goes through cutover's own client
//!    (`send_direct`), the rest through hyper's.
//! 5. The response streams back inside a [`ProxyBody`] that keeps the request
//!    in flight until its last byte; an upgrade becomes a tunnel.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use cutover_config::Protocol;
use cutover_core::routing::{RoutingTable, SiteRoute, TargetPool};
use cutover_core::upstream::{self, h1, ConnectError, H2Sender, RequestBody, Sender, Silence, UpstreamBody};
use cutover_core::{hop_by_hop, Endpoint};
use cutover_metrics::UpstreamErrorKind;
use http::header::{
    HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, EXPECT, HOST, RETRY_AFTER, SET_COOKIE, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::upgrade::OnUpgrade;
use tokio_util::task::TaskTracker;

use crate::activity::Activity;
use crate::body::{ProxyBody, RequestGuard};
use crate::headers;
use crate::modes;
use cutover_core::pause::HoldError;

/// Attempts at getting a connection for one request (endpoints and stale pooled connections).
const MAX_ATTEMPTS: usize = 4;

/// Everything the data plane needs, shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    /// The routing snapshot, read once per request.
    table: Arc<ArcSwap<RoutingTable>>,
    /// Upgraded tunnels, so shutdown can wait for them.
    tunnels: TaskTracker,
}

/// What the proxy knows about the client connection a request came on.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The peer's IP as a header value (`X-Forwarded-For`), made once per connection.
    pub peer_value: HeaderValue,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The connection's activity (idle tracking).
    pub activity: Arc<Activity>,
    /// Its place under `max_connections` (an upgraded tunnel keeps it).
    pub hold: Arc<crate::server::ConnectionHold>,
}

/// One request's routing decision, taken from one snapshot.
struct Routed {
    site: Arc<SiteRoute>,
    target: Arc<TargetPool>,
    trusted: bool,
    connect_timeout: Duration,
    response_timeout: Duration,
    https_port: Option<u16>,
}

/// A connection to one endpoint, ready to carry one request.
enum Upstream {
    /// An HTTP/1.1 connection (pooled or new).
    Http1(Sender),
    /// The endpoint's shared HTTP/2 connection.
    Http2(H2Sender),
}

impl Upstream {
    /// A pooled or new connection to `endpoint`, and whether it was pooled
    /// (the upstream may have closed it meanwhile).
    async fn get(endpoint: &Endpoint, h2: bool, fresh: bool, timeout: Duration) -> Result<(Self, bool), ConnectError> {
        let tls = || endpoint.tls.load_full();
        if h2 {
            if let Some(s) = endpoint.pool.h2() {
                return Ok((Upstream::Http2(s), true));
            }
            let s = upstream::connect_h2(&endpoint.address, tls().as_deref(), timeout).await?;
            endpoint.pool.set_h2(s.clone());
            return Ok((Upstream::Http2(s), false));
        }
        // Nothing sent this way is retried once written: see `Pool::checkout`.
        match if fresh { None } else { endpoint.pool.checkout(false) } {
            Some(s) => Ok((Upstream::Http1(s), true)),
            None => {
                let s = upstream::connect(&endpoint.address, tls().as_deref(), timeout).await?;
                Ok((Upstream::Http1(s), false))
            }
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Upstream::Http1(s) => s.is_ready(),
            Upstream::Http2(s) => s.is_ready(),
        }
    }

    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Upstream::Http1(s) => s.ready().await,
            Upstream::Http2(s) => s.ready().await,
        }
    }

    async fn try_send(
        &mut self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>> {
        match self {
            Upstream::Http1(s) => s.try_send_request(req).await,
            Upstream::Http2(s) => s.try_send_request(req).await,
        }
    }

    fn into_via(self) -> Via {
        match self {
            Upstream::Http1(s) => Via::Http1(s),
            Upstream::Http2(_) => Via::Http2,
        }
    }
}

/// The upstream connection a response came on.
enum Via {
    /// A pooled HTTP/1.1 connection, returned when the body is read.
    Http1(Sender),
    /// The shared HTTP/2 connection of the endpoint.
    Http2,
}

/// Why a request could not be forwarded.
#[derive(Debug)]
enum ForwardError {
    /// No endpoint accepted a connection.
    NoEndpoint,
    /// The upstream did not answer within the response timeout.
    Timeout,
    /// The upstream broke the exchange after the request was sent.
    Broken(crate::body::BoxError),
    /// The client's request body could not be read (malformed framing, or
    /// the client went away): not the upstream's fault.
    BadBody(crate::body::BoxError),
    /// The client stopped sending its request body for the response timeout.
    BodyStalled,
    /// The target's drain deadline passed before it answered.
    Drained,
}

impl Proxy {
    /// A data plane reading `table`.
    pub fn new(table: Arc<ArcSwap<RoutingTable>>) -> Self {
        Self { table, tunnels: TaskTracker::new() }
    }

    /// Open upgraded tunnels (for shutdown).
    pub fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    /// Handles one client request (its body already wrapped for the upstream,
    /// [`RequestBody::new`]); never fails (errors become responses). An answer
    /// read by cutover's own upstream client has the upstream's fields in its
    /// body ([`ProxyBody::take_fields`]), not in its map: the server writes
    /// them, or puts them into the map first ([`crate::body::fields_into_map`]).
    pub async fn handle(
        &self,
        mut req: Request<RequestBody>,
        conn: &ClientConn,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let mut prepared = PreparedUpgrade::of(&mut req, &conn.activity);
        let method = req.method().clone();
        let uri = req.uri().clone();
        if let Some((status, message)) = reject_bad_request(&req, conn.scheme) {
            let mut guard = RequestGuard::new(None, Some(conn.activity.clone()), method, uri);
            guard.status = status.as_u16();
            // A request that could be read two ways leaves the connection in doubt: close it.
            let mut resp = local(status, message, guard);
            resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        // Route; a paused site holds the request, then routes it afresh to the
        // live target of that moment.
        let (routed, pick) = loop {
            let Some((mut routed, preview_host)) = self.route(&req, conn.peer) else {
                let mut guard = RequestGuard::new(None, Some(conn.activity.clone()), method, uri);
                guard.status = 404;
                return Ok(local(StatusCode::NOT_FOUND, "no site is configured for this host\n", guard));
            };
            if conn.scheme == "http" && routed.site.config.redirect_https && !routed.site.allowed_path(uri.path()) {
                if let Some(r) = https_redirect(&req, routed.https_port) {
                    return Ok(refused(r, routed.site, Some(routed.target), conn.activity.clone(), &mut req).await);
                }
            }
            let pick = match modes::pick(&routed.site, preview_host.as_deref(), &req) {
                Ok(p) => p,
                // A preview refusal (bad token, a target missing or down):
                // not the live target's answer, so counted on none.
                Err(r) => return Ok(refused(r, routed.site, None, conn.activity.clone(), &mut req).await),
            };
            if let Some(mut r) = modes::refusal(&routed.site, &pick.target, &req) {
                // A preview answer says which target gave it, refusal or not.
                if let Some(v) = pick.preview.then(|| modes::served_by(&pick.target, None)).flatten() {
                    r.headers.push((modes::SERVED_BY.clone(), v));
                }
                return Ok(refused(r, routed.site, Some(pick.target), conn.activity.clone(), &mut req).await);
            }
            let gate = &routed.site.pause;
            if !pick.preview && gate.is_paused() {
                // Boxed, as are the other rare awaits: the request future stays small to move.
                // Open meanwhile, or the connection's timeouts would cut a held request.
                let held = conn.activity.hold_open();
                let released = Box::pin(gate.hold(routed.site.config.pause.max_held)).await;
                drop(held);
                if let Err(why) = released {
                    let body = match why {
                        HoldError::Full => "the site is paused and its queue is full\n",
                        HoldError::Timeout => "the site stayed paused past the pause timeout\n",
                    };
                    let mut r = modes::Refusal {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        headers: vec![(RETRY_AFTER, modes::retry_after(&routed.site))],
                        body: Bytes::from_static(body.as_bytes()),
                    };
                    r.headers.push((CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8")));
                    return Ok(refused(r, routed.site, Some(pick.target), conn.activity.clone(), &mut req).await);
                }
                continue;
            }
            routed.target = pick.target.clone();
            break (routed, pick);
        };
        let route = (routed.site.clone(), routed.target.clone());
        let mut guard = RequestGuard::new(Some(route), Some(conn.activity.clone()), method, uri);
        let upgrade = upgrade_protocol(&req).filter(|_| prepared.upgrade.is_some());
        let protocol = routed.target.protocol;
        let whole = match (&upgrade, protocol) {
            (None, Protocol::Http1) => req.body_mut().take_whole(),
            _ => None,
        };
        if let Some(body) = whole {
            // A request without a body, or with one read whole: cutover's own
            // client sends it in one write. In a block, so that the request's
            // parts are not kept in the future across the await.
            let (wire, method) = {
                let (mut parts, _) = req.into_parts();
                let added = prepare(&mut parts, conn, &routed, &mut guard, None, protocol, false);
                (h1::encode_request(&parts, added.iter(), &body), parts.method)
            };
            return Ok(match self.send_direct(&routed, &wire, &method, &mut guard).await {
                Ok(answer) => {
                    guard.status = answer.status.as_u16();
                    let answered = pick.preview.then(|| answer.body.endpoint().clone());
                    let body = ProxyBody::direct(answer.body, answer.fields, guard, routed.response_timeout);
                    let mut resp = Response::new(body);
                    *resp.status_mut() = answer.status;
                    *resp.version_mut() = answer.version;
                    no_made_up_reason(answer.status, resp.extensions_mut());
                    finish_head(resp.headers_mut(), &pick, &routed, answered.as_deref());
                    resp
                }
                Err(e) => failure(e, &routed.target, guard),
            });
        }
        let client_h1 = req.version() <= Version::HTTP_11;
        let (mut parts, body) = req.into_parts();
        let streamed = !http_body::Body::is_end_stream(&body);
        prepare(&mut parts, conn, &routed, &mut guard, upgrade.as_ref(), protocol, streamed)
            .insert_into(&mut parts.headers);
        let mut req = Request::from_parts(parts, body);
        // The upload waits for the upstream's `100 Continue` (HTTP/1.1 only:
        // hyper reports 1xx answers there), so one that refuses from the head
        // alone spares the client the upload.
        let expects = req.headers().get(EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects && protocol == Protocol::Http1 && upgrade.is_none() {
            RequestBody::expect_continue(&mut req);
        }
        let request_progress = req.body().progress();
        let sent = Box::pin(self.send(&routed, req, &mut guard, upgrade.is_some())).await;
        let (mut resp, via, endpoint) = match sent {
            Ok(x) => x,
            Err(e) => return Ok(failure(e, &routed.target, guard)),
        };
        guard.status = resp.status().as_u16();
        if upgrade.is_some() && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_side) = prepared.upgrade.take() {
                let upstream_side = hyper::upgrade::on(&mut resp);
                self.tunnels.spawn(crate::upgrade::tunnel(client_side, upstream_side, guard, conn.hold.clone()));
                let (parts, _) = resp.into_parts();
                return Ok(Response::from_parts(parts, ProxyBody::full(Bytes::new(), None)));
            }
        }
        let (mut parts, body) = resp.into_parts();
        if !framing_passes(&parts.headers) || parts.status.as_u16() > 599 {
            exchange_failed(&routed.target, &endpoint, UpstreamErrorKind::Reset);
            return Ok(failure(ForwardError::Broken("unsupported framing or status".into()), &routed.target, guard));
        }
        if let Some(idle) = parts.headers.get(&hop_by_hop::KEEP_ALIVE) {
            if let Some(idle) = hop_by_hop::keep_alive_timeout(idle.as_bytes()) {
                endpoint.pool.learn_keep_alive(idle);
            }
        }
        headers::remove_hop_by_hop_response(&mut parts.headers, parts.version);
        // Answered before the upload was let go (a `417`, a `401` from the head
        // alone): the client may still send it, or never; the connection ends
        // after this answer, and says so.
        if client_h1 && request_progress.as_ref().is_some_and(|p| p.held_back()) {
            parts.headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        finish_head(&mut parts.headers, &pick, &routed, Some(&endpoint));
        no_made_up_reason(parts.status, &mut parts.extensions);
        let sender = match via {
            Via::Http1(s) => Some(s),
            Via::Http2 => None,
        };
        let body = ProxyBody::upstream(body, sender, request_progress, endpoint, guard, routed.response_timeout);
        Ok(Response::from_parts(parts, body))
    }

    /// Finds the site for `req` with one snapshot load (the live target for
    /// now; [`modes::pick`] may choose another), and the target a preview host names.
    fn route<B>(&self, req: &Request<B>, peer: SocketAddr) -> Option<(Routed, Option<Box<str>>)> {
        // HTTP/1.0 may come without Host: the `*` site serves it, if there is one.
        let host = request_host(req).unwrap_or_default();
        let table = self.table.load();
        let (site, preview) = table.site_for_host(host)?;
        let s = &table.settings;
        let routed = Routed {
            target: site.live.clone(),
            site: site.clone(),
            trusted: !s.trusted_proxies.is_empty() && s.trusted_proxies.iter().any(|n| n.contains(&peer.ip())),
            connect_timeout: s.connect_timeout,
            response_timeout: s.response_timeout,
            https_port: s.https_port,
        };
        Some((routed, preview.map(Into::into)))
    }

    /// Sends `req` to an endpoint of the routed target, retrying on another
    /// connection or endpoint whenever nothing was sent: a connection that
    /// could not be made, or a pooled one that closed meanwhile. An upgrade
    /// (`fresh`) always gets a new HTTP/1.1 connection (it leaves the pool for good).
    async fn send(
        &self,
        routed: &Routed,
        mut req: Request<UpstreamBody>,
        guard: &mut RequestGuard,
        fresh: bool,
    ) -> Result<(Response<Incoming>, Via, Arc<Endpoint>), ForwardError> {
        let target = &routed.target;
        let h2 = target.protocol == Protocol::H2 && !fresh;
        let mut failed = Vec::new();
        // After a pooled connection turned out closed, the retry takes a new one.
        let mut renew = false;
        for _ in 0..MAX_ATTEMPTS {
            let idx = target.pick(&failed).ok_or(ForwardError::NoEndpoint)?;
            let endpoint = &target.endpoints[idx];
            // Counted from the choice on, connecting included: a burst that
            // comes while this connection is made must not all choose it too.
            guard.set_endpoint(endpoint.clone());
            let (mut conn, reused) = match Upstream::get(endpoint, h2, fresh || renew, routed.connect_timeout).await {
                Ok(c) => c,
                Err(e) => {
                    connect_failed(target, endpoint, &e);
                    failed.push(idx);
                    continue;
                }
            };
            // A pooled connection that closed meanwhile, or never became ready: nothing was sent.
            // (Usually ready at once: no timer then.)
            if !conn.is_ready()
                && !matches!(tokio::time::timeout(routed.connect_timeout, conn.ready()).await, Ok(Ok(())))
            {
                renew = true;
                continue;
            }
            let progress = req.body().progress();
            let sent = tokio::select! {
                r = conn.try_send(req) => Ok(r),
                silence = upstream::response_deadline(progress.as_deref(), routed.response_timeout) => Err(silence),
                drained = upstream::drained(&target.drain) => Err(drained),
            };
            match sent {
                Ok(Ok(resp)) => return Ok((resp, conn.into_via(), endpoint.clone())),
                Ok(Err(mut e)) => match e.take_message() {
                    // Not written at all: safe to try again on another connection.
                    Some(back) => {
                        req = back;
                        renew = true;
                    }
                    None => {
                        let e = e.into_error();
                        // The client's body failed: hyper's "user body" error, caused by
                        // the client connection's own error. Not the endpoint's fault.
                        if e.is_user() && std::error::Error::source(&e).is_some_and(|c| c.is::<hyper::Error>()) {
                            return Err(ForwardError::BadBody(e.into()));
                        }
                        // A pooled connection the upstream closed meanwhile says nothing of the endpoint.
                        if reused {
                            target.metrics.upstream_error(UpstreamErrorKind::Reset);
                        } else {
                            exchange_failed(target, endpoint, UpstreamErrorKind::Reset);
                        }
                        return Err(ForwardError::Broken(e.into()));
                    }
                },
                Err(Silence::ClientBody) => return Err(ForwardError::BodyStalled),
                Err(Silence::Drained) => return Err(ForwardError::Drained),
                Err(Silence::Upstream) => {
                    exchange_failed(target, endpoint, UpstreamErrorKind::Timeout);
                    return Err(ForwardError::Timeout);
                }
            }
        }
        Err(ForwardError::NoEndpoint)
    }

    /// Sends a request encoded whole, body included (`request`), with cutover's
    /// own HTTP/1.1 client. A connection that cannot be made is retried on another
    /// endpoint; a pooled one that the upstream closed before answering is
    /// retried on a new connection when `method` is idempotent (RFC 9110 §9.2.2).
    async fn send_direct(
        &self,
        routed: &Routed,
        request: &[u8],
        method: &Method,
        guard: &mut RequestGuard,
    ) -> Result<h1::Answer, ForwardError> {
        let target = &routed.target;
        let idempotent = matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        let mut failed = Vec::new();
        // After a pooled connection turned out closed, the retry takes a new
        // one: the pool may hold more that the upstream closed at once (a restart).
        let mut renew = false;
        for _ in 0..MAX_ATTEMPTS {
            let idx = target.pick(&failed).ok_or(ForwardError::NoEndpoint)?;
            let endpoint = &target.endpoints[idx];
            // Counted from the choice on (see `send`).
            guard.set_endpoint(endpoint.clone());
            let pooled = if renew { None } else { endpoint.pool.checkout_h1(idempotent) };
            let (conn, reused) = match pooled {
                Some(c) => (c, true),
                None => {
                    let tls = endpoint.tls.load_full();
                    let connect = upstream::connect_h1(&endpoint.address, tls.as_deref(), routed.connect_timeout);
                    match Box::pin(connect).await {
                        Ok(c) => (c, false),
                        Err(e) => {
                            connect_failed(target, endpoint, &e);
                            failed.push(idx);
                            continue;
                        }
                    }
                }
            };
            let exchange = std::pin::pin!(h1::exchange(conn, request, *method == Method::HEAD, endpoint.clone()));
            match upstream::answer_within(exchange, routed.response_timeout, &target.drain).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) if e.is_stale() && reused && idempotent => renew = true,
                Ok(Err(e)) => {
                    // A pooled connection the upstream closed meanwhile says nothing of the endpoint.
                    if e.is_stale() && reused {
                        target.metrics.upstream_error(UpstreamErrorKind::Reset);
                    } else {
                        exchange_failed(target, endpoint, UpstreamErrorKind::Reset);
                    }
                    return Err(ForwardError::Broken(e.into()));
                }
                Err(Silence::Drained) => return Err(ForwardError::Drained),
                Err(_) => {
                    exchange_failed(target, endpoint, UpstreamErrorKind::Timeout);
                    return Err(ForwardError::Timeout);
                }
            }
        }
        Err(ForwardError::NoEndpoint)
    }
}

/// Completes an upstream's response head (its hop-by-hop fields already
/// removed) for the client: the preview's `x-cutover-served-by` and a new
/// canary bucket's cookie in. (For a response of cutover's own client, the
/// map holds only these: the upstream's fields are in its body.)
/// An unregistered status code (`499`) goes out with the upstream's reason
/// phrase when hyper's client kept one, else with none (RFC 9112 §4 allows
/// it): hyper's server would write `<none>`. cutover's own server writes
/// none anyway.
fn no_made_up_reason(status: StatusCode, extensions: &mut http::Extensions) {
    if status.canonical_reason().is_none() && extensions.get::<hyper::ext::ReasonPhrase>().is_none() {
        extensions.insert(hyper::ext::ReasonPhrase::from_static(b""));
    }
}

fn finish_head(headers: &mut http::HeaderMap, pick: &modes::Pick, routed: &Routed, answered: Option<&Endpoint>) {
    if pick.preview {
        if let Some(v) = modes::served_by(&pick.target, answered) {
            headers.insert(modes::SERVED_BY.clone(), v);
        }
    }
    if let Some(bucket) = pick.new_bucket {
        if let Some(v) = modes::bucket_set_cookie(&routed.site.config.canary_cookie, bucket) {
            headers.append(SET_COOKIE, v);
        }
    }
}

/// `308` to the same host, path and query on the HTTPS listener.
fn https_redirect<B>(req: &Request<B>, https_port: Option<u16>) -> Option<modes::Refusal> {
    let port = https_port?;
    let host = request_host(req)?;
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = if port == 443 { format!("https://{host}{pq}") } else { format!("https://{host}:{port}{pq}") };
    Some(modes::Refusal {
        status: StatusCode::PERMANENT_REDIRECT,
        headers: vec![(http::header::LOCATION, HeaderValue::try_from(location).ok()?)],
        body: Bytes::new(),
    })
}

/// An answer cutover gives itself on behalf of a site mode, counted under
/// the `target` the request was meant for (if any) but not as its doing. The request's
/// body never goes upstream. Over HTTP/1.1, one still on the client's
/// connection is read and dropped first, as nginx discards it, so that the
/// connection can carry the next request; one that is large, waits for a
/// `100 Continue` or is slow to come instead closes the connection after the
/// answer, which says so.
async fn refused(
    r: modes::Refusal,
    site: Arc<SiteRoute>,
    target: Option<Arc<TargetPool>>,
    activity: Arc<Activity>,
    req: &mut Request<RequestBody>,
) -> Response<ProxyBody> {
    let keep_alive = !req.body().unread()
        || req.version() == Version::HTTP_2
        || (!req.headers().contains_key(EXPECT) && Box::pin(discard(req.body_mut())).await);
    let mut guard = RequestGuard::own_answer(site, target, Some(activity), req.method().clone(), req.uri().clone());
    guard.status = r.status.as_u16();
    let mut resp = Response::new(ProxyBody::full(r.body, Some(guard)));
    *resp.status_mut() = r.status;
    for (k, v) in r.headers {
        resp.headers_mut().insert(k, v);
    }
    if !keep_alive {
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// At most this much of a refused request's body is read and dropped ...
const DISCARD_MAX: u64 = 64 * 1024;
/// ... within this long.
const DISCARD_WAIT: Duration = Duration::from_secs(1);

/// Reads `body` to its end and drops it; `false` when it is (or turns out)
/// longer than [`DISCARD_MAX`], fails, or takes longer than [`DISCARD_WAIT`].
async fn discard(body: &mut RequestBody) -> bool {
    use http_body_util::BodyExt as _;
    if http_body::Body::size_hint(body).lower() > DISCARD_MAX {
        return false;
    }
    let read = async {
        let mut left = DISCARD_MAX;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            let Some(rest) = left.checked_sub(n) else { return false };
            left = rest;
        }
        true
    };
    tokio::time::timeout(DISCARD_WAIT, read).await.unwrap_or(false)
}

fn connect_failed(target: &TargetPool, endpoint: &Endpoint, e: &upstream::ConnectError) {
    tracing::warn!(target = %target.name, error = %e, "upstream connect failed");
    let kind = if e.is_timeout() { UpstreamErrorKind::Timeout } else { UpstreamErrorKind::Connect };
    target.metrics.upstream_error(kind);
    endpoint.mark_failed();
}

/// Whether an upstream response read by hyper's client can be passed on, as
/// cutover's own client decides: a `Transfer-Encoding` must be a single
/// `chunked` (hyper removes that coding; any other would reach the client
/// unmarked), with no `Content-Length` beside it (read two ways: RFC 9112
/// §6.3 says it ought to be an error).
fn framing_passes(headers: &http::HeaderMap) -> bool {
    let mut te = headers.get_all(TRANSFER_ENCODING).iter();
    let Some(first) = te.next() else { return true };
    te.next().is_none()
        && first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")
        && !headers.contains_key(CONTENT_LENGTH)
}

/// An endpoint that broke an exchange or did not answer in time is taken out
/// of rotation like one that cannot be connected to (passive health, SPEC §3),
/// until its active check passes again.
fn exchange_failed(target: &TargetPool, endpoint: &Endpoint, kind: UpstreamErrorKind) {
    target.metrics.upstream_error(kind);
    endpoint.mark_failed();
}

fn failure(e: ForwardError, target: &TargetPool, mut guard: RequestGuard) -> Response<ProxyBody> {
    let (status, msg) = match &e {
        ForwardError::NoEndpoint => (StatusCode::BAD_GATEWAY, "no upstream endpoint could be reached\n"),
        ForwardError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time\n"),
        ForwardError::Broken(_) => (StatusCode::BAD_GATEWAY, "the upstream connection failed\n"),
        ForwardError::BadBody(_) => (StatusCode::BAD_REQUEST, "the request body could not be read\n"),
        ForwardError::BodyStalled => (StatusCode::REQUEST_TIMEOUT, "the request body stopped arriving\n"),
        ForwardError::Drained => {
            (StatusCode::GATEWAY_TIMEOUT, "the draining target did not answer before its drain deadline\n")
        }
    };
    match &e {
        ForwardError::Broken(err) => tracing::warn!(target = %target.name, error = %err, "upstream exchange failed"),
        ForwardError::BadBody(err) => tracing::debug!(target = %target.name, error = %err, "bad request body"),
        ForwardError::Drained => {
            target.metrics.forced_stream_closes.inc();
            tracing::info!(target = %target.name, "drain deadline: request still waiting for its answer cut");
        }
        _ => {}
    }
    guard.status = status.as_u16();
    let mut resp = local(status, msg, guard);
    if matches!(e, ForwardError::BadBody(_) | ForwardError::BodyStalled) {
        // The rest of that body cannot be told from a next request.
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Rewrites the request head for the upstream (`streamed`: a body follows
/// that is still to be read, which may end with trailers); returns the fields
/// cutover adds (forwarded headers, request id), which are not in `parts` yet.
fn prepare(
    parts: &mut http::request::Parts,
    conn: &ClientConn,
    routed: &Routed,
    guard: &mut RequestGuard,
    upgrade: Option<&HeaderValue>,
    protocol: Protocol,
    streamed: bool,
) -> headers::Added {
    // An absolute-form target or an h2 :authority becomes the Host header.
    if let Some(authority) = parts.uri.authority() {
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(HOST, v);
        }
    }
    // Preview routing is cutover's business, and the token a secret. One pass
    // over the fields finds them, the fields the rules remove or replace, `TE`
    // and `Host`: cheaper than a lookup by name each, since most are rarely there.
    let preview = routed.site.config.preview.header.as_str();
    let mut scan = headers::Scan::default();
    let (mut named, mut token, mut wants_trailers, mut host) = (false, false, false, None);
    for (k, v) in &parts.headers {
        scan.note(k);
        named |= k.as_str().eq_ignore_ascii_case(preview);
        token |= *k == modes::PREVIEW_TOKEN;
        if *k == TE {
            wants_trailers |=
                v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        } else if *k == HOST && host.is_none() {
            host = Some(v.clone());
        }
    }
    // `Trailer` is hop-by-hop (SPEC §3), but trailers pass through, and hyper's
    // client sends only those `Trailer` declares: it stays on a body that can
    // carry trailers (chunked, or HTTP/2 without a length), and only there.
    let keep_trailer = scan.declares_trailers() && streamed && headers::trailers_fit(&parts.headers, parts.version);
    let declared: Vec<HeaderValue> = match keep_trailer {
        true => parts.headers.get_all(TRAILER).iter().cloned().collect(),
        false => Vec::new(),
    };
    // Fields `Connection` named are gone: what came is looked at again then (rare).
    let incoming =
        if scan.remove_hop_by_hop(&mut parts.headers) { headers::Present::of(&parts.headers) } else { scan.present };
    for v in declared {
        parts.headers.append(TRAILER, v);
    }
    if scan.underscore {
        headers::drop_underscore_names(&mut parts.headers);
    }
    if named {
        parts.headers.remove(preview);
    }
    if token {
        parts.headers.remove(&modes::PREVIEW_TOKEN);
    }
    let mut added = headers::Added::default();
    headers::add_forwarded(
        &mut parts.headers,
        incoming,
        &conn.peer_value,
        routed.trusted,
        conn.scheme,
        host.as_ref(),
        &mut added,
    );
    guard.set_request_id(headers::add_request_id(&mut parts.headers, incoming, &mut added));
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    match protocol {
        Protocol::H2 if upgrade.is_none() => {
            // h2 carries the host in :authority.
            let authority = host
                .as_ref()
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                .unwrap_or_else(|| Authority::from_static("upstream"));
            parts.uri =
                Uri::builder().scheme(Scheme::HTTP).authority(authority).path_and_query(pq).build().unwrap_or_default();
            parts.headers.remove(HOST);
            parts.version = Version::HTTP_2;
            // The client's `TE` is gone (hop-by-hop), but on this hop cutover
            // takes trailers and relays them, and gRPC servers want it said.
            if wants_trailers {
                parts.headers.insert(TE, HeaderValue::from_static("trailers"));
            }
        }
        _ => {
            parts.uri = Uri::from(pq);
            parts.version = Version::HTTP_11;
            // HTTP/1.1 requires `Host`; an HTTP/1.0 client may not have sent
            // one. Then the upstream is named by its address (nginx's default).
            if host.is_none() {
                let named = routed.target.endpoints.first().and_then(|e| HeaderValue::from_str(&e.address).ok());
                if let Some(address) = named {
                    parts.headers.insert(HOST, address);
                }
            }
            if let Some(protocol) = upgrade {
                parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(UPGRADE, protocol.clone());
            }
        }
    }
    added
}

/// The upgrade hyper's HTTP/1.1 server prepared for a request with an
/// `Upgrade` field: hyper hands the stream to it when it finishes with the
/// connection. Unless the request becomes a tunnel, it goes to the
/// connection, which takes its stream back from it ([`crate::handover`]).
struct PreparedUpgrade<'a> {
    upgrade: Option<OnUpgrade>,
    activity: &'a Activity,
}

impl<'a> PreparedUpgrade<'a> {
    fn of<B>(req: &mut Request<B>, activity: &'a Activity) -> Self {
        Self { upgrade: req.extensions_mut().remove::<OnUpgrade>(), activity }
    }
}

impl Drop for PreparedUpgrade<'_> {
    fn drop(&mut self) {
        if let Some(unused) = self.upgrade.take() {
            self.activity.keep_unused_upgrade(unused);
        }
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to. Never one that
/// offers `h2c` at all, even among others: an upstream that picked it would
/// take HTTP/2 requests through the tunnel, past every rule cutover applies
/// per request (h2c smuggling).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let protocol = req.headers().get(UPGRADE)?;
    let asks = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let h2c = protocol.to_str().map_or(true, |v| {
        v.split(',').any(|p| p.trim().split('/').next().is_some_and(|name| name.trim().eq_ignore_ascii_case("h2c")))
    });
    (asks && !h2c).then(|| protocol.clone())
}

/// The host a request is for: the absolute-form/`:authority` host, else `Host`, without port.
/// Public for the `router` fuzz target (`fuzz/harness.rs`), which routes as [`Proxy::handle`] does.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.host());
    }
    let host = req.headers().get(HOST)?.to_str().ok()?;
    // [`reject_bad_request`] let only `uri-host [ ":" port ]` through: no need to parse it again.
    let len = match host.strip_prefix('[') {
        Some(rest) => rest.find(']').map_or(host.len(), |i| i + 2),
        None => host.find(':').unwrap_or(host.len()),
    };
    Some(&host[..len])
}

/// The most header fields a request may have, over any protocol.
const MAX_HEADER_FIELDS: usize = 100;

/// The longest request target (path and query) accepted, as nginx's default buffers allow.
const MAX_TARGET_LEN: usize = 8 * 1024;

/// Requests refused before routing: framing that could be read two ways,
/// `CONNECT`, a request target that is no path or longer than 8 KiB (`414`),
/// an absolute-form target whose scheme is neither `http` nor `https`, or is
/// `https` on a plain HTTP/1 connection (`scheme`, the listener's), a missing,
/// repeated or conflicting `Host`.
pub fn reject_bad_request<B>(req: &Request<B>, scheme: &str) -> Option<(StatusCode, &'static str)> {
    if req.method() == Method::CONNECT {
        return Some((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n"));
    }
    let mut te = req.headers().get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Some((StatusCode::BAD_REQUEST, "only a single Transfer-Encoding: chunked is accepted\n"));
        }
    }
    // origin-form (`/path`), absolute-form (`http://host/path`), or `*` for OPTIONS.
    let path = req.uri().path();
    if req.uri().scheme().is_none() && !path.starts_with('/') && !(path == "*" && req.method() == Method::OPTIONS) {
        return Some((StatusCode::BAD_REQUEST, "the request target must be a path\n"));
    }
    if let Some(s) = req.uri().scheme() {
        if *s != Scheme::HTTP && *s != Scheme::HTTPS {
            return Some((StatusCode::BAD_REQUEST, "the request target's scheme must be http or https\n"));
        }
        // h2 carries :scheme on every request (a TLS-ending balancer may send
        // `https` over h2c); HTTP/1 has one only in an absolute-form target.
        if *s == Scheme::HTTPS && scheme == "http" && req.version() < Version::HTTP_2 {
            return Some((StatusCode::BAD_REQUEST, "an https request target on a plain HTTP connection\n"));
        }
    }
    // HTTP/1.1 heads stop at this many already (hyper's limit, and cutover's
    // own server's). HTTP/2 clients send each cookie as a field of its own
    // (RFC 9113 §8.2.3): those count as one.
    if req.headers().len() > MAX_HEADER_FIELDS {
        let cookies = req.headers().get_all(COOKIE).iter().count();
        if req.headers().len() - cookies.saturating_sub(1) > MAX_HEADER_FIELDS {
            return Some((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "more than 100 header fields\n"));
        }
    }
    if req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_TARGET_LEN {
        return Some((StatusCode::URI_TOO_LONG, "the request target is longer than 8 KiB\n"));
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    let (host, more) = (hosts.next(), hosts.next().is_some());
    if more {
        return Some((StatusCode::BAD_REQUEST, "more than one Host header\n"));
    }
    match (req.uri().authority(), host) {
        (None, None) if req.version() == Version::HTTP_11 => {
            return Some((StatusCode::BAD_REQUEST, "a Host header is required\n"));
        }
        (_, Some(h)) if !valid_host(h.as_bytes()) => {
            return Some((StatusCode::BAD_REQUEST, "the Host header is not a valid host\n"));
        }
        (Some(a), _) if !valid_host(a.as_str().as_bytes()) => {
            return Some((StatusCode::BAD_REQUEST, "the request target's authority is not a valid host\n"));
        }
        // h2: :authority and host must agree (RFC 9113 §8.3.1).
        (Some(a), Some(h))
            if req.version() == Version::HTTP_2 && !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) =>
        {
            return Some((StatusCode::BAD_REQUEST, ":authority and Host disagree\n"));
        }
        _ => {}
    }
    None
}

/// `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2.2): an IP literal in
/// brackets or a non-empty reg-name (IPv4 addresses are reg-names too), then
/// an optional colon and digits. No userinfo (`shop.test@evil.test` would be
/// routed by the wrong part), no other character. Checked byte by byte: this
/// runs on every request.
fn valid_host(h: &[u8]) -> bool {
    let (host, port) = match h.first() {
        Some(b'[') => match h.iter().position(|&b| b == b']') {
            Some(end) => (&h[..=end], &h[end + 1..]),
            None => return false,
        },
        _ => h.split_at(h.iter().position(|&b| b == b':').unwrap_or(h.len())),
    };
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty() && literal.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        _ => !host.is_empty() && host.iter().all(|&b| REG_NAME[usize::from(b)]),
    };
    host_ok && (port.is_empty() || (port[0] == b':' && port[1..].iter().all(u8::is_ascii_digit)))
}

/// The bytes of a reg-name (RFC 3986 §3.2.2: unreserved, sub-delims, `%`), as a table.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        b += 1;
    }
    table
};

/// A response made by cutover itself.
pub fn local(status: StatusCode, body: &'static str, guard: RequestGuard) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes()), Some(guard)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn hosts_are_uri_host_and_port() {
        for ok in ["shop.test", "shop.test:8080", "127.0.0.1:18190", "[::1]:80", "[::1]", "a-b_c~d", "shop.test:"] {
            assert!(valid_host(ok.as_bytes()), "{ok} refused");
        }
        let bad: [&[u8]; 13] = [
            b"",
            b"a b",
            b"shop\xff.test",
            b"shop.test@evil.test",
            b"shop.test:abc",
            b"shop.test:+80",
            b"[::1",
            b"[]",
            b"[::1]x",
            b"a:b:c",
            b":80",
            b"[zz]",
            b"shop/test",
        ];
        for h in bad {
            assert!(!valid_host(h), "{} accepted", h.escape_ascii());
        }
    }
}
