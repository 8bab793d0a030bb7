//! Release modes (SPEC §3, §4): read-only, maintenance, pause, preview and
//! sticky canary weights, each checked at the origin.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;
use support::{dead_addr, Client, Options, Origin, Proxy};

fn shop(targets: &[(&str, Vec<SocketAddr>, &str)], extra: &str) -> String {
    let mut s = "  - name: shop\n    hosts: [shop.test]\n    live: blue\n    targets:\n".to_string();
    for (t, eps, attrs) in targets {
        let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
        s.push_str(&format!("      {t}: {{ endpoints: [{}], version: {t}-v1 {attrs} }}\n", eps.join(", ")));
    }
    s.push_str(
        "    health: { path: /up, interval: 30ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1 }\n",
    );
    s.push_str("    read_only: { retry_after: 2500ms, allow_paths: [/login, /api/search/*] }\n");
    s.push_str(extra);
    s
}

fn req(method: &str, path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "shop.test")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Site read-only: reads pass, writes get 503 + Retry-After (whole seconds) +
/// `x-cutover-read-only: 1` and never reach the origin (not even their body);
/// `allow_paths` pass; JSON for clients that accept it; the mode survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_refuses_writes_at_the_edge() {
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr], "")], "")).await;
    let (status, site) = p.api("PUT", "/v1/sites/shop/mode", Some(json!({"read_only": true}))).await;
    assert_eq!((status, site["mode"]["read_only"].as_bool()), (200, Some(true)), "{site}");
    let mut c = Client::connect(p.addr).await;
    for m in ["GET", "HEAD", "OPTIONS"] {
        assert_eq!(c.send(req(m, "/page", "")).await.unwrap().status, 200, "{m}");
    }
    for m in ["POST", "PUT", "PATCH", "DELETE"] {
        let a = c.send(req(m, "/orders", "secret-body")).await.unwrap();
        assert_eq!(a.status, 503, "{m}");
        assert_eq!(a.headers["retry-after"], "3");
        assert_eq!(a.headers["x-cutover-read-only"], "1");
        assert!(a.body.contains("read-only"), "{}", a.body);
    }
    let mut json_req = req("POST", "/orders", "{}");
    json_req.headers_mut().insert("accept", "application/json".parse().unwrap());
    let a = c.send(json_req).await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!((body["error"]["code"].as_str(), body["error"]["retry_after"].as_u64()), (Some("read_only"), Some(3)));
    assert_eq!(c.send(req("POST", "/login", "u=1")).await.unwrap().status, 200);
    assert_eq!(c.send(req("POST", "/api/search/q", "q")).await.unwrap().status, 200);
    assert_eq!(c.send(req("POST", "/loginx", "")).await.unwrap().status, 503);
    // A path the upstream could resolve elsewhere is never an allowed path.
    for sneaky in [
        "/api/search/../../orders",
        "/api/search/%2e%2e/orders",
        "/api/search/..%2forders",
        "/api/search/..;/orders",
        "/api/search/.;/../orders",
        "/api/search/..%3b/orders",
        "/api/search/%252e%252e/orders",
    ] {
        assert_eq!(c.send(req("POST", sneaky, "x")).await.unwrap().status, 503, "{sneaky}");
    }
    let writes: Vec<_> =
        blue.seen().into_iter().filter(|s| !["GET", "HEAD", "OPTIONS"].contains(&s.method.as_str())).collect();
    assert_eq!(
        writes.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
        ["/login", "/api/search/q"],
        "a refused write reached the origin"
    );
    // Refusals are counted under the target they were meant for (SPEC §6);
    // that they are not its errors is the watch's business (tests/release.rs).
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_requests_total{code="5xx",site="shop",target="blue"} "#), "{metrics}");
    assert!(!metrics.contains(r#"cutover_requests_total{code="5xx",site="shop",target="blue"} 0"#), "{metrics}");
    assert!(metrics.contains(r#"cutover_site_mode{mode="read_only",site="shop"} 1"#));
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert_eq!((history[0]["kind"].as_str(), history[0]["reason"].as_str()), (Some("mode"), Some("read_only on")));

    // Durable: a restart keeps the mode.
    let dir = p.stop().await;
    let p = Proxy::start_with(
        &shop(&[("blue", vec![blue.addr], "")], ""),
        Options { dir: Some(dir), ..Default::default() },
    )
    .await;
    assert_eq!(Client::connect(p.addr).await.send(req("POST", "/x", "")).await.unwrap().status, 503);
    p.api("PUT", "/v1/sites/shop/mode", Some(json!({"read_only": false}))).await;
    assert_eq!(Client::connect(p.addr).await.send(req("POST", "/x", "")).await.unwrap().status, 200);
}

/// A target marked `read_only: true` (a clone) refuses writes whenever it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_target_refuses_writes_while_live() {
    let (blue, clone) = (Origin::start("blue").await, Origin::start("clone").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr], ""), ("clone", vec![clone.addr], ", read_only: true")], ""))
        .await;
    p.wait_healthy("shop", &["blue", "clone"]).await;
    let mut c = Client::connect(p.addr).await;
    assert_eq!(c.send(req("POST", "/w", "x")).await.unwrap().status, 200);
    p.switch("shop", "clone").await;
    assert_eq!(c.send(req("GET", "/", "")).await.unwrap().body, "clone");
    assert_eq!(c.send(req("POST", "/w", "x")).await.unwrap().status, 503);
    assert!(clone.seen().iter().all(|s| s.method == "GET"));
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["targets"]["clone"]["read_only"], true);
}

