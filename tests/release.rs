//! Health-gated releases (SPEC §2 health/switch, §4 switch/deploy): rise/fall
//! health, smoke and version gates, passive ejection, the post-switch watch
//! with automatic rollback, and deploys.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::{Client, Origin, Proxy};

/// A site `shop` with `targets`, health on `/up` (version in `x-app-version`), and `extra` YAML lines.
fn shop(targets: &[(&str, Vec<SocketAddr>)], health: &str, extra: &str) -> String {
    let mut s = "  - name: shop\n    hosts: [shop.test]\n    live: blue\n    targets:\n".to_string();
    for (t, eps) in targets {
        let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
        s.push_str(&format!("      {t}: {{ endpoints: [{}], version: {t}-v1 }}\n", eps.join(", ")));
    }
    s.push_str(&format!("    health: {{ path: /up, version_header: x-app-version, {health} }}\n"));
    s.push_str(extra);
    s
}

const FAST: &str = "interval: 30ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1";

async fn endpoint_health(p: &Proxy, target: &str, i: usize) -> Value {
    p.api("GET", "/v1/sites/shop", None).await.1["targets"][target]["endpoints"][i]["healthy"].clone()
}

/// Rise/fall hysteresis: an endpoint whose probes alternate pass/fail never
/// changes state with thresholds of 3; three failures in a row take it out,
/// three passes bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_endpoint_changes_state_at_most_once_per_threshold() {
    let blue = Origin::start("blue").await;
    let health = "interval: 20ms, timeout: 500ms, healthy_threshold: 3, unhealthy_threshold: 3";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr])], health, "")).await;
    p.wait_healthy("shop", &["blue"]).await;
    blue.faults.flap.store(true, Ordering::Relaxed);
    let mut transitions = 0;
    let mut last = Value::Bool(true);
    for _ in 0..60 {
        let h = endpoint_health(&p, "blue", 0).await;
        if h != last {
            transitions += 1;
            last = h;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(transitions, 0, "a flapping endpoint changed state");
    blue.faults.flap.store(false, Ordering::Relaxed);
    // A few passing probes, so no failure from the flapping counts towards the fall.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let probes_before = blue.faults.probes();
    blue.faults.health_fail.store(true, Ordering::Relaxed);
    let start = Instant::now();
    while endpoint_health(&p, "blue", 0).await != json!(false) {
        assert!(start.elapsed() < Duration::from_secs(3), "never fell");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let failed_probes = blue.faults.probes() - probes_before;
    assert!(failed_probes >= 3, "fell after {failed_probes} failed probe(s), threshold 3");
    blue.faults.health_fail.store(false, Ordering::Relaxed);
    p.wait_healthy("shop", &["blue"]).await;
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(
        metrics
            .contains(&format!(r#"cutover_endpoint_healthy{{endpoint="{}",site="shop",target="blue"}} 1"#, blue.addr)),
        "{metrics}"
    );
}

/// A failing smoke check refuses the switch with the endpoint and the check
/// named; `force` skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_failure_refuses_the_switch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let extra =
        "    switch: { smoke: [{ path: /check, expect_status: 200 }, { path: /, expect_body_contains: green }] }\n";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, extra)).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    green.faults.fail.store(true, Ordering::Relaxed);
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green"}))).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "smoke_failed");
    let reasons = body["error"]["details"]["reasons"].to_string();
    assert!(
        reasons.contains(&green.addr.to_string()) && reasons.contains("/check") && reasons.contains("500"),
        "{reasons}"
    );
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue");
    green.faults.fail.store(false, Ordering::Relaxed);
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green"}))).await;
    assert_eq!(status, 200, "{body}");
    // Smoke requests reached green itself, never through the live target.
    assert!(green.seen().iter().any(|s| s.path == "/check"));
    assert!(blue.seen().iter().all(|s| s.path != "/check"));
}

/// With `require: any_healthy`, a target with an endpoint down goes live on
/// the healthy ones: smoke checks run on those, not on the one that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_checks_skip_an_endpoint_that_is_down() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let sick = Origin::start("sick").await;
    sick.faults.health_fail.store(true, Ordering::Relaxed);
    sick.faults.fail.store(true, Ordering::Relaxed);
    let dead = sick.addr;
    let extra = "    switch: { require: any_healthy, smoke: [{ path: /check, expect_status: 200 }] }\n";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr, dead])], FAST, extra)).await;
    p.wait_healthy("shop", &["blue"]).await;
    while endpoint_health(&p, "green", 0).await != json!(true) || endpoint_health(&p, "green", 1).await != json!(false)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green"}))).await;
    assert_eq!(status, 200, "{body}");
    assert!(green.seen().iter().any(|s| s.path == "/check"), "the healthy endpoint was not smoke-tested");
    assert_eq!(sick.count(), 0, "the endpoint that is down was smoke-tested");
}

