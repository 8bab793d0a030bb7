//! Integration tests of configuration loading and validation (SPEC §2).
//!
//! * `config/cutover.yaml`, the documented example, must load and carry the
//!   values and defaults it documents;
//! * every file in `config/invalid/` must be rejected with the field paths its
//!   `# expect:` lines name;
//! * focused `parse` tests pin down error paths, values and messages.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_config::{
    load, parse, validate_endpoint, Config, ConfigError, ConfigErrors, Limits, Pause, Protocol, ReadOnly, Require,
};

// ---------------------------------------------------------------------------
// helpers

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")
}

fn invalid_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/invalid")).to_path_buf()
}

/// A valid configuration: `listen` plus the given `sites` block (and anything else).
fn with_listen(rest: &str) -> String {
    format!("listen:\n  http: 127.0.0.1:8080\n{rest}")
}

/// One minimal valid site, followed by `extra` lines at site level (4 spaces).
fn one_site(extra: &str) -> String {
    with_listen(&format!(
        "sites:\n  - name: shop\n    hosts: [shop.example.com]\n    live: blue\n    targets:\n      blue: {{ endpoints: [127.0.0.1:3001] }}\n      green: {{ endpoints: [127.0.0.1:4001] }}\n{extra}"
    ))
}

/// A site block with nothing but the required keys, to append after `sites:`.
const SITE_BLOCK: &str = "  - name: shop\n    hosts: [shop.example.com]\n    live: blue\n    targets:\n      blue: { endpoints: [127.0.0.1:3001] }\n";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn ok(text: &str, base: &Path) -> Config {
    match parse(text, base) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid configuration, got:\n{e}\n--- text ---\n{text}"),
    }
}

fn errs(text: &str, base: &Path) -> ConfigErrors {
    match parse(text, base) {
        Ok(c) => panic!("expected errors, got a valid configuration: {c:#?}\n--- text ---\n{text}"),
        Err(e) => {
            assert!(!e.errors.is_empty(), "Err without any error");
            e
        }
    }
}

fn paths(e: &ConfigErrors) -> Vec<&str> {
    e.errors.iter().map(|e| e.path.as_str()).collect()
}

/// The error at exactly `path`; panics listing every error when there is none.
fn at<'a>(e: &'a ConfigErrors, path: &str) -> &'a ConfigError {
    e.errors.iter().find(|x| x.path == path).unwrap_or_else(|| panic!("no error at {path:?}; errors:\n{e}"))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---------------------------------------------------------------------------
// the example configuration

#[test]
fn example_config_is_valid_and_documents_the_defaults() {
    let path = config_dir().join("cutover.yaml");
    let c = load(&path).unwrap_or_else(|e| panic!("config/cutover.yaml must be valid:\n{e}"));

    assert_eq!(c.listen.http, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(c.listen.https, None);
    assert!(c.tls.is_empty());
    assert_eq!(c.admin.listen, "127.0.0.1:9901".parse::<SocketAddr>().unwrap());
    assert_eq!(c.admin.token, None);
    // Relative paths are resolved against the file's directory.
    assert_eq!(c.state_path, config_dir().join("cutover-state.json"));
    // The file spells out every limit with its default value.
    assert_eq!(c.limits, Limits::default());
    assert_eq!(c.limits.header_read_timeout, secs(10));
    assert_eq!(c.limits.idle_timeout, secs(60));
    assert_eq!(c.limits.max_header_bytes, 65536);
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.upstream_connect_timeout, secs(3));
    assert_eq!(c.limits.upstream_response_timeout, secs(60));
    assert_eq!(c.shutdown_timeout, secs(30));
    let proxies: Vec<String> = c.trusted_proxies.iter().map(ToString::to_string).collect();
    assert_eq!(proxies, ["10.0.0.0/8", "192.168.1.10/32"]);

    assert_eq!(c.sites.len(), 2);
    let shop = &c.sites[0];
    assert_eq!(shop.name, "shop");
    assert_eq!(shop.hosts, ["shop.example.com", "www.shop.example.com", "localhost"]);
    assert_eq!(shop.live, "blue");
    let names: Vec<&str> = shop.targets.keys().map(String::as_str).collect();
    assert_eq!(names, ["blue", "clone", "green", "grpc"]);
    let blue = &shop.targets["blue"];
    assert_eq!(blue.endpoints, ["127.0.0.1:3001", "127.0.0.1:3002"]);
    assert_eq!(blue.version.as_deref(), Some("v41"));
    assert!(!blue.read_only);
    assert_eq!(blue.protocol, Protocol::Http1);
    assert!(!blue.tls);
    assert_eq!(shop.targets["green"].version.as_deref(), Some("v42"));
    assert!(shop.targets["clone"].read_only);
    assert_eq!(shop.targets["clone"].version, None);
    let grpc = &shop.targets["grpc"];
    assert_eq!(grpc.protocol, Protocol::H2);
    assert!(grpc.tls);
    assert_eq!(grpc.server_name.as_deref(), Some("api.internal"));
    assert_eq!(grpc.ca, None);

    let h = &shop.health;
    assert_eq!(h.path.as_deref(), Some("/up"));
    assert_eq!((h.interval, h.timeout), (secs(2), secs(1)));
    assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (2, 3));
    assert!(h.expect_status.contains(200) && h.expect_status.contains(399));
    assert!(!h.expect_status.contains(199) && !h.expect_status.contains(400));
    assert_eq!(h.version_header.as_deref(), Some("x-app-version"));
    assert_eq!(h.host.as_deref(), Some("shop.example.com"));

    let s = &shop.switch;
    assert_eq!(s.drain_timeout, secs(30));
    assert_eq!(s.close_spread, secs(2));
    assert_eq!(s.require, Require::AllHealthy);
    assert_eq!(s.smoke.len(), 3);
    assert_eq!(s.smoke[0].path, "/");
    assert_eq!(s.smoke[0].expect_status.0, [200..=200]);
    assert_eq!(s.smoke[1].expect_body_contains.as_deref(), Some("ok"));
    assert_eq!(s.smoke[1].expect_status.0, [200..=399], "default expect_status");
    assert_eq!(s.smoke[2].expect_status.0, [200..=200, 204..=204]);
    let w = s.watch.as_ref().expect("watch");
    assert_eq!(w.duration, secs(60));
    assert_eq!(w.max_error_rate, 0.05);
    assert_eq!(w.min_requests, 20);

    assert_eq!(shop.read_only.retry_after, secs(30));
    assert_eq!(shop.read_only.allow_paths, ["/up", "/api/search/*"]);
    assert_eq!(shop.maintenance_page, None);
    assert_eq!(shop.pause.max_held, 10_000);
    assert_eq!(shop.pause.resume_spread, Duration::from_millis(500));
    assert!(!shop.redirect_https);
    assert_eq!(shop.preview.header, "x-cutover-target");
    assert_eq!(shop.preview.token, None);
    assert_eq!(shop.preview.hosts.len(), 2);
    assert_eq!(shop.preview.hosts["green.shop.example.com"], "green");
    assert_eq!(shop.preview.hosts["clone.shop.example.com"], "clone");
    assert_eq!(shop.canary_cookie, "cutover-bucket");

    // The minimal second site: explicit values plus defaults for the rest.
    let api = &c.sites[1];
    assert_eq!(api.name, "api");
    assert_eq!(api.hosts, ["api.example.com", "api.example.net"], "hosts are lower-cased");
    assert_eq!(api.live, "green");
    assert_eq!(api.targets["blue"].endpoints, ["[::1]:7001"]);
    assert_eq!(api.targets["green"].version.as_deref(), Some("2024.06.1"));
    assert_eq!(api.health.path, None, "no path: TCP-connect check");
    assert_eq!(api.health.interval, secs(5));
    assert_eq!(api.health.timeout, secs(1));
    assert_eq!(api.health.healthy_threshold, 1);
    assert_eq!(api.health.unhealthy_threshold, 3);
    assert_eq!(api.health.expect_status.0, [200..=399]);
    assert_eq!(api.switch.require, Require::AnyHealthy);
    assert_eq!(api.switch.drain_timeout, secs(120));
    assert_eq!(api.switch.close_spread, secs(2));
    assert!(api.switch.smoke.is_empty());
    assert!(api.switch.watch.is_none());
    assert_eq!(api.read_only, ReadOnly::default());
    assert_eq!(api.pause, Pause::default());
    assert_eq!(api.preview.header, "x-cutover-target");
    assert!(api.preview.hosts.is_empty());
    assert_eq!(api.maintenance_page, None);
    assert!(!api.redirect_https);
    assert_eq!(api.canary_cookie, "cutover-bucket");
}

