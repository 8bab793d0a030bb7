//! The life of one request, in order:
//!
//! 1. `route`: find the site by `Host` (or the absolute-form authority) with
//!    one snapshot load, and clone out the live target.
//! 2. `prepare`: rewrite the head for the upstream (origin-form URI, `Host`,
//!    hop-by-hop removal, forwarded headers, request id).
//! 3. `send`: pick an endpoint (least outstanding, healthy first), take a
//!    pooled connection or open one; a connection that cannot be made is
//!    retried on another endpoint, since nothing was sent.
//! 4. The response streams back inside a [`ProxyBody`] that keeps the
//!    request in flight until its last byte.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use cutover_config::Config;
use cutover_core::routing::{RoutingTable, SiteRoute, TargetPool};
use cutover_core::upstream::{self, Sender, UpstreamBody};
use cutover_core::Endpoint;
use cutover_metrics::UpstreamErrorKind;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::body::{ProxyBody, RequestGuard};
use crate::headers;

/// Attempts at getting a connection for one request (endpoints and stale pooled connections).
const MAX_ATTEMPTS: usize = 4;

/// Everything the data plane needs, shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    /// The routing snapshot, read once per request.
    table: Arc<ArcSwap<RoutingTable>>,
    /// Peers whose forwarded headers are trusted.
    trusted_proxies: Vec<IpNet>,
    /// Time to open an upstream connection.
    connect_timeout: Duration,
    /// Time for an upstream to answer with a response head.
    response_timeout: Duration,
}

/// What the proxy knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ClientConn {
    /// The peer's address.
    pub peer: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
}

/// Why a request could not be forwarded.
#[derive(Debug)]
enum ForwardError {
    /// No endpoint accepted a connection.
    NoEndpoint,
    /// The upstream did not answer within the response timeout.
    Timeout,
    /// The upstream broke the exchange after the request was sent.
    Broken(hyper::Error),
}

impl Proxy {
    /// A data plane reading `table`, with limits and trust from `config`.
    pub fn new(table: Arc<ArcSwap<RoutingTable>>, config: &Config) -> Self {
        Self {
            table,
            trusted_proxies: config.trusted_proxies.clone(),
            connect_timeout: config.limits.upstream_connect_timeout,
            response_timeout: config.limits.upstream_response_timeout,
        }
    }

    /// Handles one client request; never fails (errors become responses).
    pub async fn handle(&self, req: Request<Incoming>, conn: ClientConn) -> Result<Response<ProxyBody>, Infallible> {
        let method = req.method().clone();
        let uri = req.uri().clone();
        if let Some((status, message)) = reject_bad_request(&req) {
            let mut guard = RequestGuard::new(None, method, uri);
            guard.status = status.as_u16();
            // A request that could be read two ways leaves the connection in doubt: close it.
            let mut resp = local(status, message, guard);
            resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            return Ok(resp);
        }
        let Some((site, target)) = self.route(&req) else {
            let mut guard = RequestGuard::new(None, method, uri);
            guard.status = 404;
            return Ok(local(StatusCode::NOT_FOUND, "no site is configured for this host\n", guard));
        };
        let mut guard = RequestGuard::new(Some((site, target.clone())), method, uri);
        let req = self.prepare(req, conn, &mut guard);
        Ok(match self.send(&target, req, &mut guard).await {
            Ok((resp, sender, endpoint)) => {
                let (mut parts, body) = resp.into_parts();
                headers::remove_hop_by_hop(&mut parts.headers);
                guard.status = parts.status.as_u16();
                Response::from_parts(parts, ProxyBody::upstream(body, sender, endpoint, guard))
            }
            Err(e) => {
                let (status, msg) = match &e {
                    ForwardError::NoEndpoint => (StatusCode::BAD_GATEWAY, "no upstream endpoint could be reached\n"),
                    ForwardError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time\n"),
                    ForwardError::Broken(_) => (StatusCode::BAD_GATEWAY, "the upstream connection failed\n"),
                };
                if let ForwardError::Broken(err) = &e {
                    tracing::warn!(target = %target.name, error = %err, "upstream exchange failed");
                }
                guard.status = status.as_u16();
                local(status, msg, guard)
            }
        })
    }