/// `expect_version` is compared with what the endpoints report through
/// `health.version_header`; the API shows both declared and reported versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_version_mismatch_is_refused() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("v42").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["targets"]["green"]["version"], "green-v1");
    assert_eq!(site["targets"]["green"]["endpoints"][0]["version"], "v42");
    // Declared green-v1, but the endpoint reports v42: the report wins.
    let (status, body) =
        p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "expect_version": "green-v1"}))).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "version_mismatch");
    assert!(body["error"]["details"]["reasons"][0].as_str().unwrap().contains("runs v42"), "{body}");
    let (status, _) =
        p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "expect_version": "v42"}))).await;
    assert_eq!(status, 200);
}

/// An endpoint that stops reporting a version (its health answer comes
/// without the header) reports none: its target's declared version counts
/// again, for the API and for `expect_version`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_no_longer_reported_is_forgotten() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("v42").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let reported = |site: &Value| site["targets"]["green"]["endpoints"][0]["version"].clone();
    assert_eq!(reported(&p.api("GET", "/v1/sites/shop", None).await.1), "v42");
    green.faults.no_version.store(true, Ordering::Relaxed);
    let probes = green.faults.probes();
    while green.faults.probes() < probes + 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reported(&p.api("GET", "/v1/sites/shop", None).await.1), Value::Null);
    let (status, body) =
        p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "expect_version": "green-v1"}))).await;
    assert_eq!(status, 200, "the declared version counts once none is reported: {body}");
}

/// A target given endpoints anew (`set_target`, a deploy), even at the same
/// address, is checked afresh: what the checks knew of the old release
/// (health, version) is forgotten, and it takes `healthy_threshold` passing
/// probes to be healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_target_forgets_what_the_checks_knew() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("v42").await);
    let health = "interval: 200ms, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 1";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], health, "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let body = json!({"endpoints": [green.addr.to_string()], "version": "v43"});
    let (status, site) = p.api("PUT", "/v1/sites/shop/targets/green", Some(body)).await;
    assert_eq!(status, 200, "{site}");
    let ep = &site["targets"]["green"]["endpoints"][0];
    assert_eq!((&ep["healthy"], &ep["version"]), (&Value::Null, &Value::Null), "{site}");
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green"}))).await;
    assert_eq!((status, &body["error"]["code"]), (409, &json!("target_unhealthy")), "{body}");
    let probes = green.faults.probes();
    p.wait_healthy("shop", &["green"]).await;
    assert!(
        green.faults.probes() >= probes + 2,
        "healthy after {} probe(s), threshold 2",
        green.faults.probes() - probes
    );
}

/// A switch to the target that is already live still checks
/// `expect_version`, and ends a canary split like any switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_to_the_live_target_checks_the_version_and_ends_a_split() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let (status, body) =
        p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "blue", "expect_version": "v99"}))).await;
    assert_eq!((status, &body["error"]["code"]), (409, &json!("version_mismatch")), "{body}");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert_eq!((&history[0]["kind"], &history[0]["result"]), (&json!("switch"), &json!("refused")), "{history}");
    let (status, _) = p.api("PUT", "/v1/sites/shop/weights", Some(json!({"blue": 50, "green": 50}))).await;
    assert_eq!(status, 200);
    let (status, site) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "blue"}))).await;
    assert_eq!(status, 200, "{site}");
    assert_eq!((&site["live"], &site["weights"]), (&json!("blue"), &Value::Null), "{site}");
    for _ in 0..20 {
        assert_eq!(Client::connect(p.addr).await.get("shop.test", "/").await.unwrap().body, "blue");
    }
}