#[test]
fn example_config_documents_every_key() {
    // Every key the file format accepts appears in the example, set or commented.
    let text = fs::read_to_string(config_dir().join("cutover.yaml")).unwrap();
    for key in [
        "listen:",
        "http:",
        "https:",
        "tls:",
        "certificates:",
        "cert:",
        "key:",
        "admin:",
        "token_env:",
        "token_file:",
        "state:",
        "path:",
        "limits:",
        "header_read_timeout:",
        "idle_timeout:",
        "max_header_bytes:",
        "max_connections:",
        "upstream_connect_timeout:",
        "upstream_response_timeout:",
        "shutdown_timeout:",
        "trusted_proxies:",
        "sites:",
        "name:",
        "hosts:",
        "live:",
        "targets:",
        "endpoints:",
        "version:",
        "read_only:",
        "protocol:",
        "ca:",
        "server_name:",
        "health:",
        "interval:",
        "timeout:",
        "healthy_threshold:",
        "unhealthy_threshold:",
        "expect_status:",
        "version_header:",
        "host:",
        "switch:",
        "drain_timeout:",
        "close_spread:",
        "require:",
        "smoke:",
        "expect_body_contains:",
        "watch:",
        "duration:",
        "max_error_rate:",
        "min_requests:",
        "retry_after:",
        "allow_paths:",
        "maintenance:",
        "page:",
        "pause:",
        "max_held:",
        "resume_spread:",
        "redirect_https:",
        "preview:",
        "header:",
        "canary:",
        "cookie:",
    ] {
        assert!(text.contains(key), "config/cutover.yaml does not mention {key}");
    }
}

// ---------------------------------------------------------------------------
// the invalid fixtures

/// The `# expect: PATH` lines at the top of a fixture.
fn expectations(text: &str) -> Vec<String> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# expect:"))
        .map(|p| p.trim().to_string())
        .collect()
}

fn fixtures() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(invalid_dir())
        .expect("config/invalid exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_invalid_fixture_is_rejected_with_the_expected_paths() {
    let files = fixtures();
    assert!(files.len() >= 12, "expected at least 12 fixtures, found {}", files.len());
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(file).unwrap();
        let expected = expectations(&text);
        assert!(!expected.is_empty(), "{name}: no `# expect:` line at the top");
        let e = match load(file) {
            Ok(_) => panic!("{name}: expected errors, but the configuration is valid"),
            Err(e) => e,
        };
        let got = paths(&e);
        for p in &expected {
            assert!(got.contains(&p.as_str()), "{name}: no error at {p:?}; errors:\n{e}");
        }
        // The rendering names the file on every line, one line per error.
        let shown = e.to_string();
        assert_eq!(shown.lines().count(), e.errors.len(), "{name}:\n{shown}");
        for line in shown.lines() {
            assert!(line.contains(&name), "{name}: line without the file name: {line}");
        }
        assert_eq!(e.file.as_deref(), Some(file.display().to_string().as_str()));
    }
}