/// Maintenance: every request gets 503 with the configured page and
/// `Retry-After`, except `allow_paths`; the built-in page otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_serves_the_page() {
    let blue = Origin::start("blue").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("down.html"), "<h1>Back at 14:00</h1>").unwrap();
    let page = dir.path().join("down.html");
    let p = Proxy::start(&shop(
        &[("blue", vec![blue.addr], "")],
        &format!("    maintenance: {{ page: \"{}\" }}\n", page.display()),
    ))
    .await;
    p.api("PUT", "/v1/sites/shop/mode", Some(json!({"maintenance": true}))).await;
    let mut c = Client::connect(p.addr).await;
    for m in ["GET", "POST"] {
        let a = c.send(req(m, "/shop", "")).await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (503, "<h1>Back at 14:00</h1>"));
        assert_eq!(a.headers["retry-after"], "3");
        assert!(a.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    }
    assert_eq!(c.send(req("GET", "/login", "")).await.unwrap().status, 200);
    assert_eq!(blue.seen().iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), ["/login"]);

    let p2 = Proxy::start(&shop(&[("blue", vec![blue.addr], "")], "")).await;
    p2.api("PUT", "/v1/sites/shop/mode", Some(json!({"maintenance": true}))).await;
    let a = support::get(p2.addr, "shop.test", "/").await;
    assert_eq!(a.status, 503);
    assert!(a.body.contains("maintenance"), "{}", a.body);
    let (status, _) = p2.api("PUT", "/v1/sites/shop/mode", Some(json!({}))).await;
    assert_eq!(status, 400, "an empty mode change is a bad request");
}