/// Passive health: a killed endpoint is taken out of rotation by the data
/// plane itself (probes are slow here) with zero client errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_endpoint_is_ejected_passively_without_client_errors() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let slow_probes = "interval: 30s, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1";
    let p = Proxy::start(&shop(&[("blue", vec![a.addr, b.addr])], slow_probes, "")).await;
    p.wait_healthy("shop", &["blue"]).await;
    a.kill();
    let mut c = Client::connect(p.addr).await;
    for _ in 0..30 {
        let r = c.get("shop.test", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "b"));
    }
    assert_eq!(endpoint_health(&p, "blue", 0).await, json!(false));
    assert_eq!(endpoint_health(&p, "blue", 1).await, json!(true));
}

/// Green starts failing after the switch: the watch rolls back by itself
/// (kind `automatic_rollback`, actor `watch`, the rate in the reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_green_is_rolled_back_automatically() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let extra = "    switch: { watch: { duration: 20s, max_error_rate: 0.2, min_requests: 10 } }\n";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, extra)).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    p.switch("shop", "green").await;
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["watch"]["target"], "green", "{site}");
    assert_eq!(site["watch"]["min_requests"], 10);

    let failing_since = Instant::now();
    green.faults.fail.store(true, Ordering::Relaxed);
    let mut c = Client::connect(p.addr).await;
    let rolled_back_after = loop {
        let r = c.get("shop.test", "/").await.unwrap();
        if r.body == "blue" {
            break failing_since.elapsed();
        }
        assert!(failing_since.elapsed() < Duration::from_secs(5), "no automatic rollback");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!("automatic rollback {rolled_back_after:?} after green started failing");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    let h = &history[0];
    assert_eq!(
        (h["kind"].as_str(), h["actor"].as_str(), h["to"].as_str()),
        (Some("automatic_rollback"), Some("watch"), Some("blue")),
        "{h}"
    );
    let reason = h["reason"].as_str().unwrap();
    assert!(reason.contains("error rate 100.0%") && !reason.contains("forced"), "{h}");
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!((site["live"].as_str(), site["watch"].clone()), (Some("blue"), Value::Null));
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_rollbacks_total{reason="automatic",site="shop"} 1"#), "{metrics}");
}

/// The watch judges the target's own answers: `503`s cutover gives itself
/// (a read-only site refusing writes), though counted under green in
/// `cutover_requests_total`, do not roll it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutovers_own_refusals_do_not_fail_the_watch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let extra = "    switch: { watch: { duration: 1s, max_error_rate: 0.2, min_requests: 10 } }\n";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, extra)).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    p.api("PUT", "/v1/sites/shop/mode", Some(json!({"read_only": true}))).await;
    p.switch("shop", "green").await;
    let mut c = Client::connect(p.addr).await;
    for i in 0..40 {
        let method = if i % 4 == 0 { "GET" } else { "POST" };
        let req = http::Request::builder().method(method).uri("/").header("host", "shop.test");
        let r = c.send(req.body(http_body_util::Full::default()).unwrap()).await.unwrap();
        assert_eq!(r.status, if method == "GET" { 200 } else { 503 });
    }
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_requests_total{code="5xx",site="shop",target="green"} 30"#), "{metrics}");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!((site["live"].as_str(), &site["watch"]), (Some("green"), &Value::Null), "{site}");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert_ne!(history[0]["kind"], "automatic_rollback", "{history}");
}

