//! The admin API (SPEC §4): auth, errors that change nothing, gates, set-target.

mod support;

use serde_json::{json, Value};
use support::{admin_call, admin_raw, dead_addr, site, Options, Origin, Proxy};

async fn shop(token: Option<&str>) -> (Proxy, Origin, Origin) {
    let blue = Origin::start("blue").await;
    let green = Origin::start("green").await;
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]);
    let p = Proxy::start_with(&sites, Options { token: token.map(Into::into), ..Default::default() }).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    (p, blue, green)
}

/// Without or with a wrong token `/v1/` is 401; `/healthz` and `/metrics` stay open.
#[tokio::test]
async fn token_is_required_on_v1_only() {
    let (p, _b, _g) = shop(Some("s3cret")).await;
    for token in [None, Some("wrong"), Some("s3cret-but-longer"), Some("")] {
        let (status, body) = admin_call(p.admin, "GET", "/v1/sites", None, token).await;
        assert_eq!(status, 401, "token {token:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) =
            admin_call(p.admin, "POST", "/v1/sites/shop/switch", Some(json!({"to": "green"})), token).await;
        assert_eq!(status, 401);
    }
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue", "an unauthorized switch changed state");
    assert_eq!(admin_call(p.admin, "GET", "/v1/sites", None, Some("s3cret")).await.0, 200);
    assert_eq!(admin_call(p.admin, "GET", "/healthz", None, None).await, (200, Value::String("ok\n".into())));
    let (status, metrics) = admin_call(p.admin, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(metrics.as_str().unwrap().contains("cutover_live_target"));
}

/// Unknown sites and targets are 404 with the JSON error shape.
#[tokio::test]
async fn unknown_site_or_target_is_404() {
    let (p, _b, _g) = shop(None).await;
    let (status, body) = p.api("GET", "/v1/sites/nope", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("site_not_found")), "{body}");
    let (status, body) = p.api("POST", "/v1/sites/nope/switch", Some(json!({"to": "green"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("site_not_found")));
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "purple"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("target_not_found")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("purple"));
    let (status, _) = p.api("GET", "/v1/sites/nope/history", None).await;
    assert_eq!(status, 404);
    let (status, _) = p.api("GET", "/v1/nothing-here", None).await;
    assert_eq!(status, 404);
}

/// Malformed JSON, unknown fields and bad values are 400 and change nothing,
/// not even the history.
#[tokio::test]
async fn bad_requests_are_400_and_change_nothing() {
    let (p, _b, _g) = shop(None).await;
    let before = p.api("GET", "/v1/sites/shop", None).await.1;
    let cases = [
        ("POST", "/v1/sites/shop/switch", "{not json", "invalid_json"),
        ("POST", "/v1/sites/shop/switch", r#"{"to":"green","forse":true}"#, "unknown_field"),
        ("POST", "/v1/sites/shop/switch", r#"{"to":"green","drain_timeout":"soon"}"#, "invalid_json"),
        ("POST", "/v1/sites/shop/switch", r#"{"force":true}"#, "invalid_json"),
        ("POST", "/v1/sites/shop/rollback", r#"{"force":"yes"}"#, "invalid_json"),
        ("PUT", "/v1/sites/shop/targets/green", r#"{"endpoints":["nope"]}"#, "invalid_request"),
        ("PUT", "/v1/sites/shop/targets/green", r#"{"endpoints":[]}"#, "invalid_request"),
        ("PUT", "/v1/sites/shop/targets/Bad_Name", r#"{"endpoints":["127.0.0.1:1"]}"#, "invalid_request"),
        ("PUT", "/v1/sites/shop/targets/green", r#"{"endpoints":["127.0.0.1:1"],"colour":"x"}"#, "unknown_field"),
        ("POST", "/v1/sites/shop/switch", r#"{"to":"green","expect_version":""}"#, "invalid_request"),
        // A body is an object, not the struct's fields in a list.
        ("POST", "/v1/sites/shop/switch", r#"["green",false,null,null,null]"#, "invalid_json"),
        ("PUT", "/v1/sites/shop/targets/green", r#"[["127.0.0.1:1"],"v5"]"#, "invalid_json"),
        ("PUT", "/v1/sites/shop/targets/green", r#"{"endpoints":["127.0.0.1:1"],"version":""}"#, "invalid_request"),
        (
            "POST",
            "/v1/sites/shop/deploy",
            r#"{"target":"green","endpoints":["127.0.0.1:1"],"version":" "}"#,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/sites/shop/deploy",
            r#"{"target":"green","endpoints":["127.0.0.1:1"],"healthy_timeout":"0s"}"#,
            "invalid_request",
        ),
    ];
    for (method, path, body, code) in cases {
        let (status, answer) = admin_raw(p.admin, method, path, body, None).await;
        assert_eq!(status, 400, "{method} {path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
        assert!(!answer["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1, before);
    assert_eq!(p.api("GET", "/v1/sites/shop/history", None).await.1, json!([]));
}

/// A target whose endpoint is down is refused with 409 and reasons naming the
/// endpoint (recorded as refused); `force` switches anyway.
#[tokio::test]
async fn unhealthy_target_is_refused_unless_forced() {
    let blue = Origin::start("blue").await;
    let dead = dead_addr().await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![dead])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    // Wait for the dead endpoint's first probe.
    for _ in 0..100 {
        if p.api("GET", "/v1/sites/shop", None).await.1["targets"]["green"]["endpoints"][0]["healthy"] == json!(false) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green"}))).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "target_unhealthy");
    let reasons = body["error"]["details"]["reasons"].as_array().unwrap();
    assert!(reasons[0].as_str().unwrap().contains(&dead.to_string()), "{body}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue");
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "blue");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert_eq!(history[0]["result"], "refused");
    assert_eq!(history[0]["to"], "green");

    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "force": true}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["live"], "green");
    // Nothing answers on green: 502, never the old target.
    assert_eq!(support::get(p.addr, "shop.test", "/").await.status, 502);
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_switches_total{result="refused",site="shop"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"cutover_switches_total{result="ok",site="shop"} 1"#));
    assert!(metrics.contains(r#"cutover_upstream_errors_total{kind="connect",site="shop",target="green"}"#));
}

/// `expect_version` refuses a target that does not run the version, even forced.
#[tokio::test]
async fn expect_version_is_checked() {
    let (p, _b, _g) = shop(None).await;
    let (status, body) = p
        .api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "expect_version": "v9", "force": true})))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "version_mismatch");
    assert!(body["error"]["details"]["reasons"][0].as_str().unwrap().contains("green-v1"));
    let (status, body) =
        p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "expect_version": "green-v1"}))).await;
    assert_eq!(status, 200, "{body}");
}

/// PUT targets creates or replaces a non-live target (new endpoints are probed
/// afresh, starting unknown) and refuses the live one.
#[tokio::test]
async fn set_target_replaces_standby_and_refuses_live() {
    let (p, _b, _g) = shop(None).await;
    let next = Origin::start("green2").await;
    let (status, body) = p
        .api(
            "PUT",
            "/v1/sites/shop/targets/green",
            Some(json!({"endpoints": [next.addr.to_string()], "version": "v42"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["targets"]["green"]["version"], "v42");
    assert_eq!(body["targets"]["green"]["endpoints"][0]["address"], next.addr.to_string());
    p.wait_healthy("shop", &["green"]).await;
    p.switch("shop", "green").await;
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "green2");

    let (status, body) =
        p.api("PUT", "/v1/sites/shop/targets/green", Some(json!({"endpoints": ["127.0.0.1:9"]}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("target_is_live")), "{body}");

    // A brand-new target name is created.
    let (status, body) =
        p.api("PUT", "/v1/sites/shop/targets/clone", Some(json!({"endpoints": ["127.0.0.1:9"]}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["targets"]["clone"]["state"], "standby");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert_eq!(history[0]["kind"], "set_target");
    assert_eq!(history[0]["to"], "clone");
}

/// `GET /v1/sites` lists the sites in the configuration's order.
#[tokio::test]
async fn sites_are_listed_in_configuration_order() {
    let o = Origin::start("o").await;
    let sites = format!(
        "{}{}",
        site("zeta", "z.test", "blue", &[("blue", vec![o.addr])]),
        site("alpha", "a.test", "blue", &[("blue", vec![o.addr])])
    );
    let p = Proxy::start(&sites).await;
    let (_, list) = p.api("GET", "/v1/sites", None).await;
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["zeta", "alpha"]);
}

/// Site objects have one shape everywhere: `targets` keyed by name.
#[tokio::test]
async fn site_shape_is_the_same_in_list_and_detail() {
    let (p, _b, _g) = shop(None).await;
    let (_, list) = p.api("GET", "/v1/sites", None).await;
    let (_, one) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(list[0], one);
    for key in ["name", "hosts", "live", "previous", "mode", "weights", "targets", "watch"] {
        assert!(one.get(key).is_some(), "missing {key}: {one}");
    }
    let t = &one["targets"]["blue"];
    for key in ["version", "state", "inflight", "read_only", "endpoints"] {
        assert!(t.get(key).is_some(), "missing target.{key}: {t}");
    }
    let e = &t["endpoints"][0];
    for key in ["address", "healthy", "inflight", "version"] {
        assert!(e.get(key).is_some(), "missing endpoint.{key}: {e}");
    }
    assert_eq!(one["mode"], json!({"read_only": false, "maintenance": false, "paused": false}));
}

/// Every metric family of SPEC §6 is on `/metrics` from the start, before
/// its first event (each site's counters at zero).
#[tokio::test]
async fn every_metric_family_shows_from_the_start() {
    let (p, _blue, _green) = shop(None).await;
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    for family in [
        "cutover_requests_total",
        "cutover_request_duration_seconds",
        "cutover_upstream_errors_total",
        "cutover_inflight_requests",
        "cutover_live_target",
        "cutover_target_weight",
        "cutover_endpoint_healthy",
        "cutover_switches_total",
        "cutover_rollbacks_total",
        "cutover_site_mode",
        "cutover_client_connections",
        "cutover_config_reloads_total",
        "cutover_drain_forced_closes_total",
        "cutover_held_requests",
        "cutover_deployments_total",
    ] {
        assert!(metrics.contains(&format!("# TYPE {family} ")), "no {family} in:\n{metrics}");
    }
    for series in [
        r#"cutover_switches_total{result="refused",site="shop"} 0"#,
        r#"cutover_rollbacks_total{reason="automatic",site="shop"} 0"#,
        r#"cutover_site_mode{mode="paused",site="shop"} 0"#,
        r#"cutover_deployments_total{site="shop",state="rolled_back"} 0"#,
        r#"cutover_config_reloads_total{result="error"} 0"#,
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
}

/// What a web page could make a browser send is refused (403) and changes
/// nothing: a change from another `Origin`, or any call naming a Host that
/// is not loopback while there is no token (DNS rebinding). `curl`, `ctl`
/// and a page served from loopback are not affected.
#[tokio::test]
async fn requests_a_web_page_could_forge_are_refused() {
    let (p, _b, _g) = shop(None).await;
    let switch = r#"{"to":"green","force":true}"#;
    let forged = [
        format!("POST /v1/sites/shop/switch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nOrigin: http://evil.example\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{switch}", switch.len()),
        format!("POST /v1/sites/shop/switch HTTP/1.1\r\nHost: evil.example:9901\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{switch}", switch.len()),
        "POST /v1/sites/shop/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nOrigin: null\r\nContent-Length: 0\r\n\r\n".to_string(),
        "GET /v1/sites/shop HTTP/1.1\r\nHost: rebound.example\r\nConnection: close\r\n\r\n".to_string(),
    ];
    for raw in &forged {
        let answer = support::raw_exchange(p.admin, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{raw:?} → {answer}");
    }
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!((&site["live"], &site["mode"]["paused"]), (&json!("blue"), &json!(false)), "{site}");
    assert_eq!(p.api("GET", "/v1/sites/shop/history", None).await.1, json!([]));
    let same_machine = "POST /v1/sites/shop/pause HTTP/1.1\r\nHost: localhost:9901\r\nConnection: close\r\nOrigin: http://localhost:9901\r\nContent-Length: 0\r\n\r\n";
    assert!(support::raw_exchange(p.admin, same_machine.as_bytes()).await.starts_with("HTTP/1.1 200"));
}

/// Status codes a client can act on: `413` for a body over 64 KiB, `405` with
/// `Allow`, `404` for an unknown site before any check of the body, the
/// bearer scheme in any case, and a target named twice in weights is `400`.
#[tokio::test]
async fn oversized_wrong_method_unknown_site_and_duplicate_weights() {
    let (p, _b, _g) = shop(Some("s3cret")).await;
    let big = format!(r#"{{"to":"green","reason":"{}"}}"#, "x".repeat(70 * 1024));
    let (status, body) = admin_raw(p.admin, "POST", "/v1/sites/shop/switch", &big, Some("s3cret")).await;
    assert_eq!((status, &body["error"]["code"]), (413, &json!("body_too_large")), "{body}");

    let answer = support::raw_exchange(
        p.admin,
        b"DELETE /v1/sites/shop/switch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer s3cret\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405") && answer.to_ascii_lowercase().contains("allow: post"), "{answer}");
    let answer =
        support::raw_exchange(p.admin, b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 405") && answer.to_ascii_lowercase().contains("allow: get"), "{answer}");

    let (status, body) = admin_raw(p.admin, "POST", "/v1/sites/nope/switch", &big, Some("s3cret")).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("site_not_found")), "{body}");
    let head =
        support::raw_exchange(p.admin, b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    assert!(head.await.starts_with("HTTP/1.1 200"), "HEAD is GET without the body");
    let (status, body) = admin_raw(p.admin, "PUT", "/v1/sites/nope/weights", r#"{"blue":60}"#, Some("s3cret")).await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("site_not_found")), "{body}");
    let (status, _) = admin_raw(p.admin, "PUT", "/v1/sites/nope/targets/x", "{}", Some("s3cret")).await;
    assert_eq!(status, 404);

    let lower =
        b"GET /v1/sites HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: bearer s3cret\r\n\r\n";
    assert!(support::raw_exchange(p.admin, lower).await.starts_with("HTTP/1.1 200"));

    let twice = r#"{"blue":50,"blue":100}"#;
    let (status, body) = admin_raw(p.admin, "PUT", "/v1/sites/shop/weights", twice, Some("s3cret")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("twice"), "{body}");
    let site = admin_raw(p.admin, "GET", "/v1/sites/shop", "", Some("s3cret")).await.1;
    assert_eq!(site["weights"], Value::Null);
}

/// A switch whose save failed after its file was in place (the directory's
/// fsync failed after the rename) changes nothing, not even after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_whose_save_failed_is_not_live_after_a_restart() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]);
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let p = Proxy::start_with(&sites, Options { fail_after_write: Some(fail.clone()), ..Default::default() }).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (500, Some("state_write_failed")), "{body}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue");
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "blue");
    let saved: Value = serde_json::from_slice(&std::fs::read(p.dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(saved["sites"]["shop"]["live"], "blue", "{saved}");

    let dir = p.stop().await;
    let p = Proxy::start_with(&sites, Options { dir: Some(dir), ..Default::default() }).await;
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue", "the failed switch came back");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    assert!(history.as_array().unwrap().iter().all(|h| !(h["kind"] == "switch" && h["result"] == "ok")), "{history}");
}