/// Maintenance exempts only `read_only.allow_paths` (SPEC §3), and a path an
/// upstream could resolve to another one is never exempt: dot segments,
/// encoded dots or slashes, `;` parameters, a double-encoded `%`, overlong
/// UTF-8 or `%u` dots, a backslash, another case or a doubled slash all get
/// the maintenance page, with any method; only the exact allowed paths reach the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_exemptions_cannot_be_reached_by_traversal() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr], "")], "")).await;
    let (status, site) = p.api("PUT", "/v1/sites/shop/mode", Some(json!({"maintenance": true}))).await;
    assert_eq!((status, site["mode"]["maintenance"].as_bool()), (200, Some(true)), "{site}");
    let mut c = Client::connect(p.addr).await;
    for m in ["GET", "POST"] {
        for sneaky in [
            "/api/search/../../orders",
            "/api/search/%2e%2e/orders",
            "/api/search/%2E%2E/%2e%2e/orders",
            "/api/search/..%2forders",
            "/api/search/..%2Forders",
            "/api/search/..;/orders",
            "/api/search/.;/../orders",
            "/api/search/..%3b/orders",
            "/api/search/%252e%252e/orders",
            "/api/search/./../orders",
            // What lenient decoders read as `..` (overlong UTF-8, IIS's %u).
            "/api/search/%c0%ae%c0%ae/orders",
            "/api/search/%e0%80%ae%e0%80%ae/orders",
            "/api/search/%u002e%u002e/orders",
            "/login/..",
            "/login;jsessionid=1",
            "/login/.",
            "/LOGIN",
            "//login",
        ] {
            let a = c.send(req(m, sneaky, "")).await.unwrap();
            assert_eq!((a.status, a.headers.contains_key("retry-after")), (503, true), "{m} {sneaky}");
            assert!(a.body.contains("maintenance"), "{m} {sneaky}: {}", a.body);
        }
    }
    // A backslash cannot be sent through an http::Uri: raw bytes.
    for sneaky in ["/api/search/..\\..\\orders", "/api/search/%5c..%5corders"] {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let head = format!("GET {sneaky} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 503") || out.starts_with("HTTP/1.1 400"), "{sneaky}: {out}");
    }
    // The control: the exempt paths themselves are served.
    assert_eq!(c.send(req("GET", "/login", "")).await.unwrap().status, 200);
    assert_eq!(c.send(req("POST", "/api/search/q", "q")).await.unwrap().status, 200);
    let seen: Vec<_> = blue.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(seen, ["/login", "/api/search/q"], "a request got past maintenance");
}

/// Pause → switch → resume: N concurrent requests are held, released in
/// order to the new live target, and all succeed; the held gauge follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_switch_resume_gives_zero_errors() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&shop(
        &[("blue", vec![blue.addr], ""), ("green", vec![green.addr], "")],
        "    pause: { resume_spread: 200ms }\n",
    ))
    .await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let (status, site) = p.api("POST", "/v1/sites/shop/pause", Some(json!({"timeout": "10s"}))).await;
    assert_eq!((status, site["mode"]["paused"].as_bool()), (200, Some(true)), "{site}");
    let addr = p.addr;
    let mut held = Vec::new();
    for i in 0..40 {
        held.push(tokio::spawn(async move {
            let a = Client::connect(addr).await.send(req("POST", &format!("/order/{i}"), "x")).await.unwrap();
            (a.status, a.body, Instant::now())
        }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for _ in 0..200 {
        if p.api("GET", "/v1/sites/shop", None).await.1["held"] == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_held_requests{site="shop"} 40"#), "{metrics}");
    assert_eq!(blue.count() + green.count(), 0, "a held request reached an origin");
    p.switch("shop", "green").await;
    let resumed = Instant::now();
    let (status, site) = p.api("POST", "/v1/sites/shop/resume", None).await;
    assert_eq!((status, site["mode"]["paused"].as_bool()), (200, Some(false)));
    let mut done = Vec::new();
    for h in held {
        let (status, body, at) = h.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "green"));
        done.push(at - resumed);
    }
    let spread = done.iter().max().unwrap().saturating_sub(*done.iter().min().unwrap());
    assert!(spread >= Duration::from_millis(100), "released all at once ({spread:?})");
    // Arrival order: the paths reached green in the order the clients sent them.
    let order: Vec<usize> =
        green.seen().iter().map(|s| s.path.trim_start_matches("/order/").parse().unwrap()).collect();
    let inversions = order.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(inversions <= 4, "released out of order: {order:?}");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert_eq!(
        (history[0]["kind"].as_str(), history[0]["reason"].as_str()),
        (Some("resume"), Some("40 held request(s) released"))
    );
}

/// A pause holds at most `max_held` requests (beyond: 503) and each for at
/// most the pause timeout (then 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_queue_and_timeout_are_bounded() {
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr], "")], "    pause: { max_held: 2 }\n")).await;
    p.api("POST", "/v1/sites/shop/pause", Some(json!({"timeout": "600ms"}))).await;
    let addr = p.addr;
    let held: Vec<_> =
        (0..2).map(|_| tokio::spawn(async move { support::get(addr, "shop.test", "/").await })).collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let start = Instant::now();
    let beyond = support::get(p.addr, "shop.test", "/").await;
    assert_eq!(beyond.status, 503);
    assert!(start.elapsed() < Duration::from_millis(300), "a request beyond max_held was held");
    for h in held {
        assert_eq!(h.await.unwrap().status, 503);
    }
    assert_eq!(blue.count(), 0);
}

