//! The atomic switch: no request dropped, no connection closed, and every
//! request started after an acknowledged switch goes to the new live target.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{site, Client, Origin, Proxy};

/// Several keep-alive clients drive the proxy while blue and green are
/// switched every ~100 ms: zero transport errors, zero non-2xx, both colours
/// answered, and no request started after an acknowledged switch went to the old target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_storm_drops_nothing_and_routes_after_ack() {
    let blue = Origin::start("blue").await;
    let green = Origin::start("green").await;
    let p = Arc::new(
        Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
            .await,
    );
    p.wait_healthy("shop", &["blue", "green"]).await;

    let t0 = Instant::now();
    let run_for = Duration::from_secs(3);
    // (sent, acked, target) of every switch.
    type SwitchLog = Vec<(Duration, Duration, &'static str)>;
    let switches: Arc<Mutex<SwitchLog>> = Arc::default();
    let switcher = {
        let (p, switches) = (p.clone(), switches.clone());
        tokio::spawn(async move {
            let mut to = "green";
            while t0.elapsed() < run_for {
                let sent = t0.elapsed();
                p.switch("shop", to).await;
                switches.lock().unwrap().push((sent, t0.elapsed(), to));
                to = if to == "green" { "blue" } else { "green" };
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut clients = Vec::new();
    for _ in 0..6 {
        let addr = p.addr;
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let mut seen = Vec::new();
            while t0.elapsed() < run_for + Duration::from_millis(200) {
                let start = t0.elapsed();
                let a = c.get("shop.test", "/").await.expect("transport error during switch storm");
                assert_eq!(a.status, 200, "non-2xx during switch storm: {a:?}");
                seen.push((start, t0.elapsed(), a.body));
            }
            assert!(!c.is_closed(), "a switch closed a client connection");
            seen
        }));
    }
    switcher.await.unwrap();
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    let switches = switches.lock().unwrap().clone();
    assert!(switches.len() >= 10, "only {} switches happened", switches.len());
    assert!(answers.iter().any(|(_, _, b)| b == "blue") && answers.iter().any(|(_, _, b)| b == "green"));
    let mut checked = 0;
    for (start, end, body) in &answers {
        // The last switch acknowledged before this request started...
        let Some(last) = switches.iter().rposition(|(_, acked, _)| acked < start) else { continue };
        // ...unless the next one was sent before the answer came back: the proxy
        // may have routed the request after that one took effect, and either is right.
        if switches.get(last + 1).is_some_and(|(sent, _, _)| sent <= end) {
            continue;
        }
        assert_eq!(
            body, switches[last].2,
            "request at {start:?} went to the old target after the switch at {:?} was acknowledged",
            switches[last].1
        );
        checked += 1;
    }
    assert!(checked > 100, "too few requests checked: {checked} of {}", answers.len());
}

/// The sum of `cutover_requests_total` over site `shop`'s series.
async fn requests_total(p: &Proxy) -> u64 {
    let text = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    let samples = text.lines().filter(|l| l.starts_with("cutover_requests_total{") && l.contains(r#"site="shop""#));
    samples.map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap()).sum()
}

/// A kept-alive client connection of either protocol.
enum Conn {
    H1(Client),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>),
}

impl Conn {
    async fn open(addr: std::net::SocketAddr, h2: bool) -> Conn {
        if !h2 {
            return Conn::H1(Client::connect(addr).await);
        }
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        Conn::H2(sender, tokio::spawn(async move { conn.await.expect("the h2 connection failed") }))
    }

    /// One GET: its status and `x-origin`, checked against the body.
    async fn get(&mut self, path: &str) -> (u16, String) {
        let (status, origin, body) = match self {
            Conn::H1(c) => {
                let a = c.get("shop.test", path).await.expect("h1 transport error during the switch storm");
                (a.status, a.headers["x-origin"].to_str().unwrap().to_string(), a.body)
            }
            Conn::H2(s, _) => {
                let req = http::Request::get(format!("http://shop.test{path}")).body(Empty::new()).unwrap();
                let resp = s.send_request(req).await.expect("h2 stream failed during the switch storm");
                let (status, origin) = (resp.status().as_u16(), resp.headers()["x-origin"].to_str().unwrap().into());
                let body = resp.into_body().collect().await.expect("h2 body failed").to_bytes();
                (status, origin, String::from_utf8_lossy(&body).into_owned())
            }
        };
        assert_eq!(body, origin, "body and x-origin disagree");
        (status, origin)
    }

    fn is_open(&self) -> bool {
        match self {
            Conn::H1(c) => !c.is_closed(),
            Conn::H2(s, conn) => !s.is_closed() && !conn.is_finished(),
        }
    }
}

/// A-1 reconciliation: 8 kept-alive clients (4 HTTP/1.1, 4 h2c) while blue
/// and green are switched every 50-100 ms for 2.5 s. Every request gets 200
/// with no transport error and no connection closes; the origins saw exactly
/// the requests the clients sent (nothing lost, nothing doubled), and
/// `cutover_requests_total` grew by that number; every request started more
/// than 5 ms after an acknowledged switch was served by the target it named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_storm_reconciles_client_origin_and_metric_counts() {
    let blue = Origin::start("blue").await;
    let green = Origin::start("green").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let before = requests_total(&p).await;

    let t0 = Instant::now();
    let run_for = Duration::from_millis(2500);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let addr = p.addr;
            tokio::spawn(async move {
                let mut c = Conn::open(addr, i % 2 == 1).await;
                let mut answers = Vec::new();
                while t0.elapsed() < run_for + Duration::from_millis(200) {
                    let start = t0.elapsed();
                    let (status, origin) = c.get(&format!("/c{i}/{}", answers.len())).await;
                    assert_eq!(status, 200, "client {i}: {origin} answered {status} during the storm");
                    answers.push((start, t0.elapsed(), origin));
                }
                assert!(c.is_open(), "a switch closed client {i}'s connection");
                answers
            })
        })
        .collect();
    let pause = |i: usize| Duration::from_millis(if i.is_multiple_of(2) { 50 } else { 100 });
    let switches = support::switch_storm(&p, "shop", ["green", "blue"], t0, run_for, pause).await;
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }

    assert!(switches.len() >= 15, "only {} switches happened", switches.len());
    let sent = answers.len();
    // Every request the clients sent reached exactly one origin, once.
    let mut paths: Vec<String> = blue.seen().into_iter().chain(green.seen()).map(|s| s.path).collect();
    assert_eq!(paths.len(), sent, "the origins saw {} requests, the clients sent {sent}", paths.len());
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), sent, "some request reached the origins twice");
    assert_eq!(answers.iter().filter(|a| a.2 == "blue").count(), blue.count());
    // The metric is counted as a request ends: poll until it has settled.
    let mut counted = 0;
    for _ in 0..100 {
        counted = requests_total(&p).await - before;
        if counted >= sent as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, sent as u64, "cutover_requests_total grew by {counted}, the clients sent {sent}");
    let (checked, wrong) = support::routed_after_acks(&switches, &answers, Duration::from_millis(5));
    assert!(wrong.is_empty(), "{} of {checked} checked requests misrouted: {wrong:#?}", wrong.len());
    assert!(checked > sent / 3, "too few requests checked: {checked} of {sent}");
}

