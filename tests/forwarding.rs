//! The data plane (SPEC §3): routing by host, header rules checked at the
//! origin, retries, 502/504, streamed bodies, and requests never forwarded.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{dead_addr, raw_exchange, site, Client, Options, Origin, Proxy};

async fn one_site(extra: &str) -> (Proxy, Origin) {
    let blue = Origin::start("blue").await;
    let sites = site("shop", "shop.test, Other.Test", "blue", &[("blue", vec![blue.addr])]);
    let p = Proxy::start_with(&sites, Options { extra: extra.into(), ..Default::default() }).await;
    (p, blue)
}

/// Hop-by-hop headers (and those named in `Connection`) never reach the origin
/// nor the client; forwarded headers and a request id are set.
#[tokio::test]
async fn hop_by_hop_removed_and_forwarded_headers_set() {
    let (p, blue) = one_site("").await;
    let req = Request::get("/path?q=1")
        .header("host", "shop.test:8080")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("upgrade", "h2c")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.test")
        .header("x-kept", "yes")
        .body(Full::default())
        .unwrap();
    let a = Client::connect(p.addr).await.send(req).await.unwrap();
    assert_eq!(a.status, 200);
    // The origin's own hop-by-hop headers do not reach the client.
    assert!(a.headers.get("x-origin-hop").is_none(), "{:?}", a.headers);
    assert!(a.headers.get("keep-alive").is_none());
    let seen = &blue.seen()[0];
    assert_eq!(seen.path, "/path");
    let h = &seen.headers;
    for gone in ["x-drop-me", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"] {
        assert!(h.get(gone).is_none(), "{gone} reached the origin: {h:?}");
    }
    assert_ne!(h.get("connection").map(|v| v.as_bytes()), Some(&b"keep-alive, x-drop-me"[..]));
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h["host"], "shop.test:8080");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "untrusted XFF must be replaced");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.test:8080");
    assert_eq!(h["x-request-id"].len(), 32);
}

/// The origin's hop-by-hop response fields stay upstream on both client
/// paths: a bodiless GET (cutover's own upstream client drops them as it reads
/// the head) and a POST with a body (hyper's client; cutover strips the map).
#[tokio::test]
async fn hop_by_hop_response_fields_removed_on_both_upstream_paths() {
    let (p, _blue) = one_site("").await;
    let mut c = Client::connect(p.addr).await;
    for req in [
        Request::get("/").header("host", "shop.test").body(Full::default()).unwrap(),
        Request::post("/echo").header("host", "shop.test").body(Full::new(Bytes::from_static(b"hi"))).unwrap(),
    ] {
        let method = req.method().clone();
        let a = c.send(req).await.unwrap();
        assert_eq!(a.status, 200, "{method}");
        // Every answer of the test origin carries `Connection: keep-alive, x-origin-hop`.
        assert!(a.headers.get("x-origin-hop").is_none(), "{method}: {:?}", a.headers);
        assert!(a.headers.get("connection").is_none(), "{method}: {:?}", a.headers);
        // `Trailer` on a body of known length declares nothing that can come.
        assert!(a.headers.get("trailer").is_none(), "{method}: {:?}", a.headers);
    }
}

/// From a trusted proxy, `X-Forwarded-For` is appended to and the others kept.
#[tokio::test]
async fn trusted_proxy_forwarded_headers_are_kept() {
    let (p, blue) = one_site("trusted_proxies: [127.0.0.0/8]").await;
    let req = Request::get("/")
        .header("host", "shop.test")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "trace-abc")
        .header("forwarded", "for=203.0.113.7")
        .header("x-real-ip", "203.0.113.7")
        .body(Full::default())
        .unwrap();
    assert_eq!(Client::connect(p.addr).await.send(req).await.unwrap().status, 200);
    let h = &blue.seen()[0].headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-request-id"], "trace-abc");
    assert_eq!((h["forwarded"].as_bytes(), h["x-real-ip"].as_bytes()), (&b"for=203.0.113.7"[..], &b"203.0.113.7"[..]));
    // A field the client's `Connection` names is hop-by-hop, even a forwarded one:
    // it goes, and cutover sets its own.
    let req = Request::get("/")
        .header("host", "shop.test")
        .header("connection", "x-forwarded-proto")
        .header("x-forwarded-proto", "https")
        .body(Full::default())
        .unwrap();
    assert_eq!(Client::connect(p.addr).await.send(req).await.unwrap().status, 200);
    assert_eq!(blue.seen()[1].headers["x-forwarded-proto"], "http");
}