/// A held request outlives the connection's timeouts: held longer than
/// `header_read_timeout` and `idle_timeout`, on a new and on a kept-alive
/// connection, with and without a body, it is answered when the site resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_outlive_the_connection_timeouts() {
    let blue = Origin::start("blue").await;
    let opts = support::Options {
        extra: "limits: { header_read_timeout: 300ms, idle_timeout: 1s }".into(),
        ..Default::default()
    };
    let p = Proxy::start_with(&shop(&[("blue", vec![blue.addr], "")], ""), opts).await;
    p.wait_healthy("shop", &["blue"]).await;
    let mut kept = Client::connect(p.addr).await;
    assert_eq!(kept.send(req("GET", "/before", "")).await.unwrap().status, 200);
    p.api("POST", "/v1/sites/shop/pause", Some(json!({"timeout": "10s"}))).await;
    let addr = p.addr;
    let new = tokio::spawn(async move { Client::connect(addr).await.send(req("GET", "/new", "")).await });
    let kept = tokio::spawn(async move { kept.send(req("GET", "/kept", "")).await });
    // A request with a body: hyper's server reads it.
    let post = tokio::spawn(async move { Client::connect(addr).await.send(req("POST", "/post", "x")).await });
    // Held past both timeouts (the kept-alive connection idled only while the pause was saved).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["held"], 3);
    p.api("POST", "/v1/sites/shop/resume", None).await;
    for (name, h) in [("new", new), ("kept-alive", kept), ("POST", post)] {
        let a = h.await.unwrap().unwrap_or_else(|e| panic!("{name} connection: {e}"));
        assert_eq!((a.status, a.body.as_str()), (200, "blue"), "{name} connection");
    }
}

/// A previewed target that declares no version is labelled with the version
/// the endpoint that answered reports (`health.version_header`), even while
/// its endpoints run different ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_names_the_reported_version_when_none_is_declared() {
    let blue = Origin::start("blue").await;
    let (v41, v42) = (Origin::start("v41").await, Origin::start("v42").await);
    std::env::set_var("CUTOVER_TEST_PREVIEW_TOKEN_2", "peek");
    let sites = format!(
        "  - name: shop\n    hosts: [shop.test]\n    live: blue\n    targets:\n      blue: {{ endpoints: [\"{}\"] }}\n      clone: {{ endpoints: [\"{}\", \"{}\"] }}\n    health: {{ path: /up, version_header: x-app-version, interval: 30ms, healthy_threshold: 1 }}\n    preview: {{ token_env: CUTOVER_TEST_PREVIEW_TOKEN_2 }}\n",
        blue.addr, v41.addr, v42.addr
    );
    let p = Proxy::start(&sites).await;
    p.wait_healthy("shop", &["blue", "clone"]).await;
    let mut answered = std::collections::HashSet::new();
    for _ in 0..40 {
        let mut r = req("GET", "/", "");
        r.headers_mut().insert("x-cutover-target", "clone".parse().unwrap());
        r.headers_mut().insert("x-cutover-preview-token", "peek".parse().unwrap());
        let a = Client::connect(p.addr).await.send(r).await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["x-cutover-served-by"], format!("clone {}", a.body).as_str());
        answered.insert(a.body);
    }
    assert_eq!(answered.len(), 2, "one endpoint answered every preview: {answered:?}");
}

