//! Routing admin requests to controller commands, and the JSON they answer with.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cutover_core::controller::{Actor, DeployRequest, ReloadError};
use cutover_core::{ControlError, Controller, SwitchRequest};
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

/// Largest admin request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// The admin API of one running cutover.
#[derive(Debug)]
pub struct Admin {
    /// The control plane every command goes to.
    controller: Arc<Controller>,
    /// Bearer token `/v1/` calls must carry, when set.
    token: Option<String>,
}

/// Body of `PUT /v1/sites/{site}/targets/{target}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTargetBody {
    endpoints: Vec<String>,
    #[serde(default)]
    version: Option<String>,
}

/// Body of `POST /v1/sites/{site}/switch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchBody {
    to: String,
    #[serde(default)]
    force: bool,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
    #[serde(default)]
    expect_version: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// Body of `PUT /v1/sites/{site}/mode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    #[serde(default)]
    read_only: Option<bool>,
    #[serde(default)]
    maintenance: Option<bool>,
}

/// Body of `POST /v1/sites/{site}/pause`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

/// The longest duration the API accepts (drain, pause, watch, healthy timeouts).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Refuses a duration longer than [`MAX_DURATION`] (`400`).
fn bounded(field: &str, d: Option<Duration>) -> Result<(), ApiError> {
    match d {
        Some(d) if d > MAX_DURATION => {
            Err(bad_value(field, &format!("{} is longer than a year", humantime::format_duration(d))))
        }
        _ => Ok(()),
    }
}

/// `400 invalid_request` for a bad value in `field` of the body.
fn bad_value(field: &str, message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", &format!("{field}: {message}"), json!({ "field": field }))
}

/// How long a paused site holds each request when the pause names no timeout.
const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Body of `POST /v1/sites/{site}/deploy`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    target: String,
    endpoints: Vec<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default, with = "humantime_serde")]
    watch: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    healthy_timeout: Option<Duration>,
}

/// Body of `PUT /v1/sites/{site}/weights`: percent by target; a target named
/// twice is an error (a JSON object would silently keep the last).
#[derive(Debug)]
struct Weights(BTreeMap<String, u8>);

impl<'de> Deserialize<'de> for Weights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Weights;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of target names and percentages")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Weights, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, u8>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("target {k:?} is named twice")));
                    }
                    out.insert(k, v);
                }
                Ok(Weights(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Body of `POST /v1/sites/{site}/rollback`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    force: bool,
}

/// Which admin request body [`decode_body`] decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `POST /v1/sites/{site}/switch`
    Switch,
    /// `POST /v1/sites/{site}/rollback` (an empty or all-whitespace body is allowed)
    Rollback,
    /// `PUT /v1/sites/{site}/targets/{target}`
    SetTarget,
}

/// Decodes `body` as the admin API does for `path_kind` (for fuzzing and
/// tests); `Err` holds the message a 400 answer would carry.
pub fn decode_body(path_kind: BodyKind, body: &[u8]) -> Result<(), String> {
    let decoded = match path_kind {
        BodyKind::Switch => parse::<SwitchBody>(body).map(drop),
        BodyKind::SetTarget => parse::<SetTargetBody>(body).map(drop),
        BodyKind::Rollback if body.iter().all(u8::is_ascii_whitespace) => Ok(()),
        BodyKind::Rollback => parse::<RollbackBody>(body).map(drop),
    };
    decoded.map_err(|e| e.body["error"]["message"].as_str().unwrap_or_default().to_string())
}

type Answer = Response<Full<Bytes>>;

/// An error answer: its status and JSON body.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: &str, details: serde_json::Value) -> Self {
        Self { status, body: json!({ "error": { "code": code, "message": message, "details": details } }) }
    }

    fn into_response(self) -> Answer {
        json_response(self.status, &self.body)
    }
}

impl Admin {
    /// An admin API driving `controller`, requiring `token` when set.
    pub fn new(controller: Arc<Controller>, token: Option<String>) -> Self {
        Self { controller, token }
    }