/// Below the absolute limit but clearly worse than blue was before the
/// switch: rolled back by the relative rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearly_worse_than_blue_is_rolled_back() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let extra = "    switch: { watch: { duration: 20s, max_error_rate: 0.10, min_requests: 40 } }\n";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, extra)).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let mut c = Client::connect(p.addr).await;
    // Blue's baseline: clean traffic over more than one sampling period.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2200) {
        assert_eq!(c.get("shop.test", "/").await.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    green.faults.fail_every.store(12, Ordering::Relaxed); // ≈ 8 %: under the 10 % limit
    p.switch("shop", "green").await;
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["watch"]["baseline_error_rate"], json!(0.0), "{site}");
    let start = Instant::now();
    loop {
        if c.get("shop.test", "/").await.unwrap().headers["x-origin"] == "blue" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "not rolled back");
    }
    let reason = p.api("GET", "/v1/sites/shop/history", None).await.1[0]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("clearly worse"), "{reason}");
}

/// The saved watch goes once it is over: when it passes, when its time ran
/// out while cutover was down (a restart does not resume it then), and when
/// a rollback ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_is_over_is_not_resumed() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let extra = "    switch: { watch: { duration: 2s } }\n";
    let sites = shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, extra);
    let p = Proxy::start(&sites).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let saved_watch = |p: &Proxy| {
        let state = std::fs::read_to_string(p.dir.path().join("state.json")).unwrap();
        serde_json::from_str::<Value>(&state).unwrap()["sites"]["shop"]["watch"].clone()
    };
    // Passes: no longer saved.
    p.switch("shop", "green").await;
    assert_eq!(saved_watch(&p)["target"], "green");
    let passed = support::eventually(Duration::from_secs(10), || saved_watch(&p).is_null()).await;
    assert!(passed, "a passed watch is still saved: {}", saved_watch(&p));
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!((site["live"].as_str(), &site["watch"]), (Some("green"), &Value::Null), "{site}");
    // Over while down: not resumed.
    p.switch("shop", "blue").await;
    let dir = p.stop().await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let p = Proxy::start_with(&sites, support::Options { dir: Some(dir), ..Default::default() }).await;
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!((site["live"].as_str(), &site["watch"]), (Some("blue"), &Value::Null), "{site}");
    assert!(saved_watch(&p).is_null(), "{}", saved_watch(&p));
    // Ended by a rollback: no longer saved either.
    let (status, _) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "force": true}))).await;
    assert_eq!(status, 200);
    assert_eq!(saved_watch(&p)["previous"], "blue");
    let (status, site) = p.api("POST", "/v1/sites/shop/rollback", Some(json!({}))).await;
    assert_eq!((status, &site["watch"]), (200, &Value::Null), "{site}");
    assert!(saved_watch(&p).is_null(), "{}", saved_watch(&p));
}

async fn wait_deployment(p: &Proxy, id: &str) -> Value {
    for _ in 0..400 {
        let (status, d) = p.api("GET", &format!("/v1/deployments/{id}"), None).await;
        assert_eq!(status, 200, "{d}");
        if d["state"] != "running" {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("deployment {id} never ended");
}

/// A full deploy of a healthy target: every step in order, live switched, the
/// old target drained, the watch passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_of_a_healthy_target_succeeds() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    // It reports the version it runs (its name) in `x-app-version`.
    let next = Origin::start("v2").await;
    let extra = "    switch: { smoke: [{ path: /, expect_status: 200 }] }\n";
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, extra)).await;
    p.wait_healthy("shop", &["blue"]).await;
    let started = Instant::now();
    let body = json!({"target": "green", "endpoints": [next.addr.to_string()], "version": "v2", "watch": "500ms"});
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let d = wait_deployment(&p, answer["id"].as_str().unwrap()).await;
    println!("deploy of a healthy target took {:?} end to end (500 ms of it the watch)", started.elapsed());
    assert_eq!(d["state"], "succeeded", "{d}");
    let steps: Vec<(&str, &str)> = d["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("set_target", "succeeded"),
            ("wait_healthy", "succeeded"),
            ("smoke", "succeeded"),
            ("switch", "succeeded"),
            ("drain", "succeeded"),
            ("watch", "succeeded")
        ]
    );
    assert!(d["steps"].as_array().unwrap().iter().all(|s| s["started_at"].is_string() && s["finished_at"].is_string()));
    assert_eq!(
        (d["site"].as_str(), d["target"].as_str(), d["version"].as_str()),
        (Some("shop"), Some("green"), Some("v2"))
    );
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "v2");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert_eq!((history[0]["kind"].as_str(), history[0]["actor"].as_str()), (Some("switch"), Some("deploy")));
    assert_eq!(history[1]["kind"], "set_target");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_deployments_total{site="shop",state="succeeded"} 1"#), "{metrics}");
}

