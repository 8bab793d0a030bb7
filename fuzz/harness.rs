//! The bodies of the fuzz targets, as plain functions.
//!
//! Included with `#[path]` both by the cargo-fuzz targets in
//! `fuzz/fuzz_targets/` and by the root package's `tests/fuzz_corpus.rs`,
//! which replays the seed corpus under `cargo test`: the replay runs exactly
//! the code the fuzzer runs. Every function must return normally for every
//! input; a panic (including a failed invariant below) is a finding.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cutover_admin::api::{decode_body, BodyKind};
use cutover_config::{Config, ConfigErrors};
use cutover_core::pause::PauseGate;
use cutover_core::routing::Settings;
use cutover_core::state::{FileStore, State, StateStore, STATE_VERSION};
use cutover_core::upstream::Pool;
use cutover_core::{Endpoint, Health, RoutingTable, SiteRoute, TargetPool};
use cutover_proxy::headers;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, RETRY_AFTER};
use http::uri::PathAndQuery;
use http::{Method, Request, StatusCode, Uri, Version};
use tokio_util::sync::CancellationToken;

/// The base directory relative paths in a fuzzed configuration resolve
/// against; it does not exist, so no relative path can be read.
pub const CONFIG_BASE: &str = "/nonexistent-base";

/// Config target: the bytes as a YAML configuration file.
///
/// Returns `None` for input that is not UTF-8 (a file that is not UTF-8 never
/// reaches the parser) or that names a special filesystem: the parser really
/// reads the TLS and token files a configuration names, and an absolute path
/// such as `/dev/zero` or `/dev/stdin` would hang the fuzzer, not find a bug.
pub fn config(data: &[u8]) -> Option<Result<Config, ConfigErrors>> {
    let text = std::str::from_utf8(data).ok()?;
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return None;
    }
    let result = cutover_config::parse(text, Path::new(CONFIG_BASE));
    if let Err(e) = &result {
        assert!(!e.errors.is_empty(), "parse failed without reporting an error");
        // Rendering the errors must not panic either.
        let _ = e.to_string();
    }
    Some(result)
}

/// What [`request_head`] decoded and what the proxy made of it.
#[derive(Debug)]
pub struct HeadOutcome {
    /// The request as decoded, before any sanitising.
    pub request: Request<()>,
    /// `reject_bad_request`'s answer for it.
    pub rejected: Option<(StatusCode, &'static str)>,
    /// The header map after the same steps the proxy applies before forwarding.
    pub sanitised: http::HeaderMap,
}

/// Request-head target: the bytes as a tiny ad-hoc request head.
///
/// Format (lines split on `\n`, one trailing `\r` dropped):
/// - line 1: `METHOD URI VERSION` (split on the first and last space);
///   `VERSION` is `HTTP/0.9`, `HTTP/1.0`, `HTTP/1.1`, `HTTP/2` or `HTTP/3`;
///   an invalid method, URI or version falls back to `GET`, `/`, `HTTP/1.1`;
/// - `@peer ADDR`: the client address (default `192.0.2.1`);
/// - `@trusted`: the client is a trusted proxy; `@https`: it came over TLS;
/// - any other line: `name:value` (one space after the colon is dropped);
///   names and values are raw bytes, invalid ones are skipped.
///
/// The request then goes through `reject_bad_request` and, whatever its
/// verdict, through the header steps of `forward::prepare`, after which a few
/// invariants are checked.
pub fn request_head(data: &[u8]) -> HeadOutcome {
    let mut lines = data.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let (mut method, mut uri, mut version) = (Method::GET, Uri::from_static("/"), Version::HTTP_11);
    if let Some(first) = lines.next() {
        let (m, rest) = split_once(first, b' ');
        let (u, v) = rest.map(|r| rsplit_once(r, b' ')).unwrap_or((b"", None));
        method = Method::from_bytes(m).unwrap_or(method);
        uri = Uri::try_from(u).unwrap_or(uri);
        version = match v.unwrap_or_default() {
            b"HTTP/0.9" => Version::HTTP_09,
            b"HTTP/1.0" => Version::HTTP_10,
            b"HTTP/2" | b"HTTP/2.0" => Version::HTTP_2,
            b"HTTP/3" | b"HTTP/3.0" => Version::HTTP_3,
            _ => Version::HTTP_11,
        };
    }
    let (mut peer, mut trusted, mut proto) = (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), false, "http");
    let mut fields = Vec::new();
    for line in lines {
        if let Some(addr) = line.strip_prefix(b"@peer ") {
            if let Some(ip) = std::str::from_utf8(addr).ok().and_then(|a| a.trim().parse().ok()) {
                peer = ip;
            }
        } else if line == b"@trusted" {
            trusted = true;
        } else if line == b"@https" {
            proto = "https";
        } else if let (name, Some(value)) = split_once(line, b':') {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                fields.push((n, v));
            }
        }
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    for (name, value) in fields {
        request.headers_mut().append(name, value);
    }

