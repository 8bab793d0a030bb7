//! Replays the fuzz seed corpus (`fuzz/corpus/<target>/`) through the very
//! functions the cargo-fuzz targets run (`fuzz/harness.rs`), so `cargo test`
//! catches a regression on any seed without nightly or libFuzzer. Every file
//! of a target's corpus directory is replayed, including inputs a fuzzing
//! run added there.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use http::{StatusCode, Version};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seeds", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            (name, data)
        })
        .collect()
}

/// Runs `f` on every seed of `target`; fails naming every seed that panicked.
fn replay<T>(target: &str, f: impl Fn(&[u8]) -> T) -> Vec<(String, T)> {
    let mut out = Vec::new();
    let mut panicked = Vec::new();
    for (name, data) in corpus(target) {
        match catch_unwind(AssertUnwindSafe(|| f(&data))) {
            Ok(v) => out.push((name, v)),
            Err(_) => panicked.push(name),
        }
    }
    assert!(panicked.is_empty(), "{target}: the harness panicked on {panicked:?}");
    out
}

fn seed<'a, T>(results: &'a [(String, T)], name: &str) -> &'a T {
    &results.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("seed {name} is missing")).1
}

#[test]
fn config_seeds() {
    let results = replay("config", harness::config);
    let valid = seed(&results, "valid-example.yaml").as_ref().expect("UTF-8");
    if let Err(e) = valid {
        panic!("the example configuration must parse:\n{e}");
    }
    // The copies of config/invalid/*.yaml keep their `# expect: <path>` lines.
    for (name, data) in corpus("config") {
        let text = String::from_utf8_lossy(&data);
        let expected: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        if expected.is_empty() {
            continue;
        }
        let errors = match seed(&results, &name) {
            Some(Err(e)) => e,
            other => panic!("{name} should be refused, got {other:?}"),
        };
        for path in expected {
            assert!(errors.errors.iter().any(|e| e.path == path), "{name}: no error at {path}:\n{errors}");
        }
    }
    assert!(matches!(seed(&results, "nasty-alias-bomb.yaml"), Some(Err(_))));
    assert!(matches!(seed(&results, "nasty-deep-nesting.yaml"), Some(Err(_))));
}

#[test]
fn request_head_seeds() {
    let results = replay("request_head", harness::request_head);
    // The ad-hoc decoding of fuzz/harness.rs reads what the seeds say.
    let get = &seed(&results, "get-ok").request;
    assert_eq!(
        (get.method().as_str(), get.uri().to_string(), get.version()),
        ("GET", "/index.html?q=1".into(), Version::HTTP_11)
    );
    assert_eq!(get.headers()["user-agent"], "fuzz", "CRLF line ends are accepted");
    assert_eq!(seed(&results, "h2-authority-mismatch").request.version(), Version::HTTP_2);
    assert_eq!(seed(&results, "weird-methods").request.method().as_str(), "M-SEARCH");

    let status = |name: &str| seed(&results, name).rejected.map(|(s, _)| s);
    assert_eq!(status("get-ok"), None);
    assert_eq!(status("http10-no-host"), None);
    assert_eq!(status("absolute-form"), None);
    assert_eq!(status("http11-no-host"), Some(StatusCode::BAD_REQUEST));
    assert_eq!(status("te-chunked-chunked"), Some(StatusCode::BAD_REQUEST));
    assert_eq!(status("te-twice"), Some(StatusCode::BAD_REQUEST));
    assert_eq!(status("te-gzip"), Some(StatusCode::BAD_REQUEST));
    assert_eq!(status("two-hosts"), Some(StatusCode::BAD_REQUEST));
    assert_eq!(status("bad-host"), Some(StatusCode::BAD_REQUEST));
    assert_eq!(status("h2-authority-mismatch"), Some(StatusCode::BAD_REQUEST));
    assert_eq!(status("connect"), Some(StatusCode::METHOD_NOT_ALLOWED));
    // Userinfo in the request target would otherwise end up in the upstream's Host.
    assert_eq!(status("absolute-form-userinfo"), Some(StatusCode::BAD_REQUEST));

    let nominated = &seed(&results, "connection-nominates").sanitised;
    assert!(!nominated.contains_key("x-secret"), "a field named in Connection was forwarded");
    assert_eq!(nominated["host"], "shop.example.com");
    assert_eq!(nominated["content-length"], "0");
    assert_eq!(nominated["x-forwarded-proto"], "https");
    assert_eq!(nominated["x-request-id"], "abc-123");
    // Connection named x-forwarded-for, so the trusted proxy's value is gone.
    assert_eq!(nominated["x-forwarded-for"], "10.1.2.3");

    let absolute = &seed(&results, "absolute-form").sanitised;
    assert_eq!(absolute["host"], "shop.example.com:8080", "the absolute-form authority becomes Host");
}