/// Repeated forwarded fields from a trusted proxy are joined into one
/// `X-Forwarded-For`; a malformed `X-Request-Id` is replaced, not kept beside
/// the new one; both for a bodiless request (cutover's own upstream client)
/// and one with a body (hyper's).
#[tokio::test]
async fn repeated_forwarded_fields_and_a_bad_request_id() {
    let (p, blue) = one_site("trusted_proxies: [127.0.0.0/8]").await;
    // A bad id, and two good ones (which is one too many): replaced either way.
    for id in ["X-Request-Id: has space\r\n", "X-Request-Id: one\r\nX-Request-Id: two\r\n"] {
        for (method, body) in [("GET", ""), ("POST", "Content-Length: 2\r\n\r\nhi")] {
            let head = format!(
                "{method} / HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 10.0.0.1\r\n\
                 {id}X-Forwarded-Host: edge.test\r\nConnection: close\r\n{}",
                if body.is_empty() { "\r\n" } else { body }
            );
            let answer = raw_exchange(p.addr, head.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{method}: {answer:?}");
        }
    }
    let seen = blue.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        let all =
            |name: &str| s.headers.get_all(name).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(all("x-forwarded-for"), ["203.0.113.7, 10.0.0.1, 127.0.0.1"], "{}", s.method);
        assert_eq!(all("x-forwarded-host"), ["edge.test"], "{}", s.method);
        assert_eq!(all("x-forwarded-proto"), ["http"], "{}", s.method);
        let ids = all("x-request-id");
        assert_eq!(ids.len(), 1, "{}: {ids:?}", s.method);
        assert!(ids[0].len() == 32 && ids[0].bytes().all(|b| b.is_ascii_hexdigit()), "{}: {ids:?}", s.method);
    }
}

/// Hosts match without port, in any case and with or without the trailing dot
/// of a fully qualified name; an unknown host is 404 and nothing is
/// forwarded; an absolute-form URI is routed by its authority.
#[tokio::test]
async fn routing_by_host() {
    let (p, blue) = one_site("").await;
    assert_eq!(support::get(p.addr, "SHOP.test:1234", "/").await.body, "blue");
    assert_eq!(support::get(p.addr, "other.test", "/").await.body, "blue");
    let a = support::get(p.addr, "unknown.test", "/").await;
    assert_eq!(a.status, 404);
    assert_eq!(support::get(p.addr, "unknown.test.", "/").await.status, 404);
    assert_eq!(blue.count(), 2);
    assert_eq!(support::get(p.addr, "Shop.Test.:80", "/").await.body, "blue");
    assert_eq!(blue.count(), 3);
    let raw =
        raw_exchange(p.addr, b"GET http://shop.test/abs HTTP/1.1\r\nHost: unknown.test\r\nConnection: close\r\n\r\n")
            .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(blue.seen()[3].path, "/abs");
    assert_eq!(blue.seen()[3].headers["host"], "shop.test");
}

/// Ambiguous or refused framing gets 400/405 and never reaches the origin.
#[tokio::test]
async fn bad_requests_are_never_forwarded() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 5] = [
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\n\r\n",
        b"CONNECT shop.test:443 HTTP/1.1\r\nHost: shop.test:443\r\n\r\n",
    ];
    for raw in cases {
        let answer = raw_exchange(p.addr, raw).await;
        assert!(
            answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 405"),
            "{:?} → {answer:?}",
            String::from_utf8_lossy(raw)
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(blue.count(), 0, "a bad request reached the origin: {:?}", blue.seen());
}

/// A connection that cannot be made is retried on another endpoint: with one
/// endpoint dead every request still succeeds, and the dead one is taken out.
#[tokio::test]
async fn connect_failure_is_retried_on_another_endpoint() {
    let blue = Origin::start("blue").await;
    let dead = dead_addr().await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![dead, blue.addr])])).await;
    let mut c = Client::connect(p.addr).await;
    for _ in 0..20 {
        let a = c.get("shop.test", "/").await.unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "blue"));
    }
    let (_, s) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(s["targets"]["blue"]["endpoints"][0]["healthy"], false, "{s}");
}