#[test]
fn fixture_messages_say_what_is_wrong() {
    let load_fixture = |name: &str| load(&invalid_dir().join(name)).unwrap_err();

    let e = load_fixture("tls-cert-missing.yaml");
    assert!(at(&e, "tls.certificates[0].cert").message.contains("cannot read"), "{e}");
    assert_eq!(at(&e, "tls.certificates[0].cert").value, "certs/does-not-exist.pem");

    let e = load_fixture("tls-cert-not-pem.yaml");
    assert!(at(&e, "tls.certificates[0].cert").message.contains("no PEM certificate could be parsed"), "{e}");
    assert!(at(&e, "tls.certificates[0].key").message.contains("no PEM private key"), "{e}");

    let e = load_fixture("endpoint-not-host-port.yaml");
    assert_eq!(at(&e, "sites[0].targets.green.endpoints[1]").value, "http://127.0.0.1:4002/");

    let e = load_fixture("duplicate-host.yaml");
    let dup = at(&e, "sites[1].hosts[1]");
    assert_eq!(dup.value, "shop.example.com");
    assert!(dup.message.contains("sites[0]"), "{e}");

    let e = load_fixture("duplicate-site-name.yaml");
    assert!(at(&e, "sites[1].name").message.contains("duplicate"), "{e}");

    let e = load_fixture("live-target-undefined.yaml");
    let live = at(&e, "sites[0].live");
    assert_eq!(live.value, "purple");
    assert!(live.message.contains("blue, green"), "the known targets are listed: {e}");

    let e = load_fixture("admin-off-loopback-no-token.yaml");
    assert!(at(&e, "admin.listen").message.contains("token"), "{e}");

    let e = load_fixture("unknown-nested-key.yaml");
    assert_eq!(e.errors.len(), 1, "{e}");
    assert_eq!(at(&e, "sites[0].targets.blue.endpoint").message, "unknown key");

    let e = load_fixture("bad-duration.yaml");
    assert_eq!(at(&e, "shutdown_timeout").value, "30 seconds please");
    let e = errs(&one_site("    health: { interval: 2x }\n"), Path::new("."));
    assert!(at(&e, "sites[0].health.interval").message.ends_with("such as 500ms, 10s or 1m"), "{e}");

    let e = load_fixture("many-errors.yaml");
    assert!(e.errors.len() >= 8, "every error is listed:\n{e}");
}

#[test]
fn load_of_a_missing_file_names_it() {
    let dir = tmp();
    let path = dir.path().join("nope.yaml");
    let e = load(&path).unwrap_err();
    assert_eq!(e.errors.len(), 1);
    assert!(e.to_string().contains("nope.yaml"), "{e}");
    assert!(e.to_string().contains("cannot read the configuration file"), "{e}");
}

// ---------------------------------------------------------------------------
// parse: error collection, paths and values

#[test]
fn every_error_is_listed_at_once() {
    let dir = tmp();
    let text = "\
listen:
  http: 127.0.0.1:8080
admin:
  listen: 0.0.0.0:9901
shutdown_timeout: forever
trusted_proxies: [garbage]
sites:
  - name: Shop
    hosts: [shop.example.com]
    live: purple
    targets:
      blue: { endpoints: [nope, 127.0.0.1:0] }
    health:
      healthy_threshold: 0
      unhealthy_threshold: 0
  - name: api
    hosts: [api.example.com]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:3001], colour: blue }
";
    let e = errs(text, dir.path());
    let mut got = paths(&e);
    got.sort_unstable();
    got.dedup();
    for p in [
        "admin.listen",
        "shutdown_timeout",
        "trusted_proxies[0]",
        "sites[0].name",
        "sites[0].live",
        "sites[0].targets.blue.endpoints[0]",
        "sites[0].targets.blue.endpoints[1]",
        "sites[0].health.healthy_threshold",
        "sites[0].health.unhealthy_threshold",
        "sites[1].targets.blue.colour",
    ] {
        assert!(got.contains(&p), "no error at {p}; errors:\n{e}");
    }
    assert!(got.len() >= 10, "{e}");
    assert_eq!(e.file, None, "parse knows no file name");
}

/// A bad key (unknown, or a value of the wrong type) does not hide the other
/// errors of its section or site: each is taken out and the rest checked.
#[test]
fn a_bad_key_hides_no_other_error_of_its_section() {
    let dir = tmp();
    let text = "\
listen: { http: 127.0.0.1:8080 }
limits: { idle_timeout: 5, max_connections: 0, bogus_limit: 1 }
sites:
  - name: Shop
    bogus: 1
    hosts: [a.test]
    live: purple
    targets:
      blue: { endpoints: [nope], version: v1, colour: red }
    health: { path: /up, healthy_threshold: 0, interval: 5 }
  - name: other
    hosts: [a.test]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:1] }
    health: { interval: 5 }