/// Preview by header and by preview host: answered by the named target with
/// `x-cutover-served-by`; a missing or unhealthy target gives 503 and a bad
/// token 403 — never the live target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_never_falls_back() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dead = dead_addr().await;
    std::env::set_var("CUTOVER_TEST_PREVIEW_TOKEN", "letmein");
    let extra = "    preview: { token_env: CUTOVER_TEST_PREVIEW_TOKEN, hosts: { green.shop.test: green } }\n";
    let p = Proxy::start(&shop(
        &[
            ("blue", vec![blue.addr], ""),
            ("green", vec![green.addr], ""),
            ("broken", vec![dead], ""),
            ("clone", vec![green.addr], ", read_only: true"),
        ],
        extra,
    ))
    .await;
    p.wait_healthy("shop", &["blue", "green", "clone"]).await;
    let preview = |target: &str, token: Option<&str>| {
        let mut r = req("GET", "/", "");
        r.headers_mut().insert("x-cutover-target", target.parse().unwrap());
        if let Some(t) = token {
            r.headers_mut().insert("x-cutover-preview-token", t.parse().unwrap());
        }
        r
    };
    let mut c = Client::connect(p.addr).await;
    let a = c.send(preview("green", Some("letmein"))).await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "green"));
    assert_eq!(a.headers["x-cutover-served-by"], "green green-v1");
    let seen = &green.seen()[0];
    // cutover's `x-cutover-served-by` replaces an upstream's.
    let mut forge = preview("green", Some("letmein"));
    *forge.uri_mut() = "/forge".parse().unwrap();
    let a = c.send(forge).await.unwrap();
    let served_by: Vec<_> = a.headers.get_all("x-cutover-served-by").iter().collect();
    assert_eq!(served_by, ["green green-v1"]);
    assert!(seen.headers.get("x-cutover-target").is_none() && seen.headers.get("x-cutover-preview-token").is_none());
    assert_eq!(c.send(preview("green", None)).await.unwrap().status, 403);
    assert_eq!(c.send(preview("green", Some("wrong"))).await.unwrap().status, 403);
    assert_eq!(c.send(preview("purple", Some("letmein"))).await.unwrap().status, 503);
    assert_eq!(c.send(preview("broken", Some("letmein"))).await.unwrap().status, 503);
    // Named twice, or with two tokens: which one counts is not guessed.
    let mut twice = preview("green", Some("letmein"));
    twice.headers_mut().append("x-cutover-target", "clone".parse().unwrap());
    assert_eq!(c.send(twice).await.unwrap().status, 503);
    let mut two_tokens = preview("green", Some("letmein"));
    two_tokens.headers_mut().append("x-cutover-preview-token", "wrong".parse().unwrap());
    assert_eq!(c.send(two_tokens).await.unwrap().status, 403);
    // Preview refusals are not the live target's answers: not counted under it.
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    for code in ["4xx", "5xx"] {
        let series = format!(r#"cutover_requests_total{{code="{code}",site="shop",target="blue"}} 0"#);
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
    // A write previewed on a read-only target is refused by it, and says so.
    let mut write = preview("clone", Some("letmein"));
    *write.method_mut() = http::Method::POST;
    let a = c.send(write).await.unwrap();
    assert_eq!((a.status, a.headers["x-cutover-read-only"].to_str().unwrap()), (503, "1"));
    assert_eq!(a.headers["x-cutover-served-by"], "clone clone-v1");
    // Preview host.
    let mut r = Request::get("/")
        .header("host", "green.shop.test")
        .header("x-cutover-preview-token", "letmein")
        .body(Full::default())
        .unwrap();
    r.headers_mut().insert("accept", "*/*".parse().unwrap());
    let a = c.send(r).await.unwrap();
    assert_eq!((a.body.as_str(), a.headers["x-cutover-served-by"].to_str().unwrap()), ("green", "green green-v1"));
    assert_eq!(support::get(p.addr, "green.shop.test", "/").await.status, 403);
    // Plain requests still go to the live target, without the header.
    let a = c.send(req("GET", "/", "")).await.unwrap();
    assert_eq!(a.body, "blue");
    assert!(a.headers.get("x-cutover-served-by").is_none());
    assert_eq!(blue.count(), 1, "a preview request reached the live target");
}

/// Without a `preview:` section the preview header is an ordinary header:
/// requests go to the live target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_is_off_unless_configured() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr], ""), ("green", vec![green.addr], "")], "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let mut r = req("GET", "/", "");
    r.headers_mut().insert("x-cutover-target", "green".parse().unwrap());
    let a = Client::connect(p.addr).await.send(r).await.unwrap();
    assert_eq!(a.body, "blue");
    assert!(a.headers.get("x-cutover-served-by").is_none());
}