/// A killed upstream mid-life: requests fail over to the surviving endpoint.
#[tokio::test]
async fn killed_endpoint_fails_over() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![a.addr, b.addr])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    let mut c = Client::connect(p.addr).await;
    for _ in 0..10 {
        assert_eq!(c.get("shop.test", "/").await.unwrap().status, 200);
    }
    a.kill();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..20 {
        let r = c.get("shop.test", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "b"));
    }
}

/// Health checked once a second, two successes to come back: an endpoint
/// taken out by the data plane stays out long enough to be seen.
fn slow_health(sites: String) -> String {
    sites.replace("interval: 50ms", "interval: 1s").replace("healthy_threshold: 1", "healthy_threshold: 2")
}

/// Waits until the site's `target` reports `healthy: true` for endpoint `i`.
async fn wait_endpoint_healthy(p: &Proxy, i: usize) {
    for _ in 0..200 {
        let (_, s) = p.api("GET", "/v1/sites/shop", None).await;
        if s["targets"]["blue"]["endpoints"][i]["healthy"] == true {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("endpoint {i} never came back");
}

/// An endpoint that does not answer in time (504) is taken out of rotation
/// (passive health): the next requests go to the other endpoint, and the
/// active check brings it back.
#[tokio::test]
async fn an_endpoint_that_times_out_is_taken_out_of_rotation() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let sites = slow_health(site("shop", "shop.test", "blue", &[("blue", vec![a.addr, b.addr])]));
    let opts = Options { extra: "limits: { upstream_response_timeout: 300ms }".into(), ..Default::default() };
    let p = Proxy::start_with(&sites, opts).await;
    p.wait_healthy("shop", &["blue"]).await;
    assert_eq!(support::get(p.addr, "shop.test", "/slow?ms=1500").await.status, 504);
    let (_, s) = p.api("GET", "/v1/sites/shop", None).await;
    let eps = &s["targets"]["blue"]["endpoints"];
    let slow = (0..2).find(|&i| eps[i]["healthy"] == false).unwrap_or_else(|| panic!("none taken out: {s}"));
    assert_eq!(eps[1 - slow]["healthy"], true, "{s}");
    let other = if slow == 0 { "b" } else { "a" };
    let mut c = Client::connect(p.addr).await;
    for _ in 0..10 {
        let r = c.get("shop.test", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, other), "the slow endpoint stayed in rotation");
    }
    wait_endpoint_healthy(&p, slow).await;
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..4 {
        seen.push(c.get("shop.test", "/").await.unwrap().body);
    }
    assert!(seen.iter().any(|b| b == "a") && seen.iter().any(|b| b == "b"), "back in rotation: {seen:?}");
}

/// An origin that answers its health checks and drops every other request unanswered.
async fn answers_only_probes() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((_, path)) = support::next_request(&mut s, &mut buf).await {
                    if path != "/up" || s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An endpoint that breaks exchanges (502) is taken out of rotation, for a
/// bodiless GET (cutover's own upstream client) and for a POST with a body
/// (hyper's client); each time the other endpoint takes the next requests.
#[tokio::test]
async fn an_endpoint_that_breaks_exchanges_is_taken_out_of_rotation() {
    let bad = answers_only_probes().await;
    let b = Origin::start("b").await;
    let p = Proxy::start(&slow_health(site("shop", "shop.test", "blue", &[("blue", vec![bad, b.addr])]))).await;
    p.wait_healthy("shop", &["blue"]).await;
    let post = || Request::post("/echo").header("host", "shop.test").body(Full::new(Bytes::from_static(b"b"))).unwrap();
    for round in ["GET", "POST"] {
        // Requests go round the two endpoints: one of the first two meets the bad one.
        let mut statuses = Vec::new();
        for _ in 0..2 {
            statuses.push(if round == "GET" {
                support::get(p.addr, "shop.test", "/").await.status
            } else {
                Client::connect(p.addr).await.send(post()).await.unwrap().status
            });
            if statuses.contains(&502) {
                break;
            }
        }
        assert!(statuses.contains(&502), "{round}: {statuses:?}");
        let (_, s) = p.api("GET", "/v1/sites/shop", None).await;
        assert_eq!(s["targets"]["blue"]["endpoints"][0]["healthy"], false, "{round}: {s}");
        let mut c = Client::connect(p.addr).await;
        for _ in 0..5 {
            assert_eq!(c.get("shop.test", "/").await.unwrap().body, "b", "{round}");
            assert_eq!(c.send(post()).await.unwrap().body, "b", "{round}");
        }
        wait_endpoint_healthy(&p, 0).await;
    }
}

/// Requests one at a time (every endpoint idle) are spread over the
/// target's endpoints, not all sent to the first.
#[tokio::test]
async fn sequential_requests_are_spread_over_the_endpoints() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![a.addr, b.addr])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    let mut c = Client::connect(p.addr).await;
    for _ in 0..20 {
        assert_eq!(c.get("shop.test", "/").await.unwrap().status, 200);
    }
    assert_eq!((a.count(), b.count()), (10, 10));
}

