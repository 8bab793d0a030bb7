//! The admin API (SPEC §4): auth, errors that change nothing, gates, set-target.

mod support;

use std::collections::{HashMap, HashSet};

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

/// D-5: 50 concurrent switches alternating targets, with 6 rollbacks mixed in,
/// are applied one at a time. Each switch is 200 with its own target live in
/// its answer (one to the target already live changes nothing and records
/// nothing); a rollback is 200, or 409 `nothing_to_roll_back` (recorded) while
/// nothing was switched yet. The history is one unbroken chain holding each
/// accepted change once; the API, the state file and the newest entry agree on
/// the live target; requests meanwhile all get 200 from blue or green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_switches_and_rollbacks_are_applied_one_at_a_time() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (p, _b, _g) = shop(None).await;
    // Nothing to roll back to yet: refused, and recorded.
    let (status, body) = p.api("POST", "/v1/sites/shop/rollback", None).await;
    assert_eq!((status, &body["error"]["code"]), (409, &json!("nothing_to_roll_back")), "{body}");
    let mut rollbacks_refused = 1;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (addr, stop) = (p.addr, stop.clone());
        async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let a = support::Client::connect(addr).await.get("shop.test", "/").await;
                answers.push(a.map(|a| (a.status, a.body)).map_err(|e| e.to_string()));
            }
            answers
        }
    });
    // (request, its target for a switch, status, answer)
    let calls: Vec<_> = (0..56_usize)
        .map(|i| {
            let admin = p.admin;
            tokio::spawn(async move {
                let (to, path, body) = match i % 9 {
                    4 => (None, "/v1/sites/shop/rollback", None),
                    _ => {
                        let to = if i.is_multiple_of(2) { "green" } else { "blue" };
                        (Some(to), "/v1/sites/shop/switch", Some(json!({"to": to, "reason": format!("d5-{i}")})))
                    }
                };
                let (status, answer) = admin_call(admin, "POST", path, body, None).await;
                (i, to, status, answer)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let mut rollbacks_ok = 0;
    for (i, to, status, answer) in &answers {
        match to {
            Some(to) => assert_eq!((*status, answer["live"].as_str()), (200, Some(*to)), "switch {i}: {answer}"),
            None if *status == 200 => rollbacks_ok += 1,
            None => {
                assert_eq!((*status, &answer["error"]["code"]), (409, &json!("nothing_to_roll_back")), "{answer}");
                rollbacks_refused += 1;
            }
        }
    }
    assert_eq!(answers.iter().filter(|a| a.1.is_some()).count(), 50);

    let (_, history) = p.api("GET", "/v1/sites/shop/history", None).await;
    let mut oldest_first = history.as_array().unwrap().clone();
    oldest_first.reverse();
    let (refused, changes): (Vec<&Value>, Vec<&Value>) = oldest_first.iter().partition(|e| e["result"] == "refused");
    assert_eq!(refused.len(), rollbacks_refused, "{history}");
    assert!(refused.iter().all(|e| e["kind"] == "rollback"), "{history}");
    // Refusals happen only while nothing has been switched yet.
    assert!(oldest_first[..refused.len()].iter().all(|e| e["result"] == "refused"), "{history}");
    let mut live = "blue";
    let mut reasons = std::collections::HashSet::new();
    for e in &changes {
        assert_eq!((e["result"].as_str(), e["from"].as_str()), (Some("ok"), Some(live)), "chain broken at {e}");
        live = e["to"].as_str().unwrap();
        assert_ne!(e["from"], e["to"], "{e}");
        if e["kind"] == "switch" {
            // Each reason names a switch that answered 200 to this target, once.
            let reason = e["reason"].as_str().unwrap();
            assert!(reasons.insert(reason.to_string()), "{reason} recorded twice: {history}");
            let i: usize = reason.strip_prefix("d5-").unwrap().parse().unwrap();
            assert_eq!(answers[i].1, Some(live), "{e}");
        } else {
            assert_eq!((e["kind"].as_str(), &e["reason"]), (Some("rollback"), &Value::Null), "{e}");
        }
    }
    assert_eq!(changes.iter().filter(|e| e["kind"] == "rollback").count(), rollbacks_ok, "{history}");
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["live"].as_str(), Some(live), "{site}");
    let saved: Value = serde_json::from_slice(&std::fs::read(p.dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(saved["sites"]["shop"]["live"].as_str(), Some(live));
    assert_eq!(saved["sites"]["shop"]["history"], json!(oldest_first), "the state file's history differs");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    let ok = format!(r#"cutover_switches_total{{result="ok",site="shop"}} {}"#, changes.len());
    assert!(metrics.contains(&ok), "no {ok} in:\n{metrics}");

    let traffic = traffic.await.unwrap();
    assert!(!traffic.is_empty());
    for a in &traffic {
        assert!(matches!(a, Ok((200, body)) if body == "blue" || body == "green"), "{a:?}");
    }
}

/// One admin call with `authorization` as the raw header value, if any: the whole answer.
async fn call_with(
    admin: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    authorization: Option<&str>,
) -> support::Answer {
    let mut req = http::Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let req = req.body(http_body_util::Full::new(bytes::Bytes::from(body.to_string()))).unwrap();
    support::Client::connect(admin).await.send(req).await.unwrap()
}

/// D-1/D-2: every `/v1` endpoint of SPEC §4 refuses a call without the token,
/// with a wrong one, with the token in the query string or under another
/// scheme than `Bearer`: `401 unauthorized` with `WWW-Authenticate: Bearer`,
/// and the site, its history and the state file are unchanged. The same calls
/// with the token are not refused.
#[tokio::test]
async fn every_v1_endpoint_refuses_bad_credentials_and_changes_nothing() {
    let (p, _b, g) = shop(Some("s3cret")).await;
    let deploy = format!(r#"{{"target":"green","endpoints":["{}"],"version":"v2"}}"#, g.addr);
    let endpoints = [
        ("GET", "/v1/sites", ""),
        ("GET", "/v1/sites/shop", ""),
        ("GET", "/v1/sites/shop/history", ""),
        ("GET", "/v1/deployments/d-1", ""),
        ("PUT", "/v1/sites/shop/targets/canary", r#"{"endpoints":["127.0.0.1:9"],"version":"v9"}"#),
        ("POST", "/v1/sites/shop/switch", r#"{"to":"green","force":true}"#),
        ("POST", "/v1/sites/shop/rollback", r#"{"force":true}"#),
        ("PUT", "/v1/sites/shop/mode", r#"{"read_only":true}"#),
        ("POST", "/v1/sites/shop/pause", r#"{"timeout":"30s"}"#),
        ("POST", "/v1/sites/shop/resume", ""),
        ("PUT", "/v1/sites/shop/weights", r#"{"blue":90,"green":10}"#),
        ("DELETE", "/v1/sites/shop/weights", ""),
        ("POST", "/v1/sites/shop/deploy", &deploy),
        ("POST", "/v1/reload", ""),
    ];
    // (query, Authorization) of each credential that must be refused.
    let refused = [
        ("", None),
        ("", Some("Bearer wrong")),
        ("", Some("Bearer s3cre")),
        ("", Some("Bearer s3cret2")),
        ("", Some("Bearer")),
        ("", Some("Bearers3cret")),
        ("", Some("s3cret")),
        ("", Some("Token s3cret")),
        ("", Some("Basic s3cret")),
        ("", Some("Basic YWRtaW46czNjcmV0")), // admin:s3cret
        ("?token=s3cret", None),
        ("?access_token=s3cret", Some("Bearer wrong")),
    ];
    let state = p.dir.path().join("state.json");
    let snapshot = || async {
        let site = p.api("GET", "/v1/sites/shop", None).await.1;
        let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
        (site, history, std::fs::read(&state).ok())
    };
    let before = snapshot().await;
    for (method, path, body) in endpoints {
        for (query, authorization) in refused {
            let a = call_with(p.admin, method, &format!("{path}{query}"), body, authorization).await;
            let what = format!("{method} {path}{query} with {authorization:?}");
            assert_eq!(a.status, 401, "{what}: {}", a.body);
            assert_eq!(a.headers.get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]), "{what}");
            let error: Value = serde_json::from_str(&a.body).unwrap_or_default();
            assert_eq!(error["error"]["code"], "unauthorized", "{what}: {}", a.body);
        }
    }
    assert!(before == snapshot().await, "a refused call changed the site, its history or the state file");
    // The token makes the same calls pass the check (whatever they answer then).
    for (method, path, body) in endpoints {
        let a = call_with(p.admin, method, path, body, Some("Bearer s3cret")).await;
        assert_ne!(a.status, 401, "{method} {path} with the token: {}", a.body);
    }
    assert!(before != snapshot().await, "the calls with the token changed nothing either");
}

/// Moves `path` aside to `path.aside`, for as long as a fault takes its place.
fn move_aside(path: &std::path::Path) -> std::path::PathBuf {
    let aside = std::path::PathBuf::from(format!("{}.aside", path.display()));
    std::fs::rename(path, &aside).unwrap();
    aside
}

/// E-5: while the state cannot be saved, changes fail before their file is
/// in place, whatever the user (root ignores permissions): first the state
/// directory's place is taken by a file (the temporary file cannot be
/// created), then the state file's by a directory (the rename fails). Each
/// switch, rollback and mode change then answers 500 `state_write_failed`
/// naming the file and the fault, and changes nothing: live, modes, history,
/// the file in place, traffic (writes pass, still on the old target); no
/// temporary file is left. Once the fault is gone the next switch succeeds,
/// and a restart has it live with only the accepted switches in its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_failing_before_the_rename_changes_nothing_and_the_next_one_succeeds() {
    let (p, blue, green) = shop(None).await;
    let dir = p.dir.path().to_path_buf();
    let state = dir.join("state.json");
    let no_temporary_file = |dir: &std::path::Path| {
        let names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert!(!names.iter().any(|n| n.contains(".tmp-")), "a temporary file was left: {names:?}");
    };
    // Three rounds of refused changes while `fault` holds; traffic meanwhile goes to `live`.
    let refused = |to: &'static str, live: &'static str, fault: &'static str| {
        let p = &p;
        async move {
            let before =
                (p.api("GET", "/v1/sites/shop", None).await.1, p.api("GET", "/v1/sites/shop/history", None).await.1);
            for round in 0..3 {
                let calls = [
                    ("POST", "/v1/sites/shop/switch", Some(json!({"to": to, "reason": format!("e5-refused-{round}")}))),
                    ("POST", "/v1/sites/shop/switch", Some(json!({"to": to, "force": true}))),
                    ("POST", "/v1/sites/shop/rollback", Some(json!({"force": true}))),
                    ("PUT", "/v1/sites/shop/mode", Some(json!({"read_only": true}))),
                ];
                for (method, path, body) in calls {
                    if path.ends_with("rollback") && before.0["previous"].is_null() {
                        continue;
                    }
                    let (status, answer) = p.api(method, path, body).await;
                    assert_eq!(
                        (status, answer["error"]["code"].as_str()),
                        (500, Some("state_write_failed")),
                        "{path}: {answer}"
                    );
                    let message = answer["error"]["message"].as_str().unwrap_or_default();
                    assert!(message.contains("state.json") && message.contains(fault), "{path}: {message}");
                }
                let mut c = support::Client::connect(p.addr).await;
                assert_eq!(c.get("shop.test", "/").await.unwrap().body, live);
                let post = http::Request::post("/orders").header("host", "shop.test").body(Default::default());
                let a = c.send(post.unwrap()).await.unwrap();
                assert_eq!((a.status, a.body.as_str()), (200, live), "a write during the fault");
            }
            let after =
                (p.api("GET", "/v1/sites/shop", None).await.1, p.api("GET", "/v1/sites/shop/history", None).await.1);
            assert_eq!(after, before, "a failed save changed the site or its history");
        }
    };

    // The directory's place is taken by a file: no temporary file can be created.
    let aside = move_aside(&dir);
    std::fs::write(&dir, "not a directory").unwrap();
    refused("green", "blue", "Not a directory").await;
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&aside, &dir).unwrap();
    no_temporary_file(&dir);
    assert!(!state.exists(), "a state file appeared");
    let ok = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "green", "reason": "e5-ok-1"}))).await;
    assert_eq!((ok.0, ok.1["live"].as_str()), (200, Some("green")), "{}", ok.1);
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "green");

    // The state file's place is taken by a directory: the rename fails.
    let saved = std::fs::read(&state).unwrap();
    let aside = move_aside(&state);
    std::fs::create_dir(&state).unwrap();
    refused("blue", "green", "Is a directory").await;
    std::fs::remove_dir(&state).unwrap();
    std::fs::rename(&aside, &state).unwrap();
    no_temporary_file(&dir);
    assert_eq!(std::fs::read(&state).unwrap(), saved, "the state file in place changed");
    let ok = p.api("POST", "/v1/sites/shop/switch", Some(json!({"to": "blue", "reason": "e5-ok-2"}))).await;
    assert_eq!((ok.0, ok.1["live"].as_str()), (200, Some("blue")), "{}", ok.1);
    let served = (green.count(), blue.count());

    let dir = p.stop().await;
    let p = Proxy::start_with(
        &site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]),
        Options { dir: Some(dir), ..Default::default() },
    )
    .await;
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!((site["live"].as_str(), site["previous"].as_str()), (Some("blue"), Some("green")), "{site}");
    assert_eq!(site["mode"]["read_only"], false, "{site}");
    let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
    let entries: Vec<(&str, &str, &str)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["result"].as_str().unwrap(), e["reason"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(entries, [("switch", "ok", "e5-ok-2"), ("switch", "ok", "e5-ok-1")], "{history}");
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "blue");
    assert_eq!((green.count(), blue.count()), (served.0, served.1 + 1), "traffic after the restart");
}