/// A deploy whose target never becomes healthy fails at `wait_healthy`; live
/// is unchanged and the later steps are skipped. Meanwhile a switch on the site
/// is refused with `deploy_in_progress` unless forced, and a second deploy
/// waits for its turn (queued, not refused: SPEC §4), then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_of_an_unhealthy_target_fails_and_blocks_other_switches() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    // Up, but failing its health checks (a closed port could be taken by
    // another test meanwhile, and answer).
    let sick = Origin::start("sick").await;
    sick.faults.health_fail.store(true, Ordering::Relaxed);
    let dead = sick.addr;
    let body = json!({"target": "green", "endpoints": [dead.to_string()], "healthy_timeout": "1s"});
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body.clone())).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();

    let (status, again) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    assert_eq!(status, 202, "{again}");
    let queued = again["id"].as_str().unwrap().to_string();
    let (_, waiting) = p.api("GET", &format!("/v1/deployments/{queued}"), None).await;
    assert_eq!(waiting["state"], "running", "{waiting}");
    assert!(waiting["steps"].as_array().unwrap().iter().all(|s| s["state"] == "pending"), "{waiting}");
    let (status, refused) = p.api("POST", "/v1/sites/shop/rollback", Some(json!({}))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("deploy_in_progress")), "{refused}");
    let (status, sw) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "blue"}))).await;
    assert_eq!((status, sw["error"]["code"].as_str()), (409, Some("deploy_in_progress")), "{sw}");

    let d = wait_deployment(&p, &id).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert!(d["error"].as_str().unwrap().contains(&dead.to_string()), "{d}");
    let states: Vec<&str> = d["steps"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded", "failed", "skipped", "skipped", "skipped", "skipped"]);
    // The queued deploy started once the first had ended, and fails the same way.
    let second = wait_deployment(&p, &queued).await;
    assert_eq!(second["state"], "failed", "{second}");
    let first_end = d["steps"][5]["finished_at"].as_str().unwrap();
    let second_start = second["steps"][0]["started_at"].as_str().unwrap();
    assert!(second_start >= first_end, "the second deploy started at {second_start}, before {first_end}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue");
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "blue");
    let (status, _) = p.api("GET", "/v1/deployments/nope", None).await;
    assert_eq!(status, 404);
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_deployments_total{site="shop",state="failed"} 2"#), "{metrics}");
}

/// A deploy whose endpoints report another version than the one deployed
/// fails at its switch (`version_mismatch`): live is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_of_another_version_than_reported_fails_at_the_switch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let running = Origin::start("v42").await;
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let body = json!({"target": "green", "endpoints": [running.addr.to_string()], "version": "v99"});
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let d = wait_deployment(&p, answer["id"].as_str().unwrap()).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["steps"][3]["state"], "failed", "{d}");
    assert!(d["error"].as_str().unwrap().contains("does not run version v99"), "{d}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue");
}