";
    let e = errs(text, dir.path());
    let got = paths(&e);
    for p in [
        "limits.idle_timeout",
        "limits.bogus_limit",
        "limits.max_connections",
        "sites[0].bogus",
        "sites[0].name",
        "sites[0].live",
        "sites[0].targets.blue.colour",
        "sites[0].targets.blue.endpoints[0]",
        "sites[0].health.interval",
        "sites[0].health.healthy_threshold",
        "sites[1].health.interval",
        "sites[1].hosts[0]",
    ] {
        assert!(got.contains(&p), "no error at {p}; errors:\n{e}");
    }
    assert_eq!(got.len(), 12, "nothing reported twice, no invented error:\n{e}");
    // A required key of the wrong type is reported once, not also as missing.
    let e = errs(&text.replace("[127.0.0.1:1]", "5"), dir.path());
    assert_eq!(paths(&e).iter().filter(|p| p.starts_with("sites[1].targets")).count(), 1, "{e}");
}

#[test]
fn an_endpoint_listed_twice_in_a_target_is_an_error() {
    let dir = tmp();
    let text = one_site("").replace("[127.0.0.1:4001]", "[127.0.0.1:4001, 127.0.0.1:4001]");
    let e = errs(&text, dir.path());
    let err = at(&e, "sites[0].targets.green.endpoints[1]");
    assert!(err.message.contains("twice"), "{e}");
    assert_eq!(e.errors.len(), 1, "{e}");
}

/// Hosts are matched as requests are: a fully qualified name's trailing dot
/// is dropped (so it can clash with the same name without one), and what
/// could never match (a `*` within a name, a non-ASCII name, an empty label)
/// is refused rather than left to 404 every request.
#[test]
fn hosts_are_normalised_and_unmatchable_ones_refused() {
    let dir = tmp();
    let c = ok(&one_site("").replace("[shop.example.com]", "[Shop.Example.COM., \"[::1]\", 10.0.0.1]"), dir.path());
    assert_eq!(c.sites[0].hosts, ["shop.example.com", "[::1]", "10.0.0.1"]);
    let text = one_site("").replace("[shop.example.com]", "[shop.example.com, shop.example.com.]");
    assert!(at(&errs(&text, dir.path()), "sites[0].hosts[1]").message.contains("duplicate"));
    for bad in ["\"*.example.com\"", "ünï.test", "a..b", "-bad.test", "\"\"", "\"[zz]\""] {
        let text = one_site("").replace("[shop.example.com]", &format!("[{bad}]"));
        let e = errs(&text, dir.path());
        let err = at(&e, "sites[0].hosts[0]");
        assert!(!err.message.is_empty() && e.errors.len() == 1, "{bad}: {e}");
    }
    let text = one_site("").replace("[shop.example.com]", "[\"*.example.com\"]");
    assert!(at(&errs(&text, dir.path()), "sites[0].hosts[0]").message.contains("wildcard"));
}

/// An empty declared version is refused (it would show as a blank, and
/// `expect_version: ""` could match it).
#[test]
fn an_empty_version_is_an_error() {
    let dir = tmp();
    let text =
        one_site("").replace("{ endpoints: [127.0.0.1:4001] }", "{ endpoints: [127.0.0.1:4001], version: \"\" }");
    assert!(at(&errs(&text, dir.path()), "sites[0].targets.green.version").message.contains("empty"));
}

/// Limits too large to run with, listeners that clash, and probe or smoke
/// requests that could not be sent are refused at check time.
#[test]
fn unusable_limits_clashing_listeners_and_unsendable_probes_are_refused() {
    let dir = tmp();
    let text = one_site(
        "    health: { path: \"/up now\", host: \"bad host\" }\n    switch:\n      smoke:\n        - { path: \"/a b\" }\n",
    );
    let text = text.replacen(
        "listen:\n  http: 127.0.0.1:8080\n",
        "listen:\n  http: 127.0.0.1:8080\n  https: 127.0.0.1:8080\nadmin: { listen: 127.0.0.1:8080 }\nlimits: { max_connections: 18446744073709551615, max_header_bytes: 4294967296 }\n",
        1,
    );
    let e = errs(&text, dir.path());
    for p in [
        "listen.https",
        "admin.listen",
        "limits.max_connections",
        "limits.max_header_bytes",
        "sites[0].health.path",
        "sites[0].health.host",
        "sites[0].switch.smoke[0].path",
    ] {
        assert!(paths(&e).contains(&p), "no error at {p}; errors:\n{e}");
    }
    // Port 0 (ephemeral) never clashes.
    let text = one_site("").replacen("http: 127.0.0.1:8080", "http: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }", 1);
    ok(&text, dir.path());
}

#[test]
fn unknown_key_paths_are_exact() {
    let dir = tmp();
    let cases = [
        ("      blue: { endpoints: [127.0.0.1:3001], foo: 1 }\n", "sites[0].targets.blue.foo"),
        ("      blue: { endpoints: [127.0.0.1:3001] }\n    helth: {}\n", "sites[0].helth"),
        (
            "      blue: { endpoints: [127.0.0.1:3001] }\n    health: { path: /up, intervall: 2s }\n",
            "sites[0].health.intervall",
        ),
        (
            "      blue: { endpoints: [127.0.0.1:3001] }\n    switch:\n      smoke:\n        - { path: /, status: 200 }\n",
            "sites[0].switch.smoke[0].status",
        ),
    ];
    for (targets, path) in cases {
        let text = with_listen(&format!(
            "sites:\n  - name: shop\n    hosts: [shop.example.com]\n    live: blue\n    targets:\n{targets}"
        ));
        let e = errs(&text, dir.path());
        let err = at(&e, path);
        assert_eq!(err.message, "unknown key", "{e}");
        assert_eq!(&err.value, path.rsplit('.').next().unwrap());
    }

    // Top level and inside top-level sections.
    let e =
        errs(&with_listen(&format!("limits: {{ max_conns: 5 }}\nextra: 1\n42: x\nsites:\n{SITE_BLOCK}")), dir.path());
    assert_eq!(at(&e, "limits.max_conns").message, "unknown key");
    assert_eq!(at(&e, "extra").message, "unknown key");
    assert_eq!(at(&e, "42").message, "unknown key", "a non-string key is named too");
    assert_eq!(e.errors.len(), 3, "{e}");
    let e =
        errs(&format!("listen: {{ http: 127.0.0.1:8080, htps: 127.0.0.1:8443 }}\nsites:\n{SITE_BLOCK}"), dir.path());
    assert_eq!(at(&e, "listen.htps").message, "unknown key");
}