    let rejected = cutover_proxy::forward::reject_bad_request(&request, "http");
    if let Some((status, message)) = rejected {
        assert!(status.is_client_error(), "rejected with {status}");
        assert!(!message.is_empty());
    }

    // The header steps of `forward::prepare`, in its order (it later re-adds
    // `TE: trailers` when the client asked for trailers; that is not sanitising).
    let mut h = request.headers().clone();
    if let Some(authority) = request.uri().authority() {
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            h.insert(HOST, v);
        }
    }
    let hosts_before: Vec<HeaderValue> = h.get_all(HOST).iter().cloned().collect();
    let lengths_before: Vec<HeaderValue> = h.get_all(CONTENT_LENGTH).iter().cloned().collect();
    headers::remove_hop_by_hop(&mut h);
    headers::drop_underscore_names(&mut h);
    let host = h.get(HOST).cloned();
    headers::set_forwarded(&mut h, peer, trusted, proto, host.as_ref());
    let id = headers::ensure_request_id(&mut h);

    // Invariants of the sanitised head.
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "http2-settings",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(!h.contains_key(name), "hop-by-hop header {name} survived");
    }
    assert!(h.keys().all(|k| !k.as_str().contains('_')), "an underscore name survived");
    assert!(h.get_all(HOST).iter().eq(hosts_before.iter()), "Host changed");
    assert!(h.get_all(CONTENT_LENGTH).iter().eq(lengths_before.iter()), "Content-Length changed");
    let xff = h.get(&headers::X_FORWARDED_FOR).expect("X-Forwarded-For is always set");
    assert!(xff.as_bytes().ends_with(peer.to_string().as_bytes()), "X-Forwarded-For does not end with the peer");
    assert!(h.contains_key(&headers::X_FORWARDED_PROTO), "X-Forwarded-Proto is always set");
    assert_eq!(
        h.get(&headers::X_REQUEST_ID).map(|v| v.as_bytes()),
        Some(id.as_bytes()),
        "the returned request id is not the header's"
    );
    let id = id.as_bytes();
    assert!(!id.is_empty() && id.len() <= 200 && id.iter().all(u8::is_ascii_graphic), "bad request id {id:?}");

    HeadOutcome { request, rejected, sanitised: h }
}

/// Admin-body target: the bytes as the body of each of the three admin
/// requests that carry JSON; returns the decoding results in the order
/// switch, rollback, set-target.
pub fn admin_body(data: &[u8]) -> [Result<(), String>; 3] {
    let results = [BodyKind::Switch, BodyKind::Rollback, BodyKind::SetTarget].map(|kind| decode_body(kind, data));
    for r in &results {
        if let Err(message) = r {
            assert!(!message.is_empty(), "a refused body without a message");
        }
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        assert!(results[1].is_ok(), "an empty rollback body is allowed");
    }
    results
}