/// A deploy that goes live and then fails its watch ends `rolled_back`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_rolled_back_by_its_watch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, "")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    green.faults.fail.store(true, Ordering::Relaxed);
    let body = json!({"target": "green", "endpoints": [green.addr.to_string()], "watch": "10s"});
    let (_, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    let id = answer["id"].as_str().unwrap().to_string();
    // Traffic that the watch can judge (20 answers at the default min_requests).
    let addr = p.addr;
    let traffic = tokio::spawn(async move {
        let mut c = Client::connect(addr).await;
        for _ in 0..400 {
            let _ = c.get("shop.test", "/").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let d = wait_deployment(&p, &id).await;
    traffic.abort();
    assert_eq!(d["state"], "rolled_back", "{d}");
    assert!(d["error"].as_str().unwrap().contains("error rate"), "{d}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue");
}

/// An operator's forced switch or rollback during a deploy takes the site
/// over: a deploy still waiting for its target to be healthy fails and never
/// switches after the operator (even once the target is healthy); a deploy
/// already live, in its watch, ends `rolled_back`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_switch_or_rollback_ends_a_running_deploy() {
    let (blue, green, clone) =
        (Origin::start("blue").await, Origin::start("green").await, Origin::start("clone").await);
    let targets = [("blue", vec![blue.addr]), ("green", vec![green.addr]), ("clone", vec![clone.addr])];
    let p = Proxy::start(&shop(&targets, FAST, "")).await;
    p.wait_healthy("shop", &["blue", "green", "clone"]).await;

    // Before going live: the operator forces clone live while green is not healthy yet.
    green.faults.health_fail.store(true, Ordering::Relaxed);
    for _ in 0..200 {
        if endpoint_health(&p, "green", 0).await == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(endpoint_health(&p, "green", 0).await, false, "green never seen unhealthy");
    let body = json!({"target": "green", "endpoints": [green.addr.to_string()], "healthy_timeout": "10s"});
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body.clone())).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    // A second deploy waits behind it; the override ends it as well.
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let queued = answer["id"].as_str().unwrap().to_string();
    let (status, sw) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "clone", "force": true}))).await;
    assert_eq!(status, 200, "forced: {sw}");
    green.faults.health_fail.store(false, Ordering::Relaxed);
    let d = wait_deployment(&p, &id).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert!(d["error"].as_str().unwrap().contains("overridden"), "{d}");
    let q = wait_deployment(&p, &queued).await;
    assert_eq!(q["state"], "failed", "{q}");
    assert!(q["error"].as_str().unwrap().contains("before it started"), "{q}");
    assert!(q["steps"].as_array().unwrap().iter().all(|s| s["state"] == "skipped"), "{q}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "clone", "the deploy switched after the operator");

    // Live, in its watch: the operator forces a rollback.
    let body = json!({"target": "green", "endpoints": [green.addr.to_string()], "watch": "30s"});
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        if p.api("GET", "/v1/sites/shop", None).await.1["live"] == "green" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, rb) = p.api("POST", "/v1/sites/shop/rollback", Some(json!({"force": true}))).await;
    assert_eq!(status, 200, "forced rollback: {rb}");
    let d = wait_deployment(&p, &id).await;
    assert_eq!(d["state"], "rolled_back", "{d}");
    assert!(d["error"].as_str().unwrap().contains("clone is live"), "{d}");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_deployments_total{site="shop",state="rolled_back"} 1"#), "{metrics}");
}