#[test]
fn the_offending_value_is_reported() {
    let dir = tmp();
    let text = one_site("").replace("[127.0.0.1:4001]", "[127.0.0.1:4001, \"nope:abc\"]");
    let e = errs(&text, dir.path());
    let err = at(&e, "sites[0].targets.green.endpoints[1]");
    assert_eq!(err.value, "nope:abc");
    assert!(err.message.contains("port"), "{e}");
    assert!(e.to_string().contains("\"nope:abc\""), "Display shows the value: {e}");
    assert!(e.to_string().contains("sites[0].targets.green.endpoints[1]"), "{e}");

    let e = errs(&one_site("").replace("127.0.0.1:8080", "localhost:8080"), dir.path());
    assert_eq!(at(&e, "listen.http").value, "localhost:8080");

    // A value of the wrong kind is shown as written, and its kind named.
    let e = errs(&with_listen("sites: 5\n"), dir.path());
    let err = at(&e, "sites");
    assert_eq!(err.value, "5");
    assert!(err.message.contains("a number"), "{e}");
}

#[test]
fn expect_status_forms() {
    let dir = tmp();
    let status = |v: &str| {
        let c = ok(&one_site(&format!("    health:\n      expect_status: {v}\n")), dir.path());
        c.sites[0].health.expect_status.clone()
    };
    assert_eq!(status("200").0, [200..=200]);
    assert_eq!(status("\"200-399\"").0, [200..=399]);
    assert_eq!(status("200-399").0, [200..=399]);
    let s = status("\"200,204\"");
    assert!(s.contains(200) && s.contains(204));
    assert!(!s.contains(201) && !s.contains(203) && !s.contains(205));
    let s = status("[200, \"300-302\"]");
    assert!(s.contains(200) && s.contains(301) && !s.contains(201) && !s.contains(303));
    // Default when not given.
    let c = ok(&one_site(""), dir.path());
    assert_eq!(c.sites[0].health.expect_status.0, [200..=399]);

    for bad in ["abc", "600", "99", "\"399-200\"", "\"200,\"", "true", "\"\"", "{ a: 1 }"] {
        let e = errs(&one_site(&format!("    health:\n      expect_status: {bad}\n")), dir.path());
        let err = at(&e, "sites[0].health.expect_status");
        assert!(err.message.contains("status"), "{bad}: {e}");
    }
    // Smoke checks use the same forms, with their own path.
    let e = errs(
        &one_site("    switch:\n      smoke:\n        - { path: /, expect_status: 200 }\n        - { path: /up, expect_status: \"2xx\" }\n"),
        dir.path(),
    );
    assert_eq!(at(&e, "sites[0].switch.smoke[1].expect_status").value, "2xx");
    assert_eq!(e.errors.len(), 1, "{e}");
}

#[test]
fn trusted_proxies_accept_ips_and_cidrs() {
    let dir = tmp();
    let c = ok(
        &one_site("").replace("sites:", "trusted_proxies: [10.0.0.0/8, 192.168.1.10, \"::1\", \"fd00::/8\"]\nsites:"),
        dir.path(),
    );
    let got: Vec<String> = c.trusted_proxies.iter().map(ToString::to_string).collect();
    assert_eq!(got, ["10.0.0.0/8", "192.168.1.10/32", "::1/128", "fd00::/8"]);

    let c = ok(&one_site(""), dir.path());
    assert!(c.trusted_proxies.is_empty(), "default: trust nobody");

    let e = errs(
        &one_site("").replace("sites:", "trusted_proxies: [10.0.0.0/8, garbage, 10.0.0.0/33, 1.2.3]\nsites:"),
        dir.path(),
    );
    assert_eq!(paths(&e), ["trusted_proxies[1]", "trusted_proxies[2]", "trusted_proxies[3]"], "{e}");
    assert_eq!(at(&e, "trusted_proxies[1]").value, "garbage");
}

// ---------------------------------------------------------------------------
// files: TLS, tokens, maintenance page, relative paths

fn https_config(cert: &str, key: &str) -> String {
    format!(
        "listen:\n  http: 127.0.0.1:8080\n  https: 127.0.0.1:8443\ntls:\n  certificates:\n    - cert: {cert}\n      key: {key}\nsites:\n{SITE_BLOCK}"
    )
}