/// A malformed or stalled request body is the client's fault: `400` or
/// `408` (and the connection closed), no upstream error counted, and the
/// endpoint stays in rotation.
#[tokio::test]
async fn a_bad_or_stalled_request_body_is_the_clients_fault() {
    let (p, _blue) = one_site("limits: { upstream_response_timeout: 300ms }").await;
    p.wait_healthy("shop", &["blue"]).await;
    let bad_chunks: [&[u8]; 3] = [
        b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n",
    ];
    for req in bad_chunks {
        let answer = raw_exchange(p.addr, req).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{:?} → {answer:?}", String::from_utf8_lossy(req));
    }
    // 5 of 100 bytes, then nothing.
    let stalled = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 100\r\n\r\nhello";
    let answer = raw_exchange(p.addr, stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer:?}");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    let counted = metrics.lines().filter(|l| l.starts_with("cutover_upstream_errors_total{") && !l.ends_with(" 0"));
    assert_eq!(counted.count(), 0, "{metrics}");
    let (_, s) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(s["targets"]["blue"]["endpoints"][0]["healthy"], true, "{s}");
    assert_eq!(support::get(p.addr, "shop.test", "/").await.status, 200);
}

/// No endpoint answers → 502; an upstream slower than the response timeout → 504.
#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    let dead = dead_addr().await;
    let p = Proxy::start(&site("down", "down.test", "blue", &[("blue", vec![dead])])).await;
    assert_eq!(support::get(p.addr, "down.test", "/").await.status, 502);

    let (p, _blue) = one_site("limits: { upstream_response_timeout: 300ms }").await;
    assert_eq!(support::get(p.addr, "shop.test", "/slow?ms=2000").await.status, 504);
    assert_eq!(support::get(p.addr, "shop.test", "/").await.status, 200);
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(
        metrics.contains(r#"cutover_upstream_errors_total{kind="timeout",site="shop",target="blue"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"cutover_requests_total{code="5xx",site="shop",target="blue"} 1"#));
}

/// Bodies stream both ways: an 8 MiB upload comes back byte-exact, and a
/// slow chunked response arrives chunk by chunk (first byte before the last chunk is made).
#[tokio::test]
async fn bodies_stream_both_ways() {
    let (p, _blue) = one_site("").await;
    let payload: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let req = Request::post("/echo").header("host", "shop.test").body(Full::new(Bytes::from(payload.clone()))).unwrap();
    let a = Client::connect(p.addr).await.send(req).await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.bytes.len(), payload.len());
    assert!(a.bytes == payload, "upload came back altered");

    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let start = std::time::Instant::now();
    let req =
        Request::get("/stream?chunks=5&ms=300").header("host", "shop.test").body(Full::<Bytes>::default()).unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    // The origin makes the last chunk after 4 × 300 ms: the first came before it existed.
    assert!(start.elapsed() < Duration::from_millis(1200), "first chunk was buffered: {:?}", start.elapsed());
    assert_eq!(first, "blue chunk 0\n");
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "blue chunk 1\nblue chunk 2\nblue chunk 3\nblue chunk 4\n");
}

/// Upstream connections are kept alive and reused across requests.
#[tokio::test]
async fn upstream_connections_are_reused() {
    let (p, blue) = one_site("").await;
    let mut c = Client::connect(p.addr).await;
    for _ in 0..50 {
        assert_eq!(c.get("shop.test", "/").await.unwrap().status, 200);
    }
    // One connection carries them all (health probes, which open their own, aside).
    assert_eq!(blue.data_connections(), 1, "upstream connections for 50 sequential requests");
}

