//! Site modes at the edge (SPEC §3): which target a request goes to
//! (preview, sticky canary, live) and the answers cutover gives itself
//! (preview refusals, maintenance, read-only). Pause is in `cutover_core::pause`.

use std::sync::Arc;

use bytes::Bytes;
use cutover_core::routing::{SiteRoute, TargetPool};
use cutover_core::Endpoint;
use http::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, COOKIE, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use subtle::ConstantTimeEq;

/// The header a preview request carries its token in.
pub static PREVIEW_TOKEN: HeaderName = HeaderName::from_static("x-cutover-preview-token");
/// Marks answers refused because the site or target is read-only.
pub static READ_ONLY: HeaderName = HeaderName::from_static("x-cutover-read-only");
/// Names the target (and version) that answered a preview request.
pub static SERVED_BY: HeaderName = HeaderName::from_static("x-cutover-served-by");

/// The target a request goes to, and why.
#[derive(Debug)]
pub struct Pick {
    /// The target.
    pub target: Arc<TargetPool>,
    /// A preview request (header or preview host): never held, never falls back.
    pub preview: bool,
    /// A canary bucket newly given to this client (to set in its cookie).
    pub new_bucket: Option<u8>,
}

/// An answer cutover gives itself instead of forwarding.
#[derive(Debug)]
pub struct Refusal {
    /// Status.
    pub status: StatusCode,
    /// Headers to set.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body.
    pub body: Bytes,
}

impl Refusal {
    fn text(status: StatusCode, body: &'static str) -> Self {
        let ct = HeaderValue::from_static("text/plain; charset=utf-8");
        Self { status, headers: vec![(CONTENT_TYPE, ct)], body: Bytes::from_static(body.as_bytes()) }
    }
}

/// Chooses the target: a preview (by preview host or header) — which must
/// exist, be healthy and carry the token, or is refused, never the live
/// target — else the sticky canary split, else the live target.
pub fn pick<B>(site: &SiteRoute, preview_host: Option<&str>, req: &Request<B>) -> Result<Pick, Refusal> {
    let preview = &site.config.preview;
    let by_header = || single(req.headers().get_all(preview.header.as_str())).map(|v| v.and_then(|v| v.to_str().ok()));
    let named = match preview_host {
        Some(host) => Some(Some(host)),
        None if preview.enabled => by_header(),
        None => None,
    };
    if let Some(name) = named {
        // Named twice (or not in text), it names no one target: refused, never guessed.
        let Some(name) = name else {
            return Err(Refusal::text(StatusCode::SERVICE_UNAVAILABLE, "the preview header must name one target\n"));
        };
        if let Some(token) = &preview.token {
            let given = single(req.headers().get_all(&PREVIEW_TOKEN)).flatten().map(HeaderValue::as_bytes);
            if !bool::from(given.unwrap_or_default().ct_eq(token.as_bytes())) {
                return Err(Refusal::text(StatusCode::FORBIDDEN, "preview needs a valid x-cutover-preview-token\n"));
            }
        }
        let Some(target) = site.target(name.trim()) else {
            return Err(Refusal::text(StatusCode::SERVICE_UNAVAILABLE, "the previewed target does not exist\n"));
        };
        if !target.has_healthy_endpoint() {
            return Err(Refusal::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the previewed target has no healthy endpoint\n",
            ));
        }
        return Ok(Pick { target: target.clone(), preview: true, new_bucket: None });
    }
    if let Some(canary) = &site.canary {
        let (bucket, new_bucket) = match bucket_cookie(req, &site.config.canary_cookie) {
            Some(b) => (b, None),
            None => {
                let b = (crate::upgrade::random_u64() % 100) as u8;
                (b, Some(b))
            }
        };
        return Ok(Pick { target: canary.target(bucket).clone(), preview: false, new_bucket });
    }
    Ok(Pick { target: site.live.clone(), preview: false, new_bucket: None })
}

/// The one value of a field: `None` when it is absent, `Some(None)` when it
/// came more than once.
fn single(all: http::header::GetAll<'_, HeaderValue>) -> Option<Option<&HeaderValue>> {
    let mut values = all.iter();
    let first = values.next()?;
    Some(values.next().is_none().then_some(first))
}

/// The client's canary bucket (0–99) from its cookie.
fn bucket_cookie<B>(req: &Request<B>, name: &str) -> Option<u8> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse::<u8>().ok())
        .filter(|b| *b < 100)
}

/// The `Set-Cookie` that keeps a client in `bucket` while weights stand.
pub fn bucket_set_cookie(name: &str, bucket: u8) -> Option<HeaderValue> {
    HeaderValue::try_from(format!("{name}={bucket}; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax")).ok()
}

/// `x-cutover-served-by: TARGET VERSION`: the version the target declares,
/// else the one `answered` (the endpoint that answered, if one did) reports,
/// else the one any of its endpoints reports.
pub fn served_by(target: &TargetPool, answered: Option<&Endpoint>) -> Option<HeaderValue> {
    let version = target
        .version
        .clone()
        .or_else(|| answered.and_then(Endpoint::reported_version))
        .or_else(|| target.endpoints.iter().find_map(|e| e.reported_version()));
    let value = match version {
        Some(v) => format!("{} {v}", target.name),
        None => target.name.clone(),
    };
    HeaderValue::try_from(value).ok()
}

/// Maintenance and read-only answers; `None` when the request may go on.
/// `read_only.allow_paths` pass both.
pub fn refusal<B>(site: &SiteRoute, target: &TargetPool, req: &Request<B>) -> Option<Refusal> {
    let read_only = site.read_only || target.read_only;
    if !site.maintenance && !read_only {
        return None;
    }
    let path = req.uri().path();
    if site.allowed_path(path) {
        return None;
    }
    let retry = retry_after(site);
    if site.maintenance {
        let headers = vec![(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")), (RETRY_AFTER, retry)];
        return Some(Refusal { status: StatusCode::SERVICE_UNAVAILABLE, headers, body: site.maintenance_page.clone() });
    }
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let secs = site.config.read_only.retry_after.as_secs_f64().ceil() as u64;
    let wants_json = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/json") || v.contains("+json"));
    let (ct, body) = if wants_json {
        let body = format!(
            "{{\"error\":{{\"code\":\"read_only\",\"message\":\"this site is read-only for now; writes are refused\",\"retry_after\":{secs}}}}}\n"
        );
        ("application/json", body)
    } else {
        (
            "text/plain; charset=utf-8",
            format!("This site is read-only for now: writes are refused. Retry in {secs} s.\n"),
        )
    };
    let headers = vec![
        (CONTENT_TYPE, HeaderValue::from_static(ct)),
        (RETRY_AFTER, retry),
        (READ_ONLY.clone(), HeaderValue::from_static("1")),
    ];
    Some(Refusal { status: StatusCode::SERVICE_UNAVAILABLE, headers, body: Bytes::from(body) })
}

/// `Retry-After` in whole seconds (SPEC §2 `read_only.retry_after`).
pub fn retry_after(site: &SiteRoute) -> HeaderValue {
    let secs = site.config.read_only.retry_after.as_secs_f64().ceil() as u64;
    HeaderValue::from(secs)
}
