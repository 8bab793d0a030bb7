//! The bodies of the fuzz targets, as plain functions.
//!
//! Included with `#[path]` both by the cargo-fuzz targets in
//! `fuzz/fuzz_targets/` and by the root package's `tests/fuzz_corpus.rs`,
//! which replays the seed corpus under `cargo test`: the replay runs exactly
//! the code the fuzzer runs. Every function must return normally for every
//! input; a panic (including a failed invariant below) is a finding.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use cutover_admin::api::{decode_body, BodyKind};
use cutover_config::{Config, ConfigErrors};
use cutover_core::state::{FileStore, State, StateStore, STATE_VERSION};
use cutover_proxy::headers;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use http::{Method, Request, StatusCode, Uri, Version};

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