/// Deployments are in the state file: after a restart each answers by id.
/// One the restart cut short before it went live has `failed`, and says
/// why; one in its watch follows the resumed watch to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_answer_after_a_restart() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let sites = shop(&[("blue", vec![blue.addr]), ("green", vec![green.addr])], FAST, "");
    let p = Proxy::start(&sites).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    // Cut short while it waits for a target that never gets healthy.
    let sick = Origin::start("sick").await;
    sick.faults.health_fail.store(true, Ordering::Relaxed);
    let body = json!({"target": "green", "endpoints": [sick.addr.to_string()], "healthy_timeout": "60s"});
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let cut = answer["id"].as_str().unwrap().to_string();
    let waiting = support::eventually(Duration::from_secs(5), || {
        let state = std::fs::read_to_string(p.dir.path().join("state.json")).unwrap_or_default();
        let state: Value = serde_json::from_str(&state).unwrap_or_default();
        state["sites"]["shop"]["deployments"][0]["steps"][1]["state"] == "running"
    })
    .await;
    assert!(waiting, "the deployment's progress was not saved");
    let dir = p.stop().await;
    let p = Proxy::start_with(&sites, support::Options { dir: Some(dir), ..Default::default() }).await;
    let (status, d) = p.api("GET", &format!("/v1/deployments/{cut}"), None).await;
    assert_eq!((status, d["state"].as_str()), (200, Some("failed")), "{d}");
    assert_eq!(d["error"], "cutover restarted during the wait_healthy step; green did not go live", "{d}");
    let states: Vec<&str> = d["steps"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded", "skipped", "skipped", "skipped", "skipped", "skipped"], "{d}");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_deployments_total{site="shop",state="failed"} 1"#), "{metrics}");

    // Cut short in its watch: the watch resumes, and the deployment with it.
    p.wait_healthy("shop", &["blue"]).await;
    let body = json!({"target": "green", "endpoints": [green.addr.to_string()], "watch": "2s"});
    let (status, answer) = p.api("POST", "/v1/sites/shop/deploy", Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    let watched = answer["id"].as_str().unwrap().to_string();
    for _ in 0..400 {
        let d = p.api("GET", &format!("/v1/deployments/{watched}"), None).await.1;
        if d["steps"][5]["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dir = p.stop().await;
    let p = Proxy::start_with(&sites, support::Options { dir: Some(dir), ..Default::default() }).await;
    let (_, d) = p.api("GET", &format!("/v1/deployments/{watched}"), None).await;
    assert_eq!((d["state"].as_str(), d["steps"][5]["state"].as_str()), (Some("running"), Some("running")), "{d}");
    assert_eq!(d["steps"][5]["message"], "resumed after a restart of cutover", "{d}");
    // Still the site's running deploy: a switch there waits for it, unless forced.
    let (status, sw) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "blue"}))).await;
    assert_eq!((status, sw["error"]["code"].as_str()), (409, Some("deploy_in_progress")), "{sw}");
    let d = wait_deployment(&p, &watched).await;
    assert_eq!((d["state"].as_str(), d["steps"][5]["state"].as_str()), (Some("succeeded"), Some("succeeded")), "{d}");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_deployments_total{site="shop",state="succeeded"} 1"#), "{metrics}");
    let (_, d) = p.api("GET", &format!("/v1/deployments/{cut}"), None).await;
    assert_eq!(d["state"], "failed", "the older one is still there: {d}");
    let (status, sw) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "blue"}))).await;
    assert_eq!(status, 200, "{sw}");
}