    /// Finds the site and target for `req` with one snapshot load.
    fn route(&self, req: &Request<Incoming>) -> Option<(Arc<SiteRoute>, Arc<TargetPool>)> {
        let host = request_host(req)?;
        let table = self.table.load();
        let site = table.site_for_host(host)?;
        Some((site.clone(), site.live.clone()))
    }

    /// Rewrites the request head for the upstream.
    fn prepare(&self, req: Request<Incoming>, conn: ClientConn, guard: &mut RequestGuard) -> Request<UpstreamBody> {
        let (mut parts, body) = req.into_parts();
        // An absolute-form target or an h2 :authority becomes the Host header.
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = Uri::from(pq);
        }
        parts.version = Version::HTTP_11;
        headers::remove_hop_by_hop(&mut parts.headers);
        let trusted = self.trusted_proxies.iter().any(|n| n.contains(&conn.peer.ip()));
        let host = parts.headers.get(HOST).cloned();
        headers::set_forwarded(&mut parts.headers, conn.peer.ip(), trusted, conn.scheme, host.as_ref());
        guard.set_request_id(headers::ensure_request_id(&mut parts.headers));
        Request::from_parts(parts, body)
    }

    /// Sends `req` to an endpoint of `target`, retrying connections that could not be made.
    async fn send(
        &self,
        target: &TargetPool,
        mut req: Request<UpstreamBody>,
        guard: &mut RequestGuard,
    ) -> Result<(Response<Incoming>, Sender, Arc<Endpoint>), ForwardError> {
        let mut failed = Vec::with_capacity(0);
        for _ in 0..MAX_ATTEMPTS {
            let idx = target.pick(&failed).ok_or(ForwardError::NoEndpoint)?;
            let endpoint = &target.endpoints[idx];
            let mut sender = match endpoint.pool.checkout() {
                Some(s) => s,
                None => match upstream::connect(&endpoint.address, self.connect_timeout).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(target = %target.name, error = %e, "upstream connect failed");
                        target.metrics.upstream_error(UpstreamErrorKind::Connect);
                        endpoint.mark_failed();
                        failed.push(idx);
                        continue;
                    }
                },
            };
            if sender.ready().await.is_err() {
                continue; // a pooled connection that closed meanwhile: nothing was sent
            }
            guard.set_endpoint(endpoint.clone());
            let sent = tokio::time::timeout(self.response_timeout, sender.try_send_request(req)).await;
            match sent {
                Ok(Ok(resp)) => return Ok((resp, sender, endpoint.clone())),
                Ok(Err(mut e)) => match e.take_message() {
                    // Not written at all: safe to try again on another connection.
                    Some(back) => req = back,
                    None => {
                        target.metrics.upstream_error(UpstreamErrorKind::Reset);
                        return Err(ForwardError::Broken(e.into_error()));
                    }
                },
                Err(_) => {
                    target.metrics.upstream_error(UpstreamErrorKind::Timeout);
                    return Err(ForwardError::Timeout);
                }
            }
        }
        Err(ForwardError::NoEndpoint)
    }
}

/// The host a request is for: the absolute-form/`:authority` host, else `Host`, without port.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(a) = req.uri().authority() {
        return Some(a.host());
    }
    let host = req.headers().get(HOST)?.to_str().ok()?;
    let authority: Authority = host.parse().ok()?;
    // `Authority::host` borrows from the parsed value; slice the original instead.
    let len = authority.host().len();
    Some(&host[..len])
}

/// Requests refused before routing: framing that could be read two ways, CONNECT.
fn reject_bad_request<B>(req: &Request<B>) -> Option<(StatusCode, &'static str)> {
    if req.method() == Method::CONNECT {
        return Some((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n"));
    }
    let mut te = req.headers().get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Some((StatusCode::BAD_REQUEST, "only a single Transfer-Encoding: chunked is accepted\n"));
        }
    }
    if req.version() == Version::HTTP_11
        && req.uri().authority().is_none()
        && req.headers().get_all(HOST).iter().count() != 1
    {
        return Some((StatusCode::BAD_REQUEST, "exactly one Host header is required\n"));
    }
    None
}

/// A response made by cutover itself.
pub fn local(status: StatusCode, body: &'static str, guard: RequestGuard) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes()), Some(guard)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