#[test]
fn tls_files_that_do_not_parse_are_rejected() {
    let dir = tmp();
    fs::write(dir.path().join("garbage.pem"), "this is not a certificate\n").unwrap();
    fs::write(dir.path().join("garbage.key"), b"\x00\x01\x02 definitely not a key").unwrap();
    let e = errs(&https_config("garbage.pem", "garbage.key"), dir.path());
    let cert = at(&e, "tls.certificates[0].cert");
    assert!(cert.message.contains("no PEM certificate could be parsed"), "{e}");
    assert!(cert.message.contains("garbage.pem"), "the resolved file is named: {e}");
    assert_eq!(cert.value, "garbage.pem");
    let key = at(&e, "tls.certificates[0].key");
    assert!(key.message.contains("no PEM private key"), "{e}");
    assert_eq!(e.errors.len(), 2, "{e}");

    // A PEM block of another kind is not a certificate either.
    fs::write(dir.path().join("other.pem"), "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap();
    let e = errs(&https_config("other.pem", "garbage.key"), dir.path());
    assert!(at(&e, "tls.certificates[0].cert").message.contains("no PEM certificate"), "{e}");
}

#[test]
fn tls_files_that_are_missing_are_rejected() {
    let dir = tmp();
    let e = errs(&https_config("certs/missing.pem", "/nonexistent/missing.key"), dir.path());
    let cert = at(&e, "tls.certificates[0].cert");
    assert!(cert.message.contains("cannot read"), "{e}");
    // Relative paths are resolved against the base directory.
    let resolved = dir.path().join("certs/missing.pem");
    assert!(cert.message.contains(&resolved.display().to_string()), "{e}");
    assert!(at(&e, "tls.certificates[0].key").message.contains("cannot read"), "{e}");
}

#[test]
fn https_without_tls_certificates_is_rejected() {
    let dir = tmp();
    let e =
        errs(&format!("listen:\n  http: 127.0.0.1:8080\n  https: 127.0.0.1:8443\nsites:\n{SITE_BLOCK}"), dir.path());
    assert!(at(&e, "tls.certificates").message.contains("listen.https"), "{e}");
    // Reported with another error of `listen`, not only once that is fixed.
    let e = errs(&format!("listen:\n  http: nonsense\n  https: 127.0.0.1:8443\nsites:\n{SITE_BLOCK}"), dir.path());
    at(&e, "listen.http");
    assert!(at(&e, "tls.certificates").message.contains("listen.https"), "{e}");
    let e = errs(
        &format!(
            "listen:\n  http: 127.0.0.1:8080\n  https: 127.0.0.1:8443\ntls:\n  certificates: []\nsites:\n{SITE_BLOCK}"
        ),
        dir.path(),
    );
    at(&e, "tls.certificates");
}

#[test]
fn admin_token_file_allows_a_non_loopback_admin() {
    let dir = tmp();
    fs::write(dir.path().join("admin-token"), "s3cret\n").unwrap();
    let text = one_site("").replace("sites:", "admin:\n  listen: 0.0.0.0:9901\n  token_file: admin-token\nsites:");
    let c = ok(&text, dir.path());
    assert_eq!(c.admin.listen, "0.0.0.0:9901".parse::<SocketAddr>().unwrap());
    assert_eq!(c.admin.token.as_deref(), Some("s3cret"), "read relative to the base dir, trimmed");

    // An absolute token_file path is used as is, whatever the base directory.
    let other = tmp();
    let abs = dir.path().join("admin-token");
    let text = one_site("")
        .replace("sites:", &format!("admin:\n  listen: 0.0.0.0:9901\n  token_file: {}\nsites:", abs.display()));
    assert_eq!(ok(&text, other.path()).admin.token.as_deref(), Some("s3cret"));

    // Without a token it is refused, and so is an empty or missing token file.
    let e = errs(&one_site("").replace("sites:", "admin:\n  listen: 0.0.0.0:9901\nsites:"), dir.path());
    assert_eq!(paths(&e), ["admin.listen"]);
    fs::write(dir.path().join("empty-token"), " \n").unwrap();
    let e = errs(
        &one_site("").replace("sites:", "admin:\n  listen: 127.0.0.1:9901\n  token_file: empty-token\nsites:"),
        dir.path(),
    );
    assert!(at(&e, "admin.token_file").message.contains("empty"), "{e}");
    let e = errs(&one_site("").replace("sites:", "admin:\n  token_file: no-such-token\nsites:"), dir.path());
    assert!(at(&e, "admin.token_file").message.contains("cannot read"), "{e}");
    // A bad listen address does not hide a bad token setting.
    let e = errs(
        &one_site("").replace("sites:", "admin:\n  listen: nowhere\n  token_file: no-such-token\nsites:"),
        dir.path(),
    );
    assert_eq!(paths(&e), ["admin.listen", "admin.token_file"], "{e}");
    // IPv6 loopback needs no token.
    let c = ok(&one_site("").replace("sites:", "admin:\n  listen: \"[::1]:9901\"\nsites:"), dir.path());
    assert_eq!(c.admin.token, None);
}

#[test]
fn admin_token_env_is_read_and_must_be_set() {
    let dir = tmp();
    // PATH is set in any environment that runs cargo.
    let path_var = std::env::var("PATH").expect("PATH is set");
    let text = one_site("").replace("sites:", "admin:\n  listen: 0.0.0.0:9901\n  token_env: PATH\nsites:");
    assert_eq!(ok(&text, dir.path()).admin.token.as_deref(), Some(path_var.trim()));

    let var = "CUTOVER_TEST_VARIABLE_THAT_IS_NEVER_SET_7f3a";
    assert!(std::env::var_os(var).is_none());
    let e = errs(&one_site("").replace("sites:", &format!("admin:\n  token_env: {var}\nsites:")), dir.path());
    assert_eq!(at(&e, "admin.token_env").value, var);

    let e = errs(&one_site("").replace("sites:", "admin:\n  token_env: PATH\n  token_file: t\nsites:"), dir.path());
    assert!(e.to_string().contains("not both"), "{e}");

    let e = errs(&one_site(&format!("    preview:\n      token_env: {var}\n")), dir.path());
    assert_eq!(at(&e, "sites[0].preview.token_env").value, var);
}

#[test]
fn relative_paths_are_resolved_against_the_base_dir() {
    let dir = tmp();
    fs::write(dir.path().join("down.html"), "<h1>down</h1>").unwrap();
    let c = ok(&one_site("    maintenance:\n      page: down.html\n"), dir.path());
    assert_eq!(c.state_path, dir.path().join("cutover-state.json"), "default state path");
    assert_eq!(c.sites[0].maintenance_page.as_deref(), Some(dir.path().join("down.html").as_path()));

    let c = ok(&one_site("").replace("sites:", "state:\n  path: /var/lib/cutover/state.json\nsites:"), dir.path());
    assert_eq!(c.state_path, Path::new("/var/lib/cutover/state.json"));
    let c = ok(&one_site("").replace("sites:", "state:\n  path: run/state.json\nsites:"), dir.path());
    assert_eq!(c.state_path, dir.path().join("run/state.json"));

    let e = errs(&one_site("    maintenance:\n      page: missing.html\n"), dir.path());
    assert!(at(&e, "sites[0].maintenance.page").message.contains("cannot read"), "{e}");
}

#[test]
fn upstream_tls_options() {
    let dir = tmp();
    fs::write(dir.path().join("ca.pem"), "not pem").unwrap();
    let e = errs(
        &one_site("").replace(
            "blue: { endpoints: [127.0.0.1:3001] }",
            "blue: { endpoints: [127.0.0.1:3001], tls: true, ca: ca.pem, protocol: h3 }",
        ),
        dir.path(),
    );
    assert!(at(&e, "sites[0].targets.blue.ca").message.contains("no PEM certificate"), "{e}");
    assert_eq!(at(&e, "sites[0].targets.blue.protocol").value, "h3");

    let e = errs(
        &one_site("").replace(
            "blue: { endpoints: [127.0.0.1:3001] }",
            "blue: { endpoints: [127.0.0.1:3001], server_name: api.internal }",
        ),
        dir.path(),
    );
    assert!(at(&e, "sites[0].targets.blue.tls").message.contains("tls: true"), "{e}");

    let e = errs(
        &one_site("").replace(
            "blue: { endpoints: [127.0.0.1:3001] }",
            "blue: { endpoints: [127.0.0.1:3001], tls: true, server_name: \"api internal!\" }",
        ),
        dir.path(),
    );
    let bad = at(&e, "sites[0].targets.blue.server_name");
    assert_eq!(bad.value, "api internal!");
    assert!(bad.message.contains("DNS name"), "{e}");
}

// ---------------------------------------------------------------------------
// sites, hosts, targets

#[test]
fn hosts_are_lower_cased() {
    let dir = tmp();
    let text = one_site("    preview:\n      hosts: { Green.Shop.Example.COM: green }\n")
        .replace("[shop.example.com]", "[Shop.Example.COM, LOCALHOST, \"*\"]");
    let c = ok(&text, dir.path());
    assert_eq!(c.sites[0].hosts, ["shop.example.com", "localhost", "*"]);
    let preview: Vec<&str> = c.sites[0].preview.hosts.keys().map(String::as_str).collect();
    assert_eq!(preview, ["green.shop.example.com"]);

    // So duplicates are found whatever the case.
    let e = errs(&one_site("").replace("[shop.example.com]", "[shop.example.com, SHOP.example.com]"), dir.path());
    assert_eq!(at(&e, "sites[0].hosts[1]").value, "shop.example.com");

    for bad in ["shop.example.com:8080", "http://shop.example.com", "two words", "\"\""] {
        let e = errs(&one_site("").replace("[shop.example.com]", &format!("[{bad}]")), dir.path());
        at(&e, "sites[0].hosts[0]");
    }
}

#[test]
fn duplicate_hosts_across_sites_point_at_the_right_entry() {
    let dir = tmp();
    let text = with_listen(
        "\
sites:
  - name: shop
    hosts: [shop.example.com]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:3001] }
  - name: api
    hosts: [\"http://bad\", api.example.com, Shop.Example.Com]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:3002] }
    preview:
      hosts: { api.example.com: blue }
",
    );
    let e = errs(&text, dir.path());
    at(&e, "sites[1].hosts[0]"); // the malformed one
    let dup = at(&e, "sites[1].hosts[2]");
    assert_eq!(dup.value, "shop.example.com");
    assert!(dup.message.contains("sites[0]"), "{e}");
    // A preview host may not be one of the site hosts either.
    assert!(
        e.errors.iter().any(|x| x.path.starts_with("sites[1].preview.hosts") && x.value == "api.example.com"),
        "{e}"
    );
    assert_eq!(e.errors.len(), 3, "{e}");

    // The "*" default site may exist only once.
    let text = with_listen(&format!(
        "sites:\n{}{}",
        SITE_BLOCK.replace("[shop.example.com]", "[\"*\"]"),
        SITE_BLOCK.replace("name: shop", "name: api").replace("[shop.example.com]", "[\"*\"]"),
    ));
    assert_eq!(at(&errs(&text, dir.path()), "sites[1].hosts[0]").value, "*");
}