/// The response timeout counts from the request body's last byte: an upload
/// slower than `upstream_response_timeout` is not a slow upstream.
#[tokio::test]
async fn slow_upload_is_not_an_upstream_timeout() {
    let (p, _blue) = one_site("limits: { upstream_response_timeout: 300ms }").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(1);
    tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"0123456789")))).await.is_err() {
                return;
            }
        }
    });
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let resp =
        sender.send_request(Request::post("/echo").header("host", "shop.test").body(body).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200, "a 1 s upload hit the 300 ms response timeout");
    use http_body_util::BodyExt;
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes().len(), 100);
}

/// HTTP/1.0 without `Host` goes to the `*` site; without one it gets 400/404, never a panic.
#[tokio::test]
async fn http10_without_host_uses_the_default_site() {
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&site("any", "\"*\"", "blue", &[("blue", vec![blue.addr])])).await;
    let raw = raw_exchange(p.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.ends_with("blue"), "{raw}");
}

/// Fills the accept queue of `listener` (listen backlog 0, never accepted)
/// with connections until the kernel drops further SYNs: a connect to it then
/// hangs. Returns the connections, which must stay open.
async fn fill_backlog(listener: &tokio::net::TcpListener) -> Vec<tokio::net::TcpStream> {
    let addr = listener.local_addr().unwrap();
    let mut filled = Vec::new();
    // Two connects in a row that get no answer: the queue is full.
    let mut unanswered = 0;
    while unanswered < 2 {
        match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
            Ok(s) => filled.push(s.unwrap()),
            Err(_) => unanswered += 1,
        }
        assert!(filled.len() < 32, "the kernel keeps answering SYNs to a full accept queue");
    }
    filled
}