/// An origin named `name`: `/up` answers `200`, or, while `hang` is set, is
/// read and never answered (counted in the returned counter); anything else
/// gets the name.
async fn hanging_health(name: &'static str, hang: Arc<AtomicBool>) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hung = Arc::new(AtomicUsize::new(0));
    let count = hung.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (hang, count) = (hang.clone(), count.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((_, path)) = support::next_request(&mut s, &mut buf).await {
                    if path == "/up" && hang.load(Ordering::SeqCst) {
                        count.fetch_add(1, Ordering::SeqCst);
                        // Until the prober gives up and closes.
                        let _ = s.read(&mut [0u8; 1]).await;
                        return;
                    }
                    let body = if path == "/up" { "ok" } else { name };
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, hung)
}

/// A health probe that gets no answer within `health.timeout` is a failed
/// probe: an endpoint whose health path hangs (while it serves requests)
/// falls after `unhealthy_threshold` such probes, traffic goes to the other
/// endpoint, and a client looping all along sees no error; it comes back
/// once its probes are answered again (B-5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_times_out_is_a_failure() {
    let hang = Arc::new(AtomicBool::new(false));
    let (a, hung) = hanging_health("a", hang.clone()).await;
    let b = Origin::start("b").await;
    let health = "interval: 50ms, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 2";
    let p = Proxy::start(&shop(&[("blue", vec![a, b.addr])], health, "")).await;
    p.wait_healthy("shop", &["blue"]).await;
    let answers = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (log, done, addr) = (answers.clone(), stop.clone(), p.addr);
    let client = tokio::spawn(async move {
        let mut c = Client::connect(addr).await;
        while !done.load(Ordering::SeqCst) {
            let r = c.get("shop.test", "/").await.map(|r| (r.status, r.body)).map_err(|e| e.to_string());
            log.lock().unwrap().push(r);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let served_by = |who: &str| answers.lock().unwrap().iter().any(|r| matches!(r, Ok((_, n)) if n == who));
    assert!(support::eventually(Duration::from_secs(5), || served_by("a") && served_by("b")).await);
    hang.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while endpoint_health(&p, "blue", 0).await != json!(false) {
        assert!(start.elapsed() < Duration::from_secs(5), "an endpoint whose probes time out stayed healthy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hung.load(Ordering::SeqCst) >= 2, "fell after {} unanswered probe(s)", hung.load(Ordering::SeqCst));
    // The request in flight when it fell may still have gone to it; none after.
    let fell = answers.lock().unwrap().len() + 1;
    assert!(support::eventually(Duration::from_secs(5), || answers.lock().unwrap().len() >= fell + 30).await);
    hang.store(false, Ordering::SeqCst);
    p.wait_healthy("shop", &["blue"]).await;
    let back = answers.lock().unwrap().len();
    assert!(
        support::eventually(Duration::from_secs(5), || answers.lock().unwrap()[back..]
            .iter()
            .any(|r| matches!(r, Ok((_, n)) if n == "a")))
        .await,
        "never back in rotation"
    );
    stop.store(true, Ordering::SeqCst);
    client.await.unwrap();
    let answers = answers.lock().unwrap();
    let failed: Vec<_> = answers.iter().filter(|r| !matches!(r, Ok((200, _)))).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), answers.len());
    let after: Vec<_> = answers[fell..fell + 30].iter().filter(|r| !matches!(r, Ok((_, n)) if n == "b")).collect();
    assert!(after.is_empty(), "requests went to the unhealthy endpoint: {after:?}");
}

/// An endpoint killed with work in flight (slow GETs and a long streaming
/// answer) fails only that work: the stream it carried is visibly cut (no
/// terminal chunk; never ended as if complete), no more requests fail than
/// were in flight on it, the others complete on the other endpoint, and
/// every request afterwards is served there (B-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_with_work_in_flight_fails_only_that_work() {
    use http_body_util::BodyExt;
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let p = Proxy::start(&shop(&[("blue", vec![a.addr, b.addr])], FAST, "")).await;
    p.wait_healthy("shop", &["blue"]).await;
    // A stream of 20 s; whichever endpoint carries it is killed.
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/stream?chunks=1000&ms=20").header("host", "shop.test").body(Full::<Bytes>::default());
    let resp = sender.send_request(req.unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let (victim, victim_index, survivor) = if first.starts_with(b"a ") { (&a, 0, "b") } else { (&b, 1, "a") };
    let addr = p.addr;
    // One at a time, each at its origin before the next: the endpoints take turns (least outstanding).
    let mut slow = Vec::new();
    for i in 0..8 {
        slow.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            tokio::time::timeout(Duration::from_secs(10), c.get("shop.test", "/slow?ms=3000")).await
        }));
        assert!(support::eventually(Duration::from_secs(5), || a.count() + b.count() == i + 2).await, "not in flight");
    }
    let in_flight = victim.seen().iter().filter(|s| s.path == "/slow").count();
    assert!(in_flight >= 1, "no slow request on the victim");
    victim.kill();
    assert_eq!(support::cut_or_completed(&mut body, Duration::from_secs(5)).await, Some("cut"));
    let mut failed = 0;
    for h in slow {
        match h.await.unwrap().expect("a request in flight hung") {
            Ok(r) if r.status == 200 => assert_eq!(r.body, format!("{survivor} slow done")),
            _ => failed += 1,
        }
    }
    assert!(failed <= in_flight, "{failed} requests failed, {in_flight} were in flight on the killed endpoint");
    let mut c = Client::connect(p.addr).await;
    for _ in 0..20 {
        let r = c.get("shop.test", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, survivor));
    }
    assert_eq!(endpoint_health(&p, "blue", victim_index).await, json!(false));
}