#[test]
fn preview_hosts_must_name_a_known_target() {
    let dir = tmp();
    let e = errs(
        &one_site("    preview:\n      hosts: { green.shop.example.com: green, purple.shop.example.com: purple }\n"),
        dir.path(),
    );
    assert_eq!(e.errors.len(), 1, "{e}");
    let err = &e.errors[0];
    assert_eq!(err.path, "sites[0].preview.hosts.purple.shop.example.com");
    assert_eq!(err.value, "purple");
    assert!(err.message.contains("no such target"), "{e}");

    let e = errs(&one_site("    preview:\n      hosts: { \"*\": green }\n"), dir.path());
    at(&e, "sites[0].preview.hosts.*");
    let e = errs(&one_site("    preview:\n      header: \"bad header\"\n"), dir.path());
    at(&e, "sites[0].preview.header");
}

#[test]
fn names_and_required_sections() {
    let dir = tmp();
    // Site and target names are [a-z0-9-]+.
    let e = errs(&one_site("").replace("name: shop", "name: my_shop"), dir.path());
    assert_eq!(at(&e, "sites[0].name").value, "my_shop");
    let e = errs(&one_site("").replace("      green:", "      Green_1:"), dir.path());
    assert_eq!(at(&e, "sites[0].targets.Green_1").value, "Green_1");

    // Required pieces.
    let e = errs("", dir.path());
    at(&e, "listen.http");
    at(&e, "sites");
    let e = errs(&with_listen("sites: []\n"), dir.path());
    at(&e, "sites");
    let e = errs(&with_listen("sites:\n  - name: shop\n    hosts: []\n    live: blue\n    targets: {}\n"), dir.path());
    at(&e, "sites[0].hosts");
    at(&e, "sites[0].targets");
    at(&e, "sites[0].live");
    let e = errs(
        &with_listen("sites:\n  - name: shop\n    live: blue\n    targets:\n      blue: { endpoints: [] }\n"),
        dir.path(),
    );
    assert!(e.to_string().contains("hosts"), "missing field named: {e}");

    // Not YAML, or not a mapping.
    let e = errs("listen: [unclosed\n", dir.path());
    assert!(e.errors[0].message.contains("YAML"), "{e}");
    let e = errs("- a\n- b\n", dir.path());
    assert_eq!(e.errors.len(), 1, "{e}");
}