/// A listener (backlog 0) that answers health probes (`200` to any request)
/// until `stop` is cancelled; the task then gives the listener back, never to
/// accept again.
fn probes_until(
    stop: tokio_util::sync::CancellationToken,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<tokio::net::TcpListener>) {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let mut s = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = stop.cancelled() => return listener,
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while support::next_request(&mut s, &mut buf).await.is_some() {
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// The count of `cutover_upstream_errors_total` of kind `kind` for site `shop`, target `blue`.
fn upstream_errors(metrics: &str, kind: &str) -> u64 {
    let series = format!(r#"cutover_upstream_errors_total{{kind="{kind}",site="shop",target="blue"}} "#);
    metrics.lines().find_map(|l| l.strip_prefix(&series)).map_or(0, |v| v.parse().unwrap())
}

/// An endpoint that never accepts (its accept queue full, so SYNs go
/// unanswered) costs a request `limits.upstream_connect_timeout`, not more:
/// alone in its target it gets `502` naming no address, counted as a
/// timeout; healthy beside another one, the request that meets it is retried
/// on the other and served, and the endpoint leaves rotation (B-3 b).
#[tokio::test]
async fn an_endpoint_that_never_accepts_times_out_at_the_connect_timeout() {
    let opts = || Options { extra: "limits: { upstream_connect_timeout: 300ms }".into(), ..Default::default() };
    let stop = tokio_util::sync::CancellationToken::new();
    let (stuck, task) = probes_until(stop.clone());
    stop.cancel();
    let listener = task.await.unwrap();
    let _queued = fill_backlog(&listener).await;
    let p = Proxy::start_with(&site("shop", "shop.test", "blue", &[("blue", vec![stuck])]), opts()).await;
    let start = std::time::Instant::now();
    let a = support::get(p.addr, "shop.test", "/").await;
    let took = start.elapsed();
    assert_eq!(a.status, 502, "{a:?}");
    // The default connect timeout is 3 s; the limit set here is 300 ms.
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "answered after {took:?}");
    assert!(!a.body.contains("127.0.0.1") && !a.body.contains(&stuck.port().to_string()), "{:?}", a.body);
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert_eq!((upstream_errors(&metrics, "timeout"), upstream_errors(&metrics, "connect")), (1, 0), "{metrics}");
    drop(p);

    // Healthy (probes answered, then checked only every 30 s) until it stops accepting.
    let b = Origin::start("b").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (stuck, task) = probes_until(stop.clone());
    let sites =
        site("shop", "shop.test", "blue", &[("blue", vec![stuck, b.addr])]).replace("interval: 50ms", "interval: 30s");
    let p = Proxy::start_with(&sites, opts()).await;
    p.wait_healthy("shop", &["blue"]).await;
    stop.cancel();
    let listener = task.await.unwrap();
    let _queued = fill_backlog(&listener).await;
    let mut c = Client::connect(p.addr).await;
    let mut metrics = String::new();
    // Requests go round the two endpoints: one of the first two meets the stuck one.
    for _ in 0..4 {
        let start = std::time::Instant::now();
        let r = c.get("shop.test", "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "b"));
        assert!(start.elapsed() < Duration::from_secs(2), "served after {:?}", start.elapsed());
        metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    }
    // Tried once, then out of rotation.
    assert_eq!(upstream_errors(&metrics, "timeout"), 1, "{metrics}");
    let (_, s) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(s["targets"]["blue"]["endpoints"][0]["healthy"], false, "{s}");
}

/// A request body that stalls (64 KiB of a 1 MiB `Content-Length`, then
/// nothing) releases what it holds upstream: with 20 such uploads forwarded
/// and held open at the origin, each gets `408`, the origin sees each upload
/// end and no connection that carried one stays open; requests beside them
/// are served all along (C-2).
#[tokio::test]
async fn stalled_uploads_release_their_upstream_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Origin::start("blue").await;
    let sites =
        site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]).replace("interval: 50ms", "interval: 30s");
    let opts = Options { extra: "limits: { upstream_response_timeout: 1s }".into(), ..Default::default() };
    let p = Proxy::start_with(&sites, opts).await;
    p.wait_healthy("shop", &["blue"]).await;
    let baseline = blue.open_connections();
    let addr = p.addr;
    let uploads: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let head = "POST /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 1048576\r\n\r\n";
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(&[b'x'; 64 * 1024]).await.unwrap();
                let mut out = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
                String::from_utf8_lossy(&out).to_string()
            })
        })
        .collect();
    // Legitimate requests meanwhile, on a kept-alive connection.
    let legit = tokio::spawn(async move {
        let mut c = Client::connect(addr).await;
        let mut statuses = Vec::new();
        for _ in 0..30 {
            statuses.push(c.get("shop.test", "/").await.map(|a| a.status).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses
    });
    // The 20 uploads reached the origin, and hold their connections there.
    assert!(
        support::eventually(Duration::from_secs(5), || blue.open_connections() >= baseline + 20).await,
        "the stalled uploads were not forwarded: {} open",
        blue.open_connections()
    );
    for u in uploads {
        let answer = u.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    let statuses = legit.await.unwrap();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    // Each upload ended at the origin (its body cut short), and no connection that carried one is left.
    let ended = || blue.seen().iter().filter(|s| s.path == "/echo").count() == 20;
    assert!(support::eventually(Duration::from_secs(5), ended).await, "{} uploads ended upstream", blue.count());
    assert!(
        support::eventually(Duration::from_secs(5), || blue.open_connections_for("/echo") == 0).await,
        "{} upstream connections of stalled uploads still open",
        blue.open_connections_for("/echo")
    );
    assert_eq!(support::get(p.addr, "shop.test", "/").await.status, 200);
}

/// An upstream reading an upload slowly holds the client back (backpressure,
/// not buffering): while the origin reads nothing past its first 64 KiB the
/// client cannot write the whole 32 MiB body; once the origin reads, the
/// upload arrives byte-exact (B-4).
#[tokio::test]
async fn a_slow_reading_upstream_holds_the_upload_back() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TOTAL: usize = 32 * 1024 * 1024;
    let pattern: Arc<Vec<u8>> = Arc::new((0..TOTAL).map(|i| (i % 251) as u8).collect());
    let arrived = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let go = Arc::new(tokio::sync::Notify::new());
    // The origin: `/up` answered; `/upload` read with its head, the rest only after `go`, checked byte by byte.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let origin = listener.local_addr().unwrap();
    let (a, g, pat) = (arrived.clone(), go.clone(), pattern.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (arrived, go, pattern) = (a.clone(), g.clone(), pat.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                if buf.starts_with(b"GET /up ") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
                    return;
                }
                // The head came with at most 64 KiB of the body: nothing more until `go`.
                let mut intact = buf[end..] == pattern[..buf.len() - end];
                let mut got = buf.len() - end;
                arrived.store(true, Ordering::SeqCst);
                go.notified().await;
                while got < TOTAL {
                    let want = (TOTAL - got).min(chunk.len());
                    let n = match s.read(&mut chunk[..want]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    intact &= chunk[..n] == pattern[got..got + n];
                    got += n;
                }
                let answer = format!("{got} {}", if intact { "intact" } else { "altered" });
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", answer.len());
                let _ = s.write_all(format!("{head}{answer}").as_bytes()).await;
            });
        }
    });
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![origin])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    let written = Arc::new(AtomicUsize::new(0));
    let (w, addr, pat) = (written.clone(), p.addr, pattern.clone());
    let client = tokio::spawn(async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(64 * 1024).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\nContent-Length: {TOTAL}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        for piece in pat.chunks(64 * 1024) {
            s.write_all(piece).await.unwrap();
            w.fetch_add(piece.len(), Ordering::SeqCst);
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).to_string()
    });
    assert!(support::eventually(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)).await, "nothing arrived");
    // Wait until the client's writes stall (no progress for 500 ms) or it wrote everything.
    let mut last = written.load(Ordering::SeqCst);
    let mut still = 0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = written.load(Ordering::SeqCst);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 10 || now == TOTAL {
            break;
        }
    }
    assert!(
        last + 8 * 1024 * 1024 <= TOTAL,
        "the client wrote {last} of {TOTAL} bytes while the origin had read at most 64 KiB: the upload was buffered"
    );
    go.notify_one();
    let answer = client.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with(&format!("{TOTAL} intact")), "{answer:?}");
}