#[test]
fn admin_body_seeds() {
    let results = replay("admin_body", harness::admin_body);
    let [switch, rollback, set_target] = seed(&results, "switch-valid.json");
    assert_eq!(switch, &Ok(()));
    assert!(rollback.is_err() && set_target.is_err());
    assert_eq!(seed(&results, "rollback-valid.json")[1], Ok(()));
    assert_eq!(seed(&results, "rollback-empty.json")[1], Ok(()));
    assert_eq!(seed(&results, "set-target-valid.json")[2], Ok(()));
    let unknown = seed(&results, "unknown-field.json")[0].as_ref().expect_err("unknown fields are refused");
    assert!(unknown.contains("unknown field `colour`"), "{unknown}");
    for deep in ["deep-nesting-array.json", "deep-nesting-object.json", "deep-nesting-unclosed.json"] {
        assert!(seed(&results, deep).iter().all(Result::is_err), "{deep} decoded");
    }
    assert!(seed(&results, "huge-duration.json")[0].is_err(), "an overflowing duration decoded");
}

/// F-4 for the state file: every seed of `fuzz/corpus/state_file/` is read
/// as the state file at start (`FileStore::load`) without a panic and with
/// the file left as it was (see `harness::state_file`). The `ok-` seeds (what
/// cutover writes, and what SPEC §5 reads and later drops with a warning:
/// sites and targets the configuration lacks) are read; every other is
/// refused with a message naming the file, the fault and `--reset-state`.
#[test]
fn state_file_seeds() {
    let results = replay("state_file", harness::state_file);
    assert!(results.len() >= 40, "only {} seeds", results.len());
    for (name, result) in &results {
        match (name.starts_with("ok-"), result) {
            (true, Err(e)) => panic!("{name} should be read: {e}"),
            (false, Ok(state)) => panic!("{name} should be refused, got {state:?}"),
            _ => {}
        }
    }
    let ok = |name: &str| seed(&results, name).as_ref().unwrap().clone();
    let written = ok("ok-as-written.json");
    let shop = &written.sites["shop"];
    assert_eq!((shop.live.as_str(), shop.previous.as_deref()), ("green", Some("blue")));
    assert_eq!((shop.targets.len(), shop.history.len(), shop.deployments.len()), (2, 1, 1));
    assert_eq!(shop.mode.paused, Some(std::time::Duration::from_secs(30)));
    assert_eq!(ok("ok-unknown-site-and-target.json").sites["gone"].live, "purple");
    // Not in SPEC's words, so worth pinning: which fault each kind of file is refused for.
    for (name, fault) in [
        ("empty.json", "EOF while parsing"),
        ("truncated-one-short.json", "EOF while parsing an object"),
        ("bom.json", "expected value at line 1 column 1"),
        ("non-utf8-in-string.json", "invalid unicode code point"),
        ("version-1e400.json", "number out of range"),
        ("version-huge.json", "expected u32"),
        ("weight-over-255.json", "expected u8"),
        ("weights-overflow-u32.json", "weights add up to 5100, not 100"),
        ("paused-huge.json", "expected a duration"),
        ("duplicate-field.json", "duplicate field `version`"),
        ("duplicate-site.json", r#""shop" is named twice"#),
        ("duplicate-target.json", r#""green" is named twice"#),
        ("duplicate-weight.json", r#""green" is named twice"#),
        ("history-unknown-field.json", "unknown field `x`"),
        ("deep-nesting-unclosed.json", "expected u32"),
        ("site-as-array.json", "sites.shop is an array, not an object"),
        ("live-empty.json", r#"site "shop": live is empty"#),
    ] {
        let message = seed(&results, name).as_ref().expect_err(name);
        assert!(message.contains(fault), "{name}: {message}");
    }
}

/// F-4 for routing: every seed of `fuzz/corpus/router/` is routed against the
/// fixed snapshot of `harness::ROUTER_CONFIG` with every invariant of
/// `harness::router` holding (host lookups follow the configuration whatever
/// the case, port or trailing dot; a path allowed is plain and stays allowed
/// however an upstream decodes and resolves it; the query never changes the
/// verdict; a preview never falls back; modes answer as SPEC §3 says), and
/// each named seed gets the verdict, site and target pinned below.
#[test]
fn router_seeds() {
    use harness::Verdict::{Forward, Maintenance, PreviewRefused, ReadOnly, Rejected};
    let results = replay("router", harness::router);
    assert!(results.len() >= 50, "only {} seeds", results.len());
    let bad = StatusCode::BAD_REQUEST;
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    for (name, verdict, site, target) in [
        ("shop-get", Forward, Some("shop"), Some("blue")),
        ("shop-post-write", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-up", Forward, Some("shop"), Some("blue")),
        ("shop-post-up-query-traversal", Forward, Some("shop"), Some("blue")),
        ("shop-post-up-encoded", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search", Forward, Some("shop"), Some("blue")),
        ("shop-post-search-double-slash", Forward, Some("shop"), Some("blue")),
        // Paths an upstream could resolve outside `/api/search/`: writes stay refused.
        ("shop-post-search-dotdot", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-dotdot-semicolon", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-jsessionid", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-pct2e", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-pct2f", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-pct25", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-backslash", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-overlong-utf8", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-overlong-utf8-3", ReadOnly, Some("shop"), Some("blue")),
        ("shop-post-search-iis-unicode", ReadOnly, Some("shop"), Some("blue")),
        ("shop-options-star", Forward, Some("shop"), Some("blue")),
        // Hosts: any case, a port, one trailing dot; IP literals as written.
        ("shop-host-uppercase", ReadOnly, Some("shop"), Some("blue")),
        ("shop-host-trailing-dot", Forward, Some("shop"), Some("blue")),
        ("shop-host-two-trailing-dots", Forward, Some("fallback"), Some("blue")),
        ("shop-ipv6", Forward, Some("shop"), Some("blue")),
        ("shop-ipv6-absolute", Forward, Some("shop"), Some("blue")),
        ("shop-ipv6-longhand", Forward, Some("fallback"), Some("blue")),
        ("shop-preview-header", Forward, Some("shop"), Some("green")),
        ("shop-preview-header-unknown", PreviewRefused(unavailable), Some("shop"), None),
        ("shop-preview-header-twice", PreviewRefused(unavailable), Some("shop"), None),
        ("preview-host-green", Forward, Some("shop"), Some("green")),
        ("preview-host-green-post", ReadOnly, Some("shop"), Some("green")),
        ("preview-host-green-odd-case", Forward, Some("shop"), Some("green")),
        ("preview-host-gray-unhealthy", PreviewRefused(unavailable), Some("shop"), None),
        ("preview-host-blue-dot-in-config", Forward, Some("shop"), Some("blue")),
        ("preview-host-beats-header", Forward, Some("shop"), Some("green")),
        ("blog-maintenance", Maintenance, Some("blog"), Some("blue")),
        ("blog-healthz", Forward, Some("blog"), Some("blue")),
        ("blog-static", Forward, Some("blog"), Some("blue")),
        ("blog-static-traversal", Maintenance, Some("blog"), Some("blue")),
        ("blog-www-dot-in-config", Forward, Some("blog"), Some("blue")),
        ("blog-punycode", Maintenance, Some("blog"), Some("blue")),
        ("blog-utf8-host", Rejected(bad), None, None),
        ("blog-preview-token", Forward, Some("blog"), Some("green")),
        ("blog-preview-no-token", PreviewRefused(StatusCode::FORBIDDEN), Some("blog"), None),
        ("blog-preview-wrong-token", PreviewRefused(StatusCode::FORBIDDEN), Some("blog"), None),
        ("blog-other-sites-header", Forward, Some("blog"), Some("blue")),
        ("api-post", ReadOnly, Some("api"), Some("clone")),
        ("api-post-hook", Forward, Some("api"), Some("clone")),
        ("api-absolute-form-wins", Forward, Some("api"), Some("clone")),
        // No `*.` wildcards: a name no site has goes to the `*` site.
        ("fallback-unknown", Forward, Some("fallback"), Some("blue")),
        ("fallback-subdomain", Forward, Some("fallback"), Some("blue")),
        ("fallback-suffix", Forward, Some("fallback"), Some("blue")),
        ("fallback-wildcard-literal", Forward, Some("fallback"), Some("blue")),
        ("fallback-http10-no-host", Forward, Some("fallback"), Some("blue")),
        ("fallback-huge-host", Forward, Some("fallback"), Some("blue")),
        ("reject-empty", Rejected(bad), None, None),
        ("reject-empty-host", Rejected(bad), None, None),
        ("reject-no-host", Rejected(bad), None, None),
        ("reject-userinfo", Rejected(bad), None, None),
        ("reject-non-utf8-host", Rejected(bad), None, None),
        ("reject-ipv6-zone", Rejected(bad), None, None),
        ("garbage", Rejected(bad), None, None),
    ] {
        let got = seed(&results, name);
        assert_eq!((&got.verdict, got.site.as_deref(), got.target.as_deref()), (&verdict, site, target), "{name}");
    }
    // `read_only.allow_paths`, the query aside: exact, or a prefix; never a path that could resolve elsewhere.
    for name in ["shop-post-up", "shop-post-up-query-traversal", "shop-post-search", "blog-static", "api-post-hook"] {
        assert!(seed(&results, name).allowed, "{name} is in allow_paths");
    }
    for name in
        ["shop-post-up-encoded", "shop-post-search-dotdot", "shop-post-search-overlong-utf8", "blog-static-traversal"]
    {
        assert!(!seed(&results, name).allowed, "{name} is not in allow_paths");
    }
}