    /// Answers one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Answer
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        // HEAD is GET without the body (hyper leaves the body out).
        let method = if req.method() == Method::HEAD { Method::GET } else { req.method().clone() };
        match (&method, segments.as_slice()) {
            (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n", "text/plain; charset=utf-8"),
            (&Method::GET, ["metrics"]) => {
                text(StatusCode::OK, self.controller.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")
            }
            (_, ["v1", ..]) => {
                if let Some(refused) = self.forged_by_a_web_page(&req) {
                    return refused.into_response();
                }
                if !self.authorized(&req) {
                    let message = "a valid bearer token is required";
                    let mut r =
                        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message, json!({})).into_response();
                    r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    return r;
                }
                // An unknown site is 404 whatever the body holds (even one too large).
                if let ["v1", "sites", site, _, ..] = segments.as_slice() {
                    if let Err(e) = self.controller.site_exists(site).await {
                        return control_error(e).into_response();
                    }
                }
                let body = match read_body(req.into_body()).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                self.v1(&method, &segments[1..], &body).await
            }
            (_, ["healthz" | "metrics"]) => not_allowed(&method, "GET, HEAD"),
            _ => ApiError::new(StatusCode::NOT_FOUND, "not_found", &format!("no such endpoint: {path}"), json!({}))
                .into_response(),
        }
    }

    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else { return true };
        let given = req.headers().get(AUTHORIZATION).and_then(|v| bearer(v.as_bytes())).unwrap_or_default();
        same_secret(given, token.as_bytes())
    }

    /// Refuses what a web page could make a browser send (SPEC is silent;
    /// reliability.md D-3): a change whose `Origin` is not this machine, and,
    /// without a token (the listener is then on loopback), any call whose
    /// `Host` is not a loopback name (DNS rebinding).
    fn forged_by_a_web_page<B>(&self, req: &Request<B>) -> Option<ApiError> {
        let changes = !matches!(*req.method(), Method::GET | Method::HEAD);
        if let Some(origin) = req.headers().get(ORIGIN) {
            if changes && !origin.to_str().is_ok_and(is_loopback_origin) {
                let message = "changes are not accepted from a web page of another origin";
                return Some(ApiError::new(StatusCode::FORBIDDEN, "forbidden_origin", message, json!({})));
            }
        }
        if self.token.is_none() {
            let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            if !host.is_empty() && !is_loopback_host(host) {
                let message = "without a token the admin API answers only to a loopback Host";
                return Some(ApiError::new(StatusCode::FORBIDDEN, "forbidden_host", message, json!({ "host": host })));
            }
        }
        None
    }

    async fn v1(&self, method: &Method, segments: &[&str], body: &[u8]) -> Answer {
        let c = &self.controller;
        let result: Result<(StatusCode, serde_json::Value), ApiError> = match (method, segments) {
            (&Method::GET, ["sites"]) => Ok((StatusCode::OK, to_json(&c.sites().await))),
            (&Method::POST, ["reload"]) => reload(c).await,
            (&Method::GET, ["deployments", id]) => answer(c.deployment(id)),
            (&Method::PUT, ["sites", site, "mode"]) => match parse::<ModeBody>(body) {
                Ok(b) => answer(c.set_mode(site, b.read_only, b.maintenance, Actor::Api).await),
                Err(r) => Err(r),
            },
            (&Method::POST, ["sites", site, "pause"]) => {
                match parse_optional::<PauseBody>(body).and_then(|b| bounded("timeout", b.timeout).map(|()| b)) {
                    Ok(b) => answer(c.pause(site, b.timeout.unwrap_or(DEFAULT_PAUSE_TIMEOUT), Actor::Api).await),
                    Err(r) => Err(r),
                }
            }
            (&Method::POST, ["sites", site, "resume"]) => answer(c.resume(site, Actor::Api).await),
            (&Method::PUT, ["sites", site, "weights"]) => match parse::<Weights>(body) {
                Ok(w) => answer(c.set_weights(site, w.0, Actor::Api).await),
                Err(r) => Err(r),
            },
            (&Method::DELETE, ["sites", site, "weights"]) => answer(c.clear_weights(site, Actor::Api).await),
            (&Method::POST, ["sites", site, "deploy"]) => match parse::<DeployBody>(body).and_then(|b| {
                bounded("watch", b.watch)?;
                bounded("healthy_timeout", b.healthy_timeout)?;
                if b.healthy_timeout.is_some_and(|d| d.is_zero()) {
                    let message = "must be greater than zero (no endpoint is healthy before it was checked)";
                    return Err(bad_value("healthy_timeout", message));
                }
                Ok(b)
            }) {
                Ok(b) => {
                    let req = DeployRequest {
                        target: b.target,
                        endpoints: b.endpoints,
                        version: b.version,
                        watch: b.watch,
                        healthy_timeout: b.healthy_timeout,
                    };
                    match c.deploy(site, req).await {
                        Ok(id) => Ok((StatusCode::ACCEPTED, json!({ "id": id }))),
                        Err(e) => answer::<()>(Err(e)),
                    }
                }
                Err(r) => Err(r),
            },
            (&Method::GET, ["sites", site]) => answer(c.site(site).await),
            (&Method::GET, ["sites", site, "history"]) => answer(c.history(site).await),
            (&Method::PUT, ["sites", site, "targets", target]) => match parse::<SetTargetBody>(body) {
                Ok(b) => answer(c.set_target(site, target, b.endpoints, b.version, Actor::Api).await),
                Err(r) => Err(r),
            },
            (&Method::POST, ["sites", site, "switch"]) => {
                let checked = parse::<SwitchBody>(body).and_then(|b| {
                    bounded("drain_timeout", b.drain_timeout)?;
                    if b.expect_version.as_deref().is_some_and(|v| v.trim().is_empty()) {
                        return Err(bad_value("expect_version", "must not be empty (leave it out to expect none)"));
                    }
                    Ok(b)
                });
                match checked {
                    Ok(b) => {
                        let req = SwitchRequest {
                            to: b.to,
                            force: b.force,
                            drain_timeout: b.drain_timeout,
                            expect_version: b.expect_version,
                            reason: b.reason,
                            watch: None,
                        };
                        answer(c.switch(site, req, Actor::Api).await)
                    }
                    Err(r) => Err(r),
                }
            }
            (&Method::POST, ["sites", site, "rollback"]) => {
                let b =
                    if body.iter().all(u8::is_ascii_whitespace) { Ok(RollbackBody::default()) } else { parse(body) };
                match b {
                    Ok(b) => answer(c.rollback(site, b.force, Actor::Api).await),
                    Err(r) => Err(r),
                }
            }
            (_, ["reload"]) => return not_allowed(method, "POST"),
            (_, ["deployments", _] | ["sites"] | ["sites", _] | ["sites", _, "history"]) => {
                return not_allowed(method, "GET, HEAD")
            }
            (_, ["sites", _, "mode"] | ["sites", _, "targets", _]) => return not_allowed(method, "PUT"),
            (_, ["sites", _, "weights"]) => return not_allowed(method, "PUT, DELETE"),
            (_, ["sites", _, "deploy" | "pause" | "resume" | "switch" | "rollback"]) => {
                return not_allowed(method, "POST")
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: /v1/{}", segments.join("/")),
                json!({}),
            )),
        };
        match result {
            Ok((status, value)) => json_response(status, &value),
            Err(e) => e.into_response(),
        }
    }
}