/// Weights that give a share to a target known to be down (every endpoint
/// failing its checks) are refused (`409 target_unhealthy`, recorded) and
/// change nothing; back up, the same weights are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_for_a_target_that_is_down_are_refused() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    green.faults.health_fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let green_addr = green.addr;
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr], ""), ("green", vec![green_addr], "")], "")).await;
    p.wait_healthy("shop", &["blue"]).await;
    while p.api("GET", "/v1/sites/shop", None).await.1["targets"]["green"]["endpoints"][0]["healthy"] != json!(false) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let split = json!({"blue": 50, "green": 50});
    let (status, body) = p.api("PUT", "/v1/sites/shop/weights", Some(split.clone())).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("target_unhealthy")), "{body}");
    assert!(body["error"]["details"]["reasons"][0].as_str().unwrap().contains(&green_addr.to_string()), "{body}");
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["weights"], serde_json::Value::Null);
    let last = p.api("GET", "/v1/sites/shop/history", None).await.1[0].clone();
    assert_eq!((last["kind"].as_str(), last["result"].as_str()), (Some("weights"), Some("refused")), "{last}");
    green.faults.health_fail.store(false, std::sync::atomic::Ordering::Relaxed);
    p.wait_healthy("shop", &["green"]).await;
    let (status, body) = p.api("PUT", "/v1/sites/shop/weights", Some(split)).await;
    assert_eq!(status, 200, "{body}");
}

/// Canary weights: new clients get a `cutover-bucket` cookie and a share
/// within tolerance; a client keeps its target while the weights stand; a
/// switch (or DELETE) ends the split; bad weights change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_canary_weights() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr], ""), ("green", vec![green.addr], "")], "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let (status, body) = p.api("PUT", "/v1/sites/shop/weights", Some(json!({"blue": 80, "green": 10}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")), "{body}");
    let (status, _) = p.api("PUT", "/v1/sites/shop/weights", Some(json!({"blue": 80, "purple": 20}))).await;
    assert_eq!(status, 404);
    let (status, site) = p.api("PUT", "/v1/sites/shop/weights", Some(json!({"blue": 80, "green": 20}))).await;
    assert_eq!(status, 200, "{site}");
    assert_eq!(
        (site["targets"]["green"]["state"].as_str(), site["targets"]["blue"]["state"].as_str()),
        (Some("canary"), Some("live"))
    );
    assert_eq!(site["weights"], json!({"blue": 80, "green": 20}));

    let mut green_share = 0;
    let mut cookies = Vec::new();
    for _ in 0..1000 {
        let a = support::get(p.addr, "shop.test", "/").await;
        let cookie = a.headers["set-cookie"].to_str().unwrap().to_string();
        assert!(cookie.starts_with("cutover-bucket="), "{cookie}");
        if a.body == "green" {
            green_share += 1;
        }
        cookies.push((cookie.split(';').next().unwrap().to_string(), a.body));
    }
    assert!((130..=270).contains(&green_share), "green got {green_share} of 1000 at 20 %");
    // The bucket cookie goes out beside the upstream's own cookies.
    let a = support::get(p.addr, "shop.test", "/forge").await;
    let set: Vec<_> = a.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert!(set.len() == 2 && set[0] == "app=1" && set[1].starts_with("cutover-bucket="), "{set:?}");
    // Stickiness: each cookie keeps its target.
    for (cookie, first) in cookies.iter().take(30) {
        let mut c = Client::connect(p.addr).await;
        for _ in 0..5 {
            let r = Request::get("/")
                .header("host", "shop.test")
                .header("cookie", format!("a=b; {cookie}"))
                .body(Full::default())
                .unwrap();
            let a = c.send(r).await.unwrap();
            assert_eq!(&a.body, first, "cookie {cookie} moved");
            assert!(a.headers.get("set-cookie").is_none());
        }
    }
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_target_weight{site="shop",target="green"} 20"#), "{metrics}");
    // A switch ends the split.
    p.switch("shop", "green").await;
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["weights"], serde_json::Value::Null);
    for (cookie, _) in cookies.iter().take(10) {
        let r = Request::get("/")
            .header("host", "shop.test")
            .header("cookie", cookie.as_str())
            .body(Full::default())
            .unwrap();
        assert_eq!(Client::connect(p.addr).await.send(r).await.unwrap().body, "green");
    }
    p.api("PUT", "/v1/sites/shop/weights", Some(json!({"blue": 50, "green": 50}))).await;
    let (status, site) = p.api("DELETE", "/v1/sites/shop/weights", None).await;
    assert_eq!((status, site["weights"].clone()), (200, serde_json::Value::Null));
    let kinds: Vec<String> = p
        .api("GET", "/v1/sites/shop/history", None)
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(&kinds[..3], ["weights", "weights", "switch"]);
}