#[test]
fn durations_and_numbers_are_checked() {
    let dir = tmp();
    let e = errs(&one_site("").replace("sites:", "shutdown_timeout: 30\nsites:"), dir.path());
    assert_eq!(at(&e, "shutdown_timeout").value, "30");
    let e = errs(&one_site("    health:\n      interval: soon\n"), dir.path());
    at(&e, "sites[0].health.interval");
    let e = errs(&one_site("").replace("sites:", "limits:\n  upstream_connect_timeout: 3 parsecs\nsites:"), dir.path());
    at(&e, "limits.upstream_connect_timeout");
    let e = errs(
        &one_site("")
            .replace("sites:", "limits:\n  idle_timeout: 0s\n  max_header_bytes: 10\n  max_connections: 0\nsites:"),
        dir.path(),
    );
    assert_eq!(paths(&e), ["limits.idle_timeout", "limits.max_header_bytes", "limits.max_connections"], "{e}");

    let c = ok(
        &one_site("    switch:\n      drain_timeout: 250ms\n      close_spread: 1m 30s\n    read_only:\n      retry_after: 5m\n")
            .replace("sites:", "shutdown_timeout: 2m\nsites:"),
        dir.path(),
    );
    assert_eq!(c.shutdown_timeout, secs(120));
    assert_eq!(c.sites[0].switch.drain_timeout, Duration::from_millis(250));
    assert_eq!(c.sites[0].switch.close_spread, secs(90));
    assert_eq!(c.sites[0].read_only.retry_after, secs(300));

    let e = errs(
        &one_site("    health:\n      interval: 0s\n      path: up\n    switch:\n      require: most_healthy\n      watch: { duration: 0s, max_error_rate: 1.5, min_requests: 0 }\n    pause: { max_held: 0 }\n    read_only: { allow_paths: [up] }\n"),
        dir.path(),
    );
    for p in [
        "sites[0].health.interval",
        "sites[0].health.path",
        "sites[0].switch.require",
        "sites[0].switch.watch.duration",
        "sites[0].switch.watch.max_error_rate",
        "sites[0].switch.watch.min_requests",
        "sites[0].pause.max_held",
        "sites[0].read_only.allow_paths[0]",
    ] {
        at(&e, p);
    }
}

#[test]
fn a_broken_site_does_not_hide_the_others() {
    let dir = tmp();
    let text = with_listen(
        "\
sites:
  - name: shop
    hosts: [shop.example.com]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:3001], typo: 1 }
  - name: api
    hosts: [api.example.com]
    live: green
    targets:
      blue: { endpoints: [127.0.0.1:3002] }
",
    );
    let e = errs(&text, dir.path());
    assert_eq!(paths(&e), ["sites[0].targets.blue.typo", "sites[1].live"], "{e}");
}

// ---------------------------------------------------------------------------
// validate_endpoint

#[test]
fn endpoints_are_host_and_port() {
    for good in ["127.0.0.1:80", "[::1]:80", "app.internal:8080", "localhost:65535", "my-app-1:1"] {
        assert_eq!(validate_endpoint(good), Ok(()), "{good}");
    }
    for bad in [
        "nope",
        "host:0",
        "127.0.0.1:0",
        "[::1]:0",
        "host:99999",
        ":80",
        "a b:80",
        "host:",
        "host:-1",
        "http://host:80",
        "::1:80",
        "a..b:80",
        "1.2.3.4.5:80",
        "999.1.1.1:80",
        "10.0.0:80",
        "-x-:80",
        "app-.internal:80",
        "",
    ] {
        let r = validate_endpoint(bad);
        assert!(r.is_err(), "{bad:?} must be rejected");
        assert!(!r.unwrap_err().is_empty());
    }
    assert!(validate_endpoint("host:99999").unwrap_err().contains("99999"));
    assert!(validate_endpoint("nope").unwrap_err().contains("host:port"));
}