/// `POST /v1/reload`: every error of an invalid file, and nothing changed.
async fn reload(c: &Controller) -> Result<(StatusCode, serde_json::Value), ApiError> {
    match c.reload_file().await {
        Ok(outcome) => Ok((StatusCode::OK, to_json(&outcome))),
        Err(ReloadError::Invalid(errors)) => {
            let list: Vec<_> = errors
                .errors
                .iter()
                .map(|e| json!({ "path": e.path, "value": e.value, "message": e.message }))
                .collect();
            let file = errors.file.clone().unwrap_or_default();
            let message = format!("{file}: {} error(s); nothing changed", list.len());
            Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", &message, json!({ "errors": list })))
        }
        Err(e @ ReloadError::NoFile) => {
            Err(ApiError::new(StatusCode::CONFLICT, "no_config_file", &e.to_string(), json!({})))
        }
        Err(ReloadError::Persist(e)) => Err(ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, body: e.to_json() }),
    }
}

fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn answer<T: Serialize>(r: Result<T, ControlError>) -> Result<(StatusCode, serde_json::Value), ApiError> {
    match r {
        Ok(v) => Ok((StatusCode::OK, to_json(&v))),
        Err(e) => Err(control_error(e)),
    }
}

fn control_error(e: ControlError) -> ApiError {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    ApiError { status, body: e.to_json() }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every body is an object (serde would also take a struct as an array of its fields).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let message = "request body: expected a JSON object";
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message, json!({})));
    }
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.to_string().starts_with("unknown field") { "unknown_field" } else { "invalid_json" };
        ApiError::new(StatusCode::BAD_REQUEST, code, &format!("request body: {e}"), json!({}))
    })
}

/// Like [`parse`], but an empty body means the defaults.
fn parse_optional<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body)
    }
}

async fn read_body<B>(body: B) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("request body: larger than {MAX_BODY} bytes"),
            json!({ "limit": MAX_BODY }),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            &format!("request body: {e}"),
            json!({ "limit": MAX_BODY }),
        )),
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Answer {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>, content_type: &'static str) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `405` naming the methods `allow`ed here (RFC 9110 §15.5.6).
fn not_allowed(method: &Method, allow: &'static str) -> Answer {
    let message = format!("{method} is not allowed here (allowed: {allow})");
    let mut r =
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", &message, json!({ "allow": allow }))
            .into_response();
    r.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Whether `given` is `secret`, in a time that depends on the secret's length
/// only: `subtle`'s slice comparison returns at once when the lengths differ,
/// which would tell a caller the token's length.
fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut same = given.len().ct_eq(&secret.len());
    for (i, byte) in secret.iter().enumerate() {
        same &= given.get(i).copied().unwrap_or(0).ct_eq(byte);
    }
    same.into()
}

/// The token of an `Authorization: Bearer TOKEN` value (the scheme in any case, RFC 9110 §11.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii_start())
}

/// `http://127.0.0.1:9901`, `http://localhost`, `http://[::1]:9901`, ...
fn is_loopback_origin(origin: &str) -> bool {
    let rest = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    rest.is_some_and(|host| !host.contains('/') && is_loopback_host(host))
}

/// A `Host` (with or without port) naming this machine: a loopback IP or `localhost`.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host
            .rsplit_once(':')
            .map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host }),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn only_the_secret_itself_is_the_secret() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        for given in [&b""[..], b"s3cre", b"s3cret!", b"s3cres", b"s3cret\0", b"S3cret"] {
            assert!(!same_secret(given, b"s3cret"), "{given:?}");
        }
        assert!(!same_secret(b"", b"\0"));
    }
}