/// A slow request started on blue finishes on blue after a switch to green,
/// while new requests go to green at once; blue is draining meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_finishes_on_the_old_target() {
    let blue = Origin::start("blue").await;
    let green = Origin::start("green").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;

    let addr = p.addr;
    let slow = tokio::spawn(async move { support::get(addr, "shop.test", "/slow?ms=1500").await });
    while blue.seen().iter().all(|s| s.path != "/slow") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.switch("shop", "green").await;
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "green");
    let (_, site) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(site["targets"]["blue"]["state"], "draining", "{site}");
    assert_eq!(site["targets"]["blue"]["inflight"], 1);

    let a = slow.await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "blue slow done"));
    let (_, site) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(site["targets"]["blue"]["state"], "standby", "{site}");
    assert_eq!(site["targets"]["blue"]["inflight"], 0);
}

/// A kept-alive client connection stays open across a switch, and its next
/// request goes to the new live target.
#[tokio::test]
async fn kept_alive_connection_survives_a_switch() {
    let blue = Origin::start("blue").await;
    let green = Origin::start("green").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;

    let mut c = Client::connect(p.addr).await;
    assert_eq!(c.get("shop.test", "/").await.unwrap().body, "blue");
    p.switch("shop", "green").await;
    assert!(!c.is_closed());
    assert_eq!(c.get("shop.test", "/").await.unwrap().body, "green");
    p.switch("shop", "blue").await;
    assert_eq!(c.get("shop.test", "/").await.unwrap().body, "blue");
}

/// Rollback returns to the previous target; with nothing to roll back to it is refused.
#[tokio::test]
async fn rollback_goes_to_previous_and_needs_one() {
    let blue = Origin::start("blue").await;
    let green = Origin::start("green").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;

    let (status, body) = p.api("POST", "/v1/sites/shop/rollback", None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "nothing_to_roll_back");

    p.switch("shop", "green").await;
    let (status, site) = p.api("POST", "/v1/sites/shop/rollback", Some(serde_json::json!({}))).await;
    assert_eq!(status, 200, "{site}");
    assert_eq!((site["live"].as_str(), site["previous"].as_str()), (Some("blue"), Some("green")));
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "blue");

    let (_, history) = p.api("GET", "/v1/sites/shop/history", None).await;
    let kinds: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["kind"].as_str().unwrap(), h["result"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("rollback", "ok"), ("switch", "ok"), ("rollback", "refused")]);
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_rollbacks_total{reason="manual",site="shop"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"cutover_live_target{site="shop",target="blue"} 1"#));
}