/// Requests that arrive together are spread by what each endpoint has been
/// given, counted when it is chosen, not once its connection is made: an
/// endpoint whose connections hang (its accept queue full) does not draw a
/// burst of them all while it has none counted. Each request that met it is
/// retried on the other and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_not_drawn_to_an_endpoint_still_connecting() {
    let b = Origin::start("b").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let (stuck, task) = probes_until(stop.clone());
    let sites =
        site("shop", "shop.test", "blue", &[("blue", vec![stuck, b.addr])]).replace("interval: 50ms", "interval: 30s");
    let opts = Options { extra: "limits: { upstream_connect_timeout: 500ms }".into(), ..Default::default() };
    let p = Proxy::start_with(&sites, opts).await;
    p.wait_healthy("shop", &["blue"]).await;
    stop.cancel();
    let listener = task.await.unwrap();
    let _queued = fill_backlog(&listener).await;
    // 20 ms apart: each connection to the other endpoint is made (and its
    // request counted) before the next request is routed.
    let mut burst = Vec::new();
    for _ in 0..8 {
        burst.push(tokio::spawn(support::get(p.addr, "shop.test", "/slow?ms=1000")));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in burst {
        let r = r.await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "b slow done"));
    }
    // Counted when chosen, the stuck endpoint takes about half of the burst;
    // counted only once connected, it would have taken nearly all of it.
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    let met = upstream_errors(&metrics, "timeout");
    assert!((1..=5).contains(&met), "{met} of 8 requests met the endpoint that hangs");
}

/// An upstream that does not answer in time costs the client a `504` and the
/// upstream the connection: the one that carried the request is closed, not
/// kept for the next request (its answer may still come), so a hung upstream
/// does not gather connections (B-3 a).
#[tokio::test]
async fn a_timed_out_exchange_closes_its_upstream_connection() {
    let (p, blue) = one_site("limits: { upstream_response_timeout: 300ms }").await;
    let mut c = Client::connect(p.addr).await;
    for _ in 0..3 {
        assert_eq!(c.get("shop.test", "/slow?ms=5000").await.unwrap().status, 504);
    }
    let released = support::eventually(Duration::from_secs(3), || blue.open_connections_for("/slow") == 0).await;
    assert!(released, "{} connections that timed out are still open", blue.open_connections_for("/slow"));
    assert_eq!(c.get("shop.test", "/").await.unwrap().status, 200);
}