/// State-file target: the bytes as the state file cutover reads at start
/// (`FileStore::load`, the function `serve` calls), written to a scratch file
/// of this process (`$TMPDIR/cutover-fuzz-state-PID-N/`, removed after).
///
/// Returns the state read, or the error message. Invariants: the file is left
/// byte for byte as it was; an error names the file and `--reset-state`; a
/// state read has the supported version, a live target for every site and
/// weights adding up to 100, and saving it then reading it back gives it again.
pub fn state_file(data: &[u8]) -> Result<State, String> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("cutover-fuzz-state-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let path = dir.join("state.json");
    std::fs::write(&path, data).expect("scratch file");
    let result = FileStore::new(&path).load();
    assert_eq!(std::fs::read(&path).expect("the file is still there"), data, "load changed the file");
    let result = match result {
        Ok(Some(state)) => {
            assert_eq!(state.version, STATE_VERSION);
            for (name, site) in &state.sites {
                assert!(!site.live.is_empty(), "site {name:?} read without a live target");
                if let Some(w) = &site.weights {
                    assert_eq!(w.values().map(|&p| u32::from(p)).sum::<u32>(), 100, "site {name:?}: weights");
                }
            }
            let again = dir.join("again.json");
            FileStore::new(&again).save(&state).expect("a state read can be saved");
            let read_back = FileStore::new(&again).load().expect("a saved state can be read");
            assert_eq!(read_back.as_ref(), Some(&state), "the state changed on its way through a save");
            Ok(state)
        }
        Ok(None) => panic!("an existing file was read as no state"),
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains(&path.display().to_string()), "the error names no file: {message}");
            assert!(message.contains("--reset-state"), "the error gives no remedy: {message}");
            Err(message)
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The fixed configuration the `router` target routes against (SPEC §2):
/// `shop` (read-only, preview header and preview hosts, an IPv6 and an IPv4
/// host), `blog` (maintenance, a preview header with a token, a punycode
/// host), `api` (its live target a `read_only: true` clone) and `fallback`
/// (`*`). `*.` wildcards do not exist: the configuration refuses them.
pub const ROUTER_CONFIG: &str = "\
listen:
  http: 127.0.0.1:18080
sites:
  - name: shop
    hosts: [Shop.Example.COM, localhost, \"[::1]\", 127.0.0.1]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:5001], version: v1 }
      green: { endpoints: [127.0.0.1:5002], version: v2 }
      gray: { endpoints: [127.0.0.1:5003] }
    read_only:
      allow_paths: [/up, /api/search/*]
    preview:
      hosts: { green.shop.example.com: green, gray.shop.example.com: gray, blue.shop.example.com.: blue }
  - name: blog
    hosts: [blog.example.com, www.blog.example.com., xn--bcher-kva.example]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:5011] }
      green: { endpoints: [127.0.0.1:5012] }
    read_only:
      allow_paths: [/healthz, /static/*]
    preview:
      header: X-Preview
  - name: api
    hosts: [api.example.com]
    live: clone
    targets:
      clone: { endpoints: [127.0.0.1:5021], read_only: true }
      main: { endpoints: [127.0.0.1:5022] }
    read_only:
      allow_paths: [/v1/status, /hooks/*]
  - name: fallback
    hosts: [\"*\"]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:5031] }
";

/// The token `blog`'s preview requests must carry (set after parsing: the
/// configuration would read it from the environment).
pub const ROUTER_PREVIEW_TOKEN: &str = "s3cret-preview";

/// The fixed routing snapshot of [`ROUTER_CONFIG`], built once per process
/// the way `Controller::publish` builds one: `shop` is read-only, `blog` in
/// maintenance, every endpoint healthy but those of `shop`'s `gray` target.
pub fn router_table() -> &'static RoutingTable {
    static TABLE: std::sync::OnceLock<RoutingTable> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let config = cutover_config::parse(ROUTER_CONFIG, Path::new(CONFIG_BASE)).expect("the router config is valid");
        let metrics = cutover_metrics::Metrics::new();
        let sites = config
            .sites
            .into_iter()
            .map(|mut site| {
                if site.name == "blog" {
                    site.preview.token = Some(ROUTER_PREVIEW_TOKEN.into());
                }
                let targets: Vec<Arc<TargetPool>> = site
                    .targets
                    .iter()
                    .map(|(tname, target)| {
                        let endpoints = target
                            .endpoints
                            .iter()
                            .map(|addr| {
                                let gauge = metrics.endpoint_healthy.with_label_values(&[&site.name, tname, addr]);
                                let e = Endpoint::new(addr.clone(), gauge, Pool::new(1, Duration::from_secs(1)));
                                e.set_health(if tname == "gray" { Health::Unhealthy } else { Health::Healthy });
                                Arc::new(e)
                            })
                            .collect();
                        Arc::new(TargetPool {
                            name: tname.clone(),
                            version: target.version.clone(),
                            endpoints,
                            read_only: target.read_only,
                            protocol: target.protocol,
                            metrics: metrics.target(&site.name, tname),
                            drain: CancellationToken::new(),
                        })
                    })
                    .collect();
                let live = targets.iter().find(|t| t.name == site.live).cloned().expect("live target");
                let pause = Arc::new(PauseGate::new(metrics.held_requests.with_label_values(&[&site.name])));
                Arc::new(SiteRoute {
                    read_only: site.name == "shop",
                    maintenance: site.name == "blog",
                    maintenance_page: bytes::Bytes::from_static(b"<h1>maintenance</h1>"),
                    config: Arc::new(site),
                    live,
                    targets,
                    canary: None,
                    pause,
                })
            })
            .collect();
        RoutingTable::new(sites, Settings::default())
    })
}

/// What cutover does with a request, as far as routing decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Refused before routing (`reject_bad_request`).
    Rejected(StatusCode),
    /// A preview that cannot be served (`403` bad token, `503` no such or no healthy target).
    PreviewRefused(StatusCode),
    /// The maintenance page (`503`).
    Maintenance,
    /// A write refused by read-only (`503`, `x-cutover-read-only: 1`).
    ReadOnly,
    /// Forwarded to the target.
    Forward,
}

/// What [`router`] made of a request.
#[derive(Debug)]
pub struct RouteOutcome {
    /// The verdict.
    pub verdict: Verdict,
    /// The site routed to (`None` when rejected).
    pub site: Option<String>,
    /// The target picked (`None` when rejected or the preview refused).
    pub target: Option<String>,
    /// The request's path is in the site's `read_only.allow_paths`.
    pub allowed: bool,
}

/// Router target: the bytes as a request, routed the way `Proxy::handle`
/// routes it against [`router_table`] (up to the choice of an endpoint).
///
/// Format (lines split on `\n`, one trailing `\r` dropped):
/// - line 1: the `Host` field's value, raw bytes (an empty line is an empty
///   `Host`, `@none` sends none);
/// - line 2: `METHOD TARGET` (split on the first space); an invalid method or
///   request target falls back to `GET` or `/`;
/// - `@http10`, `@h2`: the request's version (HTTP/1.1 otherwise); `@https`:
///   it came to the HTTPS listener;
/// - any other line: `name:value`, as in [`request_head`].
///
/// Before building the request, the raw host (line 1) goes through
/// `site_for_host` and the raw path (line 2 up to `?`) through every site's
/// `allowed_path`, whatever their bytes, with the invariants of
/// [`check_host`] and [`check_allowed_path`]. The request then goes through
/// `reject_bad_request`, `request_host`, `site_for_host`, `modes::pick` and
/// `modes::refusal`, and the answer is checked against SPEC §3.
pub fn router(data: &[u8]) -> RouteOutcome {
    let table = router_table();
    let mut lines = data.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let host_line = lines.next().filter(|l| *l != b"@none");
    let (mut method, mut uri) = (Method::GET, Uri::from_static("/"));
    let mut raw_path: &[u8] = b"/";
    if let Some(line) = lines.next() {
        let (m, target) = split_once(line, b' ');
        method = Method::from_bytes(m).unwrap_or(method);
        let target = target.unwrap_or_default();
        raw_path = split_once(target, b'?').0;
        uri = Uri::try_from(target).unwrap_or(uri);
    }
    let (mut version, mut scheme) = (Version::HTTP_11, "http");
    let mut request = Request::new(());
    for line in lines {
        match line {
            b"@http10" => version = Version::HTTP_10,
            b"@h2" => version = Version::HTTP_2,
            b"@https" => scheme = "https",
            _ => {
                if let (name, Some(value)) = split_once(line, b':') {
                    let value = value.strip_prefix(b" ").unwrap_or(value);
                    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                        request.headers_mut().append(n, v);
                    }
                }
            }
        }
    }

    // Whatever the bytes: the lookups never panic and keep their invariants.
    if let Some(h) = host_line {
        check_host(table, &String::from_utf8_lossy(h));
    }
    let raw_path = String::from_utf8_lossy(raw_path);
    for site in &table.sites {
        check_allowed_path(site, &raw_path);
    }

    if let Some(h) = host_line.and_then(|h| HeaderValue::from_bytes(h).ok()) {
        request.headers_mut().insert(HOST, h);
    }
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    let req = request;
    if let Some((status, _)) = cutover_proxy::forward::reject_bad_request(&req, scheme) {
        return RouteOutcome { verdict: Verdict::Rejected(status), site: None, target: None, allowed: false };
    }

    // `Proxy::route`: one lookup by the request's host, port stripped.
    let host = cutover_proxy::forward::request_host(&req).unwrap_or_default();
    let given = req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(HOST)?.to_str().ok());
    if let Some(given) = given {
        let port = given.strip_prefix(host).unwrap_or_else(|| panic!("{host:?} is not the start of {given:?}"));
        assert!(
            port.is_empty() || (port.starts_with(':') && port[1..].bytes().all(|b| b.is_ascii_digit())),
            "{given:?} routed as {host:?}"
        );
    }
    check_host(table, host);
    let (site, preview_host) = table.site_for_host(host).expect("a `*` site serves every host");
    let path = req.uri().path();
    let allowed = site.allowed_path(path);
    check_allowed_path(site, path);
    let outcome = |verdict, target: Option<&str>| RouteOutcome {
        verdict,
        site: Some(site.name().to_string()),
        target: target.map(str::to_string),
        allowed,
    };

    // `modes::pick`: a preview never falls back to the live target.
    let preview = &site.config.preview;
    let header_values: Vec<&HeaderValue> = req.headers().get_all(preview.header.as_str()).iter().collect();
    let named = match preview_host {
        Some(t) => Some(Some(t.to_string())),
        None if preview.enabled && !header_values.is_empty() => Some(
            (header_values.len() == 1).then(|| header_values[0].to_str().ok().map(|v| v.trim().to_string())).flatten(),
        ),
        None => None,
    };
    let pick = match cutover_proxy::modes::pick(site, preview_host, &req) {
        Ok(pick) => pick,
        Err(refusal) => {
            let Some(name) = &named else { panic!("a request that is no preview was refused: {refusal:?}") };
            let tokens: Vec<&[u8]> =
                req.headers().get_all(&cutover_proxy::modes::PREVIEW_TOKEN).iter().map(HeaderValue::as_bytes).collect();
            let token_ok = preview.token.as_ref().is_none_or(|t| tokens == [t.as_bytes()]);
            // In `pick`'s order: one name, then the token, then the target.
            let expected = match name.as_deref().map(|n| site.target(n)) {
                None => StatusCode::SERVICE_UNAVAILABLE,
                Some(_) if !token_ok => StatusCode::FORBIDDEN,
                Some(Some(t)) if t.has_healthy_endpoint() => {
                    panic!("preview of healthy {} refused: {refusal:?}", t.name)
                }
                Some(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            assert_eq!(refusal.status, expected, "preview {name:?} refused");
            return outcome(Verdict::PreviewRefused(refusal.status), None);
        }
    };
    match &named {
        Some(Some(name)) => {
            assert!(pick.preview, "preview of {name:?} not marked as one");
            assert_eq!(&pick.target.name, name, "a preview went to another target");
            if let Some(t) = &preview.token {
                let token = req.headers().get(&cutover_proxy::modes::PREVIEW_TOKEN).map(HeaderValue::as_bytes);
                assert_eq!(token, Some(t.as_bytes()), "a preview passed without its token");
            }
        }
        Some(None) => panic!("a preview naming no one target was served by {}", pick.target.name),
        None => {
            assert!(!pick.preview, "not a preview, yet marked as one");
            assert!(Arc::ptr_eq(&pick.target, &site.live), "not a preview, yet not the live target");
        }
    }

    // `modes::refusal`: maintenance, read-only, and `allow_paths` passing both.
    let refusal = cutover_proxy::modes::refusal(site, &pick.target, &req);
    let read_only = site.read_only || pick.target.read_only;
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let verdict = match &refusal {
        None => Verdict::Forward,
        Some(r) if r.headers.iter().any(|(n, v)| n == cutover_proxy::modes::READ_ONLY && v == "1") => Verdict::ReadOnly,
        Some(r) => {
            assert_eq!(r.body, site.maintenance_page, "a refusal that is neither read-only nor maintenance");
            Verdict::Maintenance
        }
    };
    if let Some(r) = &refusal {
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers.iter().any(|(n, _)| n == RETRY_AFTER), "a mode refusal without Retry-After");
    }
    let expected = match () {
        _ if allowed => Verdict::Forward,
        _ if site.maintenance => Verdict::Maintenance,
        _ if read_only && !safe => Verdict::ReadOnly,
        _ => Verdict::Forward,
    };
    assert_eq!(verdict, expected, "{} {path:?} on {}", req.method(), site.name());

    // The query never changes the verdict.
    for query in ["", "?", "?a=1", "?/../x;y=%2e%2e"] {
        let mut other = Request::new(());
        *other.method_mut() = req.method().clone();
        *other.headers_mut() = req.headers().clone();
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = PathAndQuery::try_from(format!("{path}{query}")).ok();
        // (`OPTIONS *` is no path to add a query to.)
        let Some(uri) = Uri::from_parts(parts).ok().filter(|u| u.path() == path) else { continue };
        *other.uri_mut() = uri;
        assert_eq!(site.allowed_path(other.uri().path()), allowed, "{query:?} changed allow_paths for {path:?}");
        let again = cutover_proxy::modes::refusal(site, &pick.target, &other).map(|r| r.status);
        assert_eq!(again, refusal.as_ref().map(|r| r.status), "{query:?} changed the verdict for {path:?}");
    }
    outcome(verdict, Some(&pick.target.name))
}

/// `site_for_host` on any text: the site (and preview target) is the one a
/// plain reading of the configuration gives — the host lower-cased, one
/// trailing dot dropped, looked up among the sites' `hosts` and
/// `preview.hosts`, else the `*` site — and case or a trailing dot never change it.
pub fn check_host(table: &RoutingTable, host: &str) {
    let found = |h: &str| table.site_for_host(h).map(|(s, p)| (s.name().to_string(), p.map(str::to_string)));
    let got = found(host);
    let name = host.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let exact = table.sites.iter().find(|s| s.config.hosts.iter().any(|h| h == name && h != "*"));
    let previewed = table.sites.iter().find_map(|s| s.config.preview.hosts.get(name).map(|t| (s, t)));
    let expected = match (exact, previewed) {
        (Some(s), _) => Some((s.name().to_string(), None)),
        (None, Some((s, t))) => Some((s.name().to_string(), Some(t.clone()))),
        (None, None) => {
            table.sites.iter().find(|s| s.config.hosts.iter().any(|h| h == "*")).map(|s| (s.name().to_string(), None))
        }
    };
    assert_eq!(got, expected, "host {host:?}");
    if exact.is_some() {
        assert!(got.as_ref().is_some_and(|(s, _)| s != "fallback"), "{host:?} names a site yet went to `*`");
    }
    assert_eq!(found(&host.to_ascii_uppercase()), got, "case changed the site of {host:?}");
    assert_eq!(found(&host.to_ascii_lowercase()), got, "case changed the site of {host:?}");
    if !host.ends_with('.') {
        assert_eq!(found(&format!("{host}.")), got, "a trailing dot changed the site of {host:?}");
    }
}

/// `allowed_path` on any text: a path allowed is plain (no `.` or `..`
/// segment, backslash or `;`, none of them percent-encoded, no encoded `%`),
/// and every way an upstream may read it — as is, percent-decoded once or
/// until nothing changes (also `%uXXXX` and overlong UTF-8, which old servers
/// decode), backslashes as slashes, `;` parameters dropped, dot segments
/// resolved, `//` collapsed — is a path the same `allow_paths` allow.
pub fn check_allowed_path(site: &SiteRoute, path: &str) {
    if !site.allowed_path(path) {
        return;
    }
    let has = |needle: &str| path.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle.as_bytes()));
    assert!(
        !path.contains(['\\', ';'])
            && !path.split('/').any(|s| s == "." || s == "..")
            && !["%2e", "%2f", "%5c", "%3b", "%25"].into_iter().any(has),
        "{path:?} is not plain, yet allowed on {}",
        site.name()
    );
    let allows = |p: &[u8]| {
        site.config.read_only.allow_paths.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => p.starts_with(prefix.as_bytes()),
            None => p == a.as_bytes(),
        })
    };
    let once = percent_decode(path.as_bytes());
    let mut fixpoint = once.clone();
    for _ in 0..8 {
        let next = percent_decode(&fixpoint);
        if next == fixpoint {
            break;
        }
        fixpoint = next;
    }
    for (how, read) in [("as is", path.as_bytes().to_vec()), ("decoded once", once), ("decoded fully", fixpoint)] {
        for resolved in [resolve(&read, false), resolve(&read, true)] {
            assert!(
                allows(&resolved),
                "{path:?} is allowed on {}, but an upstream reading it {how} sees {:?}",
                site.name(),
                String::from_utf8_lossy(&resolved)
            );
        }
    }
}

/// Percent-decoding as lenient servers do it: `%XX`, IIS's `%uXXXX`, and the
/// overlong UTF-8 forms of ASCII (`%c0%ae` is `.`) that old decoders accepted.
fn percent_decode(p: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let byte_at = |i: usize| -> Option<u8> {
        match (p.get(i), p.get(i + 1).copied().and_then(hex), p.get(i + 2).copied().and_then(hex)) {
            (Some(b'%'), Some(h), Some(l)) => Some(h << 4 | l),
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'%' && p.get(i + 1).is_some_and(|b| b.eq_ignore_ascii_case(&b'u')) {
            let digits: Option<Vec<u8>> = (2..6).map(|k| p.get(i + k).copied().and_then(hex)).collect();
            if let Some(d) = digits {
                let cp = d.iter().fold(0u32, |acc, &x| acc << 4 | u32::from(x));
                if cp < 0x80 {
                    out.push(cp as u8);
                    i += 6;
                    continue;
                }
            }
        }
        let Some(b) = byte_at(i) else {
            out.push(p[i]);
            i += 1;
            continue;
        };
        // Overlong: `C0/C1 xx`, `E0 8x/9x xx`, `F0 8x xx xx` encoding ASCII.
        let cont = |k: usize| byte_at(i + 3 * k).filter(|c| c & 0xc0 == 0x80).map(|c| u32::from(c & 0x3f));
        let overlong = match b {
            0xc0 | 0xc1 => cont(1).map(|c| (u32::from(b & 0x1f) << 6 | c, 2)),
            0xe0 => cont(1).zip(cont(2)).map(|(c1, c2)| (c1 << 6 | c2, 3)),
            0xf0 => cont(1).zip(cont(2)).zip(cont(3)).map(|((c1, c2), c3)| (c1 << 12 | c2 << 6 | c3, 4)),
            _ => None,
        };
        match overlong {
            Some((cp, n)) if cp < 0x80 => {
                out.push(cp as u8);
                i += 3 * n;
            }
            _ => {
                out.push(b);
                i += 3;
            }
        }
    }
    out
}

/// The path an upstream resolves `p` to: `\` read as `/`, `;` parameters
/// dropped, `.` and `..` segments resolved (RFC 3986 §5.2.4), and empty
/// segments dropped when `collapse` (`//` read as `/`).
fn resolve(p: &[u8], collapse: bool) -> Vec<u8> {
    let p: Vec<u8> = p.iter().map(|&b| if b == b'\\' { b'/' } else { b }).collect();
    let mut out: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = p.split(|&b| b == b'/').map(|s| split_once(s, b';').0).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate().skip(1) {
        match *seg {
            b"." | b".." if i == last => {
                if *seg == b".." {
                    out.pop();
                }
                out.push(b"");
            }
            b"." => {}
            b".." => {
                out.pop();
            }
            b"" if collapse && i != last => {}
            s => out.push(s),
        }
    }
    let mut resolved = Vec::with_capacity(p.len() + 1);
    for seg in out {
        resolved.push(b'/');
        resolved.extend_from_slice(seg);
    }
    if resolved.is_empty() {
        resolved.push(b'/');
    }
    resolved
}

fn split_once(s: &[u8], sep: u8) -> (&[u8], Option<&[u8]>) {
    match s.iter().position(|&b| b == sep) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

fn rsplit_once(s: &[u8], sep: u8) -> (&[u8], Option<&[u8]>) {
    match s.iter().rposition(|&b| b == sep) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}
