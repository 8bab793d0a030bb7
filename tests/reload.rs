//! Configuration reload (`POST /v1/reload`, SIGHUP): an invalid file changes
//! nothing; a valid one applies as one new snapshot, without re-binding the
//! listeners or closing a client connection.

mod support;

use serde_json::json;
use support::{site, Client, Origin, Proxy};

/// A broken file is refused with every error and changes nothing; a good one
/// is visible at once and the kept-alive client connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refuses_broken_and_applies_good_config() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    p.switch("shop", "green").await;
    let before = p.api("GET", "/v1/sites/shop", None).await.1;
    let file = p.dir.path().join("cutover.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    let mut c = Client::connect(p.addr).await;
    assert_eq!(c.get("shop.test", "/").await.unwrap().body, "green");

    // Broken: two errors, both reported; nothing changes; traffic flows.
    std::fs::write(
        &file,
        good.replace("live: blue", "live: purple").replace("shutdown_timeout: 5s", "shutdown_timeout: 5s\nbogus: 1"),
    )
    .unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let paths: Vec<&str> =
        body["error"]["details"]["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"bogus") && paths.contains(&"sites[0].live"), "{paths:?}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1, before);
    assert_eq!(c.get("shop.test", "/").await.unwrap().body, "green");

    // Good: a new host and a third target appear; live (green, from state) is kept.
    let extra = Origin::start("extra").await;
    let changed = good
        .replace("hosts: [shop.test]", "hosts: [shop.test, new.test]")
        .replace("    health:", &format!("      extra: {{ endpoints: [\"{}\"] }}\n    health:", extra.addr));
    std::fs::write(&file, changed).unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sites"], json!(["shop"]));
    assert_eq!(body["restart_required"], json!([]));
    assert_eq!(c.get("new.test", "/").await.unwrap().body, "green");
    assert!(!c.is_closed(), "reload closed a client connection");
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["live"], "green");
    assert_eq!(site["targets"]["extra"]["state"], "standby");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_config_reloads_total{result="error"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"cutover_config_reloads_total{result="ok"} 1"#));
}