/// The README recipe "database migration with a read-only clone", under
/// continuous reads and writes: set the clone target, switch to it, migrate,
/// switch back. Zero errors other than the clone's 503 to writes, no write
/// reaches the clone, and writes resume on the original afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_recipe_under_continuous_traffic() {
    let (original, clone) = (Origin::start("original").await, Origin::start("clone").await);
    let placeholder = dead_addr().await;
    let p = Proxy::start(&shop(
        &[("blue", vec![original.addr], ""), ("clone", vec![placeholder], ", read_only: true")],
        "",
    ))
    .await;
    p.wait_healthy("shop", &["blue"]).await;
    let t0 = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (addr, stop) = (p.addr, stop.clone());
        workers.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let mut log = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let write = w < 2;
                let r = if write { req("POST", "/orders", "item=1") } else { req("GET", "/catalog", "") };
                let start = t0.elapsed();
                let a = c.send(r).await.expect("transport error during the recipe");
                log.push((write, start, a.status, a.body));
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            log
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // 1. Point the clone target at the clone (declared `read_only: true` in the configuration).
    let (status, body) = p
        .api(
            "PUT",
            "/v1/sites/shop/targets/clone",
            Some(json!({"endpoints": [clone.addr.to_string()], "version": "clone-of-v41"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    p.wait_healthy("shop", &["clone"]).await;
    // 2. Switch to it: reads go on, writes are refused at the edge.
    p.switch("shop", "clone").await;
    // 3. Migrate the original's database (here: time passes).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 4. Switch back to the migrated original.
    p.switch("shop", "blue").await;
    let back = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut log = Vec::new();
    for w in workers {
        log.extend(w.await.unwrap());
    }
    for (write, _, status, body) in &log {
        match (write, status) {
            (_, 200) => {}
            (true, 503) => assert!(body.contains("read-only"), "{body}"),
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    let refused = log.iter().filter(|(w, _, s, _)| *w && *s == 503).count();
    let clone_reads = log.iter().filter(|(w, _, _, b)| !w && b == "clone").count();
    assert!(refused > 0 && clone_reads > 0, "the clone never served ({refused} refused writes, {clone_reads} reads)");
    assert!(clone.seen().iter().all(|s| s.method == "GET"), "a write reached the clone");
    let writes_after: Vec<_> = log.iter().filter(|(w, start, _, _)| *w && *start > back).collect();
    assert!(
        !writes_after.is_empty() && writes_after.iter().all(|(_, _, s, b)| *s == 200 && b == "original"),
        "writes did not resume on the original"
    );
}