/// D-3: the admin API answers on its own listener only. `/v1/...` calls
/// (with the token, even), `/metrics` and `/healthz` sent to the data-plane
/// port are traffic like any other: the live target answers them, sees each
/// as sent, and nothing is executed; on a Host no site has they are 404 and
/// go nowhere. Admin answers, preflights and refusals included, carry no
/// `Access-Control-*` field. A GET (or another wrong method) on a change is
/// 405 with `Allow` and changes nothing.
#[tokio::test]
async fn admin_calls_to_the_data_plane_are_plain_traffic_and_the_admin_api_allows_no_cors() {
    let (p, blue, green) = shop(Some("s3cret")).await;
    let before = (
        admin_call(p.admin, "GET", "/v1/sites/shop", None, Some("s3cret")).await,
        std::fs::read(p.dir.path().join("state.json")).ok(),
    );
    let calls = [
        ("POST", "/v1/sites/shop/switch", r#"{"to":"green","force":true}"#),
        ("POST", "/v1/sites/shop/rollback", r#"{"force":true}"#),
        ("PUT", "/v1/sites/shop/mode", r#"{"maintenance":true}"#),
        ("POST", "/v1/sites/shop/pause", r#"{"timeout":"30s"}"#),
        ("PUT", "/v1/sites/shop/weights", r#"{"blue":0,"green":100}"#),
        ("PUT", "/v1/sites/shop/targets/green", r#"{"endpoints":["127.0.0.1:9"]}"#),
        ("POST", "/v1/reload", ""),
        ("GET", "/v1/sites", ""),
        ("GET", "/metrics", ""),
        ("GET", "/healthz", ""),
    ];
    for host in ["shop.test", "127.0.0.1"] {
        for (method, path, body) in calls {
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", host)
                .header("authorization", "Bearer s3cret")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let a = support::Client::connect(p.addr).await.send(req).await.unwrap();
            let expected = if host == "shop.test" { (200, "blue") } else { (404, a.body.as_str()) };
            assert_eq!((a.status, a.body.as_str()), expected, "{method} {path} to the data plane as {host}");
        }
    }
    let seen: Vec<(String, String, usize)> =
        blue.seen().iter().map(|s| (s.method.to_string(), s.path.clone(), s.body_len)).collect();
    let sent: Vec<(String, String, usize)> =
        calls.iter().map(|(m, p, b)| (m.to_string(), p.to_string(), b.len())).collect();
    assert_eq!(seen, sent, "the live target did not see the calls as sent");
    assert!(blue.seen().iter().all(|s| s.headers["authorization"] == "Bearer s3cret"));
    assert_eq!(green.count(), 0);
    let after = (
        admin_call(p.admin, "GET", "/v1/sites/shop", None, Some("s3cret")).await,
        std::fs::read(p.dir.path().join("state.json")).ok(),
    );
    assert_eq!(after, before, "a call to the data plane changed the site");
    assert_eq!(p.api("GET", "/v1/sites/shop/history", None).await.1, json!([]));

    // No CORS on any admin answer: preflights, refusals, errors and successes.
    let token = "Authorization: Bearer s3cret\r\n";
    let admin_answers = [
        ("OPTIONS", "/v1/sites/shop/switch", "Origin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\n"),
        (
            "OPTIONS",
            "/v1/sites/shop/switch",
            "Origin: http://localhost:9901\r\nAccess-Control-Request-Method: POST\r\n",
        ),
        ("OPTIONS", "/v1/sites", "Origin: http://evil.example\r\nAccess-Control-Request-Headers: authorization\r\n"),
        ("POST", "/v1/sites/shop/switch", "Origin: http://evil.example\r\nContent-Length: 2\r\n\r\n{}"),
        ("GET", "/v1/sites", "Origin: http://evil.example\r\n"),
        ("GET", "/v1/sites", token),
        ("GET", "/v1/sites/nope", token),
        ("GET", "/nothing-here", "Origin: http://evil.example\r\n"),
        ("GET", "/metrics", "Origin: http://evil.example\r\n"),
        ("GET", "/healthz", "Origin: null\r\n"),
    ];
    for (method, path, fields) in admin_answers {
        let (fields, body) = fields.split_once("\r\n\r\n").unwrap_or((fields, ""));
        let fields =
            if fields.is_empty() || fields.ends_with("\r\n") { fields.to_string() } else { format!("{fields}\r\n") };
        let raw = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{fields}\r\n{body}");
        let answer = support::raw_exchange(p.admin, raw.as_bytes()).await;
        let head = answer.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 "), "{method} {path}: {answer}");
        assert!(!head.contains("access-control-"), "{method} {path} {fields:?}: {answer}");
        if method == "OPTIONS" {
            assert!(!head.starts_with("http/1.1 2"), "a preflight was accepted: {answer}");
        }
    }

    // A GET, HEAD or other wrong method on a change: 405 with Allow.
    let changes = [
        ("/v1/sites/shop/switch", "POST"),
        ("/v1/sites/shop/rollback", "POST"),
        ("/v1/sites/shop/pause", "POST"),
        ("/v1/sites/shop/resume", "POST"),
        ("/v1/sites/shop/deploy", "POST"),
        ("/v1/reload", "POST"),
        ("/v1/sites/shop/mode", "PUT"),
        ("/v1/sites/shop/weights", "PUT, DELETE"),
        ("/v1/sites/shop/targets/green", "PUT"),
    ];
    for (path, allow) in changes {
        for method in ["GET", "HEAD", "PATCH"] {
            let raw = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{token}\r\n");
            let answer = support::raw_exchange(p.admin, raw.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 405"), "{method} {path}: {answer}");
            let allowed = answer.lines().find_map(|l| l.strip_prefix("allow: ").or_else(|| l.strip_prefix("Allow: ")));
            assert_eq!(allowed, Some(allow), "{method} {path}: {answer}");
            if method == "GET" {
                let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap();
                assert_eq!(body["error"]["code"], "method_not_allowed", "{answer}");
            }
        }
    }
    let after = (
        admin_call(p.admin, "GET", "/v1/sites/shop", None, Some("s3cret")).await,
        std::fs::read(p.dir.path().join("state.json")).ok(),
    );
    assert_eq!(after, before, "a refused admin call changed the site");
    assert_eq!(p.api("GET", "/v1/sites/shop/history", None).await.1, json!([]));
}

/// The series of a Prometheus text exposition: each sample's name and labels, without its value.
fn series(exposition: &str) -> std::collections::BTreeSet<String> {
    let samples = exposition.lines().filter(|l| !l.is_empty() && !l.starts_with('#'));
    samples.map(|l| l.rsplit_once(' ').map_or(l, |(series, _value)| series).to_string()).collect()
}

/// A series' metric name and its labels, as (name, value) pairs.
fn parse_series(series: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = series.split_once('{') else { return (series, Vec::new()) };
    let (mut labels, mut chars) = (Vec::new(), rest.strip_suffix('}').unwrap_or(rest).chars());
    loop {
        let label: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if label.is_empty() {
            return (name, labels);
        }
        assert_eq!(chars.next(), Some('"'), "{series}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((label.trim_start_matches(',').to_string(), value));
        if chars.clone().next() == Some(',') {
            chars.next();
        }
    }
}

/// xorshift64: the same "random" inputs on every run.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[(self.next() % of.len() as u64) as usize]
    }
}

/// D-8: metric labels take bounded values only. Two batches of 300 requests
/// with random Host (most unknown: 404), path, query, method (extension
/// tokens too), X-Forwarded-For, request id, preview target (unknown ones:
/// 503) and canary cookie, answered with random statuses by the origin, plus
/// random admin paths, leave every series' labels within what the
/// configuration and SPEC §6 name (sites, targets, endpoints, status classes,
/// kinds, ...), no input appears anywhere in `/metrics`, the second batch adds
/// no series at all, and `cutover_requests_total` grew by exactly the
/// requests a target of a site answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_series_do_not_grow_with_what_clients_send() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let shop = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])])
        + "    preview: { header: x-cutover-target, hosts: { green.shop.test: green } }\n"
        + "    canary: { cookie: cutover-bucket }\n";
    let sites = shop + &site("other", "other.test", "green", &[("green", vec![green.addr])]);
    let p = Proxy::start(&sites).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    p.wait_healthy("other", &["green"]).await;
    let (status, body) = p.api("PUT", "/v1/sites/shop/weights", Some(json!({"blue": 50, "green": 50}))).await;
    assert_eq!(status, 200, "{body}");
    let scrape = || async { support::get(p.admin, "127.0.0.1", "/metrics").await.body };
    let requests_total = |exposition: &str| -> u64 {
        let samples = exposition.lines().filter(|l| l.starts_with("cutover_requests_total{"));
        samples.map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap()).sum()
    };
    let baseline = scrape().await;
    let before = series(&baseline);

    // Every label value the configuration and SPEC §6 allow.
    let endpoints = [blue.addr.to_string(), green.addr.to_string()];
    let mut allowed: HashMap<&str, Vec<String>> = HashMap::new();
    for (label, values) in [
        ("site", &["shop", "other"][..]),
        ("target", &["blue", "green"]),
        ("code", &["1xx", "2xx", "3xx", "4xx", "5xx"]),
        ("kind", &["connect", "timeout", "reset", "upgrade", "stream"]),
        ("listener", &["http", "https"]),
        ("result", &["ok", "refused", "error"]),
        ("reason", &["manual", "automatic"]),
        ("mode", &["read_only", "maintenance", "paused"]),
        ("state", &["succeeded", "failed", "rolled_back"]),
        ("endpoint", &[endpoints[0].as_str(), endpoints[1].as_str()]),
    ] {
        allowed.insert(label, values.iter().map(|v| v.to_string()).collect());
    }
    let buckets: Vec<String> = before
        .iter()
        .flat_map(|s| parse_series(s).1)
        .filter(|(label, _)| label == "le")
        .map(|(_, value)| value)
        .collect();
    assert!(!buckets.is_empty(), "no histogram buckets in:\n{baseline}");
    allowed.insert("le", buckets);
    let names: HashSet<&str> = before.iter().map(|s| parse_series(s).0).collect();
    let bounded = |all: &std::collections::BTreeSet<String>| {
        for s in all {
            let (name, labels) = parse_series(s);
            assert!(names.contains(name), "a new metric {s}");
            for (label, value) in labels {
                let ok = allowed.get(label.as_str()).is_some_and(|values| values.contains(&value));
                assert!(ok, "unbounded label {label}={value:?} in {s}");
            }
        }
    };
    bounded(&before);

    let mut rng = Xorshift(0x853c_49e6_748f_ea9b);
    let mut answered_by_a_site = 0;
    let mut batches = Vec::new();
    for _batch in 0..2 {
        for _ in 0..300 {
            let port = rng.next() % 65_535 + 1;
            let unknown = format!("zq{:x}.unknown.test", rng.next());
            let host = match rng.next() % 6 {
                0 | 1 => unknown,
                2 => "shop.test".to_string(),
                3 => format!("ShOp.TeSt:{port}"),
                4 => "green.shop.test".to_string(),
                _ => "other.test".to_string(),
            };
            let status = 200 + rng.next() % 400;
            let path = match rng.next() % 3 {
                0 => format!("/status/{status}"),
                1 => format!("/zq{:x}/{:x}?zq={:x}&b=%00%ff", rng.next(), rng.next(), rng.next()),
                _ => format!("/zq{:x}/%2e%2e/x;zq={:x}#", rng.next(), rng.next()),
            };
            let odd = format!("ZQ{:X}", rng.next() % 100_000);
            let method = rng.pick(&[
                "GET",
                "HEAD",
                "POST",
                "PUT",
                "DELETE",
                "PATCH",
                "OPTIONS",
                "PURGE",
                &odd,
                "ZQ!#$%&'*+-.^_`|~",
            ]);
            let mut req = http::Request::builder()
                .method(http::Method::from_bytes(method.as_bytes()).unwrap())
                .uri(&path)
                .header("host", &host)
                .header("x-forwarded-for", format!("203.0.113.{}, zq{:x}", rng.next() % 256, rng.next()))
                .header("x-request-id", format!("zq{:x}", rng.next()))
                .header("cookie", format!("cutover-bucket=zq{:x}", rng.next()));
            let preview = rng.next().is_multiple_of(4) && host.to_ascii_lowercase().starts_with("shop.test");
            if preview {
                req = req.header("x-cutover-target", format!("zq{:x}", rng.next()));
            }
            let req = req.body(http_body_util::Full::default()).unwrap();
            let a = support::Client::connect(p.addr).await.send(req).await;
            let a = a.unwrap_or_else(|e| panic!("{method} {path} to {host}: {e}"));
            let expected = if host.starts_with("zq") {
                404
            } else if preview {
                503
            } else if path.starts_with("/status/") {
                status as u16
            } else {
                200
            };
            assert_eq!(a.status, expected, "{method} {path} to {host}: {}", a.body);
            // Neither an unknown host nor an unknown preview target names a target to count it under.
            if !host.starts_with("zq") && !preview {
                answered_by_a_site += 1;
            }
        }
        for _ in 0..20 {
            let path = match rng.next() % 3 {
                0 => format!("/zq{:x}", rng.next()),
                1 => format!("/v1/sites/zq{:x}", rng.next()),
                _ => format!("/v1/zq{:x}/switch?zq={:x}", rng.next(), rng.next()),
            };
            let (status, body) = p.api(rng.pick(&["GET", "POST", "PUT", "ZQ"]), &path, None).await;
            assert!(status == 404 || status == 405, "{path}: {status} {body}");
        }
        batches.push(scrape().await);
    }
    for exposition in &batches {
        assert!(!exposition.contains("zq") && !exposition.contains("203.0.113"), "an input in /metrics:\n{exposition}");
        bounded(&series(exposition));
    }
    let (first, second) = (series(&batches[0]), series(&batches[1]));
    let new: Vec<&String> = first.difference(&before).collect();
    eprintln!("series new after the first batch: {new:?}");
    assert_eq!(second.difference(&first).collect::<Vec<_>>(), Vec::<&String>::new(), "the second batch added series");
    assert_eq!(requests_total(&batches[1]) - requests_total(&baseline), answered_by_a_site);
}

/// `POST /v1/sites/shop/switch` with `body` sent as `content_type`: status and parsed answer.
async fn switch_raw(p: &Proxy, content_type: &str, body: &[u8]) -> (u16, Value) {
    let req = http::Request::post("/v1/sites/shop/switch")
        .header("host", "127.0.0.1")
        .header("content-type", content_type)
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(body)))
        .unwrap();
    let a = support::Client::connect(p.admin).await.send(req).await.unwrap();
    (a.status, serde_json::from_str(&a.body).unwrap_or(Value::String(a.body)))
}

/// A switch body that is empty, blank, a JSON number, string, `null` or
/// `true`, truncated, led by a BOM, or followed by trailing garbage or a
/// second object is `400 invalid_json` with a message saying what is wrong
/// (serde's line and column for syntax errors) and changes nothing: site,
/// history, state file bytes. The `Content-Type` is not checked: valid JSON
/// sent as `text/plain` switches (plan D-4).
#[tokio::test]
async fn malformed_switch_bodies_are_400_and_leave_the_state_file_alone() {
    let (p, _b, _g) = shop(None).await;
    let state = p.dir.path().join("state.json");
    // Something saved, so the file exists and its bytes can be compared.
    let (status, body) = p.api("PUT", "/v1/sites/shop/mode", Some(json!({"read_only": false}))).await;
    assert_eq!(status, 200, "{body}");
    let (site, history, file) = (
        p.api("GET", "/v1/sites/shop", None).await.1,
        p.api("GET", "/v1/sites/shop/history", None).await.1,
        std::fs::read(&state).expect("state file written"),
    );
    let object = "expected a JSON object";
    let cases: [(&[u8], &str); 11] = [
        (b"", object),
        (b" \r\n\t", object),
        (b"42", object),
        (br#""green""#, object),
        (b"null", object),
        (b"true", object),
        (br#"{"to":"gre"#, "EOF while parsing a string at line 1 column 10"),
        (b"{\"to\":\n\"green\",", "EOF while parsing a value at line 2 column 8"),
        (b"\xef\xbb\xbf{\"to\":\"green\"}", object),
        (br#"{"to":"green"} x"#, "trailing characters at line 1 column 16"),
        (br#"{"to":"green"}{"to":"blue"}"#, "trailing characters at line 1 column 15"),
    ];
    for (body, says) in cases {
        let shown = String::from_utf8_lossy(body);
        let (status, answer) = switch_raw(&p, "application/json", body).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("invalid_json")), "{shown:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("request body: ") && message.contains(says), "{shown:?}: {answer}");
        assert!(answer["error"]["details"].is_object(), "{answer}");
    }
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1, site);
    assert_eq!(p.api("GET", "/v1/sites/shop/history", None).await.1, history);
    assert_eq!(std::fs::read(&state).unwrap(), file, "a refused body changed the state file");

    let (status, answer) = switch_raw(&p, "text/plain", br#"{"to":"green"}"#).await;
    assert_eq!((status, answer["live"].as_str()), (200, Some("green")), "{answer}");
    assert_ne!(std::fs::read(&state).unwrap(), file, "an accepted switch is saved");
}