/// A reload that removes the live target falls back to the configured live
/// target (stale state dropped) and reports settings that need a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_drops_stale_state_and_reports_restart_settings() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    p.switch("shop", "green").await;
    let file = p.dir.path().join("cutover.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    let green_line = format!("      green: {{ endpoints: [\"{}\"], version: green-v1 }}\n", green.addr);
    assert!(good.contains(&green_line));
    let changed = good.replace(&green_line, "").replace("shutdown_timeout: 5s", "shutdown_timeout: 9s");
    std::fs::write(&file, changed).unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart_required"], json!(["shutdown_timeout"]));
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!((site["live"].as_str(), site["previous"].as_str()), (Some("blue"), None));
    assert!(site["targets"].get("green").is_none());
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "blue");
    // The change of live target is in the history, by the reload.
    let last = p.api("GET", "/v1/sites/shop/history", None).await.1[0].clone();
    let got = (&last["kind"], &last["from"], &last["to"], &last["actor"], &last["result"]);
    assert_eq!(got, (&json!("switch"), &json!("green"), &json!("blue"), &json!("reload"), &json!("ok")), "{last}");
    // Reloaded again unchanged: the setting still waits for a restart; put
    // back as it was started, it no longer does.
    let (_, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(body["restart_required"], json!(["shutdown_timeout"]), "{body}");
    let back = std::fs::read_to_string(&file).unwrap().replace("shutdown_timeout: 9s", "shutdown_timeout: 5s");
    std::fs::write(&file, back).unwrap();
    let (_, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(body["restart_required"], json!([]), "{body}");
}

/// A configured target whose endpoints were set through the API goes when a
/// reload drops it from the configuration (it does not stay on as a target
/// of the API's, without what the configuration said of it); a target only
/// the API defined stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_target_set_through_the_api_goes_with_the_configuration() {
    let (blue, green, extra) = (Origin::start("blue").await, Origin::start("green").await, Origin::start("x").await);
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    for (target, addr) in [("green", green.addr), ("extra", extra.addr)] {
        let body = json!({ "endpoints": [addr.to_string()], "version": "v2" });
        let (status, answer) = p.api("PUT", &format!("/v1/sites/shop/targets/{target}"), Some(body)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let file = p.dir.path().join("cutover.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    let green_line = format!("      green: {{ endpoints: [\"{}\"], version: green-v1 }}\n", green.addr);
    assert!(good.contains(&green_line));
    std::fs::write(&file, good.replace(&green_line, "")).unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert!(site["targets"].get("green").is_none(), "{site}");
    assert_eq!(site["targets"]["extra"]["version"], "v2", "{site}");
    let (status, body) = p.api("POST", "/v1/sites/shop/switch", Some(json!({ "to": "green", "force": true }))).await;
    assert_eq!(status, 404, "{body}");
    // Put back in the file, it is the configuration's again: no endpoints of the API's.
    std::fs::write(&file, &good).unwrap();
    assert_eq!(p.api("POST", "/v1/reload", None).await.0, 200);
    let site = p.api("GET", "/v1/sites/shop", None).await.1;
    assert_eq!(site["targets"]["green"]["version"], "green-v1", "{site}");
}

/// A reload that removes a paused site ends its pause and its series; the
/// site added back later is not paused (its state and its gate agree).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_removed_by_reload_leaves_no_pause_or_series_behind() {
    let (blue, other) = (Origin::start("blue").await, Origin::start("other").await);
    let sites = format!(
        "{}{}",
        site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]),
        site("keep", "keep.test", "blue", &[("blue", vec![other.addr])])
    );
    let p = Proxy::start(&sites).await;
    p.wait_healthy("shop", &["blue"]).await;
    let (status, _) = p.api("POST", "/v1/sites/shop/pause", Some(json!({"timeout": "60s"}))).await;
    assert_eq!(status, 200);
    let file = p.dir.path().join("cutover.yaml");
    let full = std::fs::read_to_string(&file).unwrap();
    let shop_block = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]);
    std::fs::write(&file, full.replace(&shop_block, "")).unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(!metrics.contains(r#"site="shop""#), "series of a removed site are left:\n{metrics}");
    assert!(metrics.contains(r#"cutover_switches_total{result="ok",site="keep"} 0"#), "{metrics}");

    std::fs::write(&file, &full).unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["mode"]["paused"], false);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(3), support::get(p.addr, "shop.test", "/")).await;
    assert_eq!(answer.expect("the site added back is still paused").body, "blue");
}

/// A start that moves a site off a target the configuration no longer has
/// records it once: the reconciled state is saved, so the next start finds
/// nothing to change and records nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_records_a_reconciled_live_target_once() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    p.switch("shop", "green").await;
    let mut dir = p.stop().await;
    let only_blue = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]);
    let mut recorded = Vec::new();
    for _ in 0..2 {
        let p = Proxy::start_with(&only_blue, support::Options { dir: Some(dir), ..Default::default() }).await;
        let history = p.api("GET", "/v1/sites/shop/history", None).await.1;
        let by_reload: Vec<_> =
            history.as_array().unwrap().iter().filter(|e| e["actor"] == "reload").cloned().collect();
        assert_eq!(by_reload.len(), 1, "{history}");
        recorded.push(by_reload[0]["at"].clone());
        assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "blue");
        dir = p.stop().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(recorded[0], recorded[1], "the second start recorded the change again");
}

/// Each way of breaking the file (a YAML syntax error, an unknown key, a
/// live target that is not defined, a host two sites claim, a bad endpoint)
/// is refused with `400 invalid_config` naming the file, the field path and
/// the value; it changes neither routing, `GET /v1/sites` nor the state file,
/// and is counted as `result="error"`; the file put right reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_broken_file_is_refused_and_counted() {
    let (blue, green, other) = (Origin::start("blue").await, Origin::start("green").await, Origin::start("o").await);
    let sites = format!(
        "{}{}",
        site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]),
        site("keep", "keep.test", "blue", &[("blue", vec![other.addr])])
    );
    let p = Proxy::start(&sites).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    p.switch("shop", "green").await;
    let file = p.dir.path().join("cutover.yaml");
    let state = p.dir.path().join("state.json");
    let good = std::fs::read_to_string(&file).unwrap();
    let (before, saved) = (p.api("GET", "/v1/sites", None).await.1, std::fs::read(&state).unwrap());
    let green_line = format!("      green: {{ endpoints: [\"{}\"], version: green-v1 }}", green.addr);
    assert!(good.contains(&green_line));
    // (broken file, field path, text its error names: in its message or value)
    let cases = [
        (good.replace("sites:\n", "sites:\n  - name: [unclosed\n"), "", "line 8 column 9"),
        (
            good.replace("shutdown_timeout: 5s", "shutdown_timeout: 5s\nshutdown_timout: 9s"),
            "shutdown_timout",
            "unknown",
        ),
        (good.replacen("live: blue", "live: purple", 1), "sites[0].live", "purple"),
        (good.replace("hosts: [keep.test]", "hosts: [SHOP.test]"), "sites[1].hosts[0]", "shop.test"),
        (
            good.replace(&green_line, "      green: { endpoints: [\"nowhere\"] }"),
            "sites[0].targets.green.endpoints[0]",
            "nowhere",
        ),
    ];
    for (n, (broken, path, names)) in cases.iter().enumerate() {
        std::fs::write(&file, broken).unwrap();
        let (status, body) = p.api("POST", "/v1/reload", None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_config")), "case {n}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or_default().contains("cutover.yaml"), "case {n}: {body}");
        let errors = body["error"]["details"]["errors"].as_array().unwrap();
        let named = |e: &serde_json::Value| {
            e["path"] == *path && [&e["message"], &e["value"]].iter().any(|t| t.as_str().unwrap_or("").contains(names))
        };
        assert!(errors.iter().any(named), "case {n}: no error at {path:?} naming {names:?}: {body}");
        assert_eq!(p.api("GET", "/v1/sites", None).await.1, before, "case {n} changed the sites");
        assert_eq!(std::fs::read(&state).unwrap(), saved, "case {n} changed the state file");
        assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "green", "case {n}");
        assert_eq!(support::get(p.addr, "keep.test", "/").await.body, "o", "case {n}");
        let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
        let counted = format!("cutover_config_reloads_total{{result=\"error\"}} {}", n + 1);
        assert!(metrics.contains(&counted), "case {n}: want {counted}\n{metrics}");
    }
    std::fs::write(&file, &good).unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_config_reloads_total{result="ok"} 1"#), "{metrics}");
    assert_eq!(p.api("GET", "/v1/sites/shop", None).await.1["live"], "green");
}
