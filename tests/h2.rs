//! HTTP/2: h2c with prior knowledge from clients, `protocol: h2` to
//! upstreams, trailers passed through.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::h2_frames::*;
use support::{site, Origin, Proxy};

type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn h2c(addr: std::net::SocketAddr) -> H2 {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    sender
}

fn get(authority: &str, path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{authority}{path}")).body(Empty::new()).unwrap()
}

/// Many concurrent streams on one h2c connection across a switch all succeed,
/// and both colours answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_across_a_switch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let sender = h2c(p.addr).await;
    let send = |path: &'static str| {
        let mut s = sender.clone();
        tokio::spawn(async move {
            let resp = s.send_request(get("shop.test", path)).await.expect("h2 stream failed");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("h2 body failed").to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    };
    // 100 slow streams in flight on blue, then the switch, then 200 more on the same connection.
    let slow: Vec<_> = (0..100).map(|_| send("/slow?ms=400")).collect();
    while blue.seen().len() < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.switch("shop", "green").await;
    let fast: Vec<_> = (0..200).map(|_| send("/")).collect();
    for t in slow {
        assert_eq!(t.await.unwrap(), (200, "blue slow done".to_string()));
    }
    for t in fast {
        assert_eq!(t.await.unwrap(), (200, "green".to_string()));
    }
    // The h2 client's requests reached the origins over HTTP/1.1, with the :authority as Host.
    let seen = green.seen();
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[0].headers["host"], "shop.test");
}

/// A-2: one h2c connection keeps 16 streams in flight while blue and green
/// are switched every 100 ms for 2 s: no stream fails, the connection is
/// never closed (its future has not ended, so no GOAWAY ended it) and takes
/// new streams after, and every stream started more than 5 ms after an
/// acknowledged switch went to the target it named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_h2c_connection_across_a_switch_storm() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]))
        .await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    let conn = tokio::spawn(conn);
    let t0 = std::time::Instant::now();
    let run_for = Duration::from_secs(2);
    let streams: Vec<_> = (0..16)
        .map(|_| {
            let mut s = sender.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while t0.elapsed() < run_for + Duration::from_millis(200) {
                    let start = t0.elapsed();
                    let resp = s.send_request(get("shop.test", "/")).await.expect("h2 stream failed in the storm");
                    assert_eq!(resp.status(), 200);
                    let body = resp.into_body().collect().await.expect("h2 body failed in the storm").to_bytes();
                    answers.push((start, t0.elapsed(), String::from_utf8_lossy(&body).into_owned()));
                }
                answers
            })
        })
        .collect();
    let switches =
        support::switch_storm(&p, "shop", ["green", "blue"], t0, run_for, |_| Duration::from_millis(100)).await;
    let mut answers = Vec::new();
    for s in streams {
        answers.extend(s.await.unwrap());
    }
    assert!(!conn.is_finished() && !sender.is_closed(), "a switch ended the h2 connection");
    assert!(switches.len() >= 10, "only {} switches happened", switches.len());
    assert_eq!(blue.count() + green.count(), answers.len());
    let (checked, wrong) = support::routed_after_acks(&switches, &answers, Duration::from_millis(5));
    assert!(wrong.is_empty(), "{} of {checked} checked streams misrouted: {wrong:#?}", wrong.len());
    assert!(checked > answers.len() / 3, "too few streams checked: {checked} of {}", answers.len());
    // Still the same connection, still taking streams.
    let resp = sender.clone().send_request(get("shop.test", "/")).await.expect("the connection took no new stream");
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), switches.last().unwrap().to);
}

/// An h2 request with more than 100 header fields gets 431 from cutover, as
/// over HTTP/1.1, and is not forwarded.
#[tokio::test]
async fn h2_requests_over_100_fields_get_431() {
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])])).await;
    let mut sender = h2c(p.addr).await;
    // (The test origin, hyper's server, takes 100 fields at most: cutover adds its forwarded ones.)
    for (fields, status) in [(90, 200), (101, 431), (150, 431)] {
        let mut req = get("shop.test", &format!("/f{fields}"));
        for i in 0..fields {
            req.headers_mut().insert(http::HeaderName::try_from(format!("x-h{i}")).unwrap(), "v".parse().unwrap());
        }
        let resp = sender.send_request(req).await.unwrap();
        let got = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, status, "{fields} fields: {body:?}");
        if got == 431 {
            assert_eq!(body, "more than 100 header fields\n", "not cutover's answer");
        }
    }
    // Cookies, which HTTP/2 clients send one per field, count as one field.
    let mut req = get("shop.test", "/cookies");
    for i in 0..120 {
        req.headers_mut().append("cookie", format!("c{i}=v").parse().unwrap());
    }
    let resp = sender.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_ne!(body, "more than 100 header fields\n", "cookies counted one by one");
    let paths: Vec<String> = blue.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths[0], "/f90");
}

/// Site `api` (host `api.test`) whose live target `blue` is `origin`, spoken to over HTTP/2.
fn h2_site(origin: std::net::SocketAddr) -> String {
    format!(
        "  - name: api\n    hosts: [api.test]\n    live: blue\n    targets:\n      blue: {{ endpoints: [\"{origin}\"], protocol: h2 }}\n"
    )
}

/// A `protocol: h2` target is spoken to over HTTP/2, and response trailers
/// (gRPC status) reach an h2 client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_with_trailers() {
    let grpc = Origin::start("grpc").await;
    let sites = h2_site(grpc.addr);
    let p = Proxy::start(&sites).await;
    let mut sender = h2c(p.addr).await;
    for _ in 0..5 {
        let mut req = get("api.test", "/trailers");
        req.headers_mut().insert("te", "trailers".parse().unwrap());
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers were dropped");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "grpc with trailers");
    }
    let seen = grpc.seen();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_2));
    assert_eq!(seen[0].headers.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    // One multiplexed upstream connection (plus health probes, which are TCP checks here).
    assert!(grpc.connections.load(std::sync::atomic::Ordering::Relaxed) <= 3);
}

/// An HTTP/2 request without a body declares no trailers to an HTTP/1.1
/// upstream: `Trailer` (hop-by-hop) stays on a body that can end with them.
#[tokio::test]
async fn a_bodiless_h2_request_loses_its_trailer_field() {
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])])).await;
    let mut sender = h2c(p.addr).await;
    let mut req = get("shop.test", "/");
    req.headers_mut().insert("trailer", "x-a".parse().unwrap());
    req.headers_mut().insert("te", "trailers".parse().unwrap());
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let seen = &blue.seen()[0];
    assert!(seen.headers.get("trailer").is_none() && seen.headers.get("te").is_none(), "{:?}", seen.headers);
}

/// A small body that came whole with its head (read by cutover's own
/// server) reaches a `protocol: h2` target as an HTTP/2 request body.
#[tokio::test]
async fn a_small_body_reaches_an_h2_target() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let grpc = Origin::start("grpc").await;
    let sites = h2_site(grpc.addr);
    let p = Proxy::start(&sites).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nhello"), "{text}");
    let seen = &grpc.seen()[0];
    assert_eq!((seen.version, seen.body_len), (http::Version::HTTP_2, 5));
}

/// A request's trailers reach an HTTP/1.1 upstream, declared in `Trailer`
/// as the client declared them.
#[tokio::test]
async fn request_trailers_reach_an_h1_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])])).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let req = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nTrailer: X-Req-T\r\n\
        Connection: close\r\n\r\n2\r\nab\r\n0\r\nX-Req-T: 1\r\n\r\n";
    s.write_all(req).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got)).await.unwrap().unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    let seen = &blue.seen()[0];
    assert_eq!(seen.body_len, 2);
    assert_eq!(seen.trailers.as_ref().and_then(|t| t.get("x-req-t")).map(|v| v.as_bytes()), Some(&b"1"[..]));
}

/// An h2c client that goes silent after its request, without even answering
/// the shutdown PING that `idle_timeout` sends, is still cut: a connection
/// asked to finish closes within its grace instead of holding its place under
/// `max_connections` for ever. (A raw client: hyper's would answer the PING.)
#[tokio::test]
async fn silent_h2_client_is_cut_after_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Origin::start("blue").await;
    let opts = support::Options { extra: "limits: { idle_timeout: 500ms }".into(), ..Default::default() };
    let p = Proxy::start_with(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]), opts).await;
    p.wait_healthy("shop", &["blue"]).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
                                                         // HEADERS on stream 1, END_STREAM | END_HEADERS: GET, http, /, :authority shop.test (HPACK).
    let block: Vec<u8> = [&[0x82, 0x86, 0x84, 0x41, 9][..], b"shop.test"].concat();
    out.extend_from_slice(&[0, 0, block.len() as u8, 1, 5, 0, 0, 0, 1]);
    out.extend_from_slice(&block);
    s.write_all(&out).await.unwrap();
    // Read (never write: no SETTINGS or PING acknowledgement) until the proxy closes.
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    assert!(got.windows(4).any(|w| w == b"blue"), "no answer: {got:?}");
    assert!(closed, "the silent h2 connection was still open 5 s after its request");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(4), "closed after {took:?}");
}

/// Whether a normal h2 client still gets an answer from the origin.
async fn serves(sender: &mut H2) -> bool {
    match sender.send_request(get("shop.test", "/")).await {
        Ok(resp) => resp.status() == 200 && resp.into_body().collect().await.is_ok_and(|b| b.to_bytes() == "blue"),
        Err(_) => false,
    }
}

/// A proxy for site `shop` on one origin, healthy, with a normal h2c client
/// that has been served once.
async fn shop() -> (Origin, Proxy, H2) {
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    let mut legit = h2c(p.addr).await;
    assert!(serves(&mut legit).await);
    (blue, p, legit)
}

/// Writes `per_stream(id)` for `n` client streams on a raw connection, in
/// 64 KiB writes, and returns the GOAWAY the proxy answers with once it has
/// also closed the connection.
async fn flood_until_goaway(addr: std::net::SocketAddr, n: u32, per_stream: impl Fn(u32) -> Vec<u8>) -> Frame {
    use tokio::io::AsyncWriteExt;
    let (mut frames, mut w) = raw_h2(addr).await;
    let out: Vec<u8> = (1..2 * n).step_by(2).flat_map(per_stream).collect();
    let writer = tokio::spawn(async move {
        for batch in out.chunks(64 * 1024) {
            if w.write_all(batch).await.is_err() {
                break;
            }
        }
        w
    });
    let goaway = frames.until(|f| f.kind == GOAWAY).await.expect("closed without GOAWAY");
    frames.until_closed(|_| false).await;
    drop(writer.await.unwrap());
    goaway
}

/// Rapid reset (CVE-2023-44487): a client that opens 5,000 streams and
/// cancels each at once gets GOAWAY(ENHANCE_YOUR_CALM) within its first 100
/// streams and a close, few of its requests reach the origin, and another
/// client's connection is served before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_flood_gets_goaway() {
    let (blue, p, mut legit) = shop().await;
    let block = request_block("shop.test", "GET", b"/slow?ms=500", &[]);
    let sent = 5000;
    let goaway = flood_until_goaway(p.addr, sent, |id| {
        [frame(HEADERS, END_STREAM | END_HEADERS, id, &block), frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes())].concat()
    })
    .await;
    assert_eq!((goaway.stream, goaway.code()), (0, ENHANCE_YOUR_CALM), "{goaway:?}");
    assert!(goaway.last_stream() < 200, "GOAWAY only after {goaway:?}");
    assert!(serves(&mut legit).await, "the other connection was not served after the flood");
    let reached = blue.seen().iter().filter(|s| s.path == "/slow").count();
    assert!(reached <= 100, "{reached} of {sent} cancelled requests reached the origin");
}

/// MadeYouReset (CVE-2025-8671): a client whose every stream makes the proxy
/// reset it (DATA beyond its `content-length: 0`, a stream error) gets
/// GOAWAY(ENHANCE_YOUR_CALM) at the local-reset limit, few of its requests
/// reach the origin, and another client's connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_you_reset_flood_gets_goaway() {
    let (blue, p, mut legit) = shop().await;
    let block = request_block("shop.test", "POST", b"/slow?ms=500", &[(b"content-length", b"0")]);
    let sent = 3000;
    let goaway = flood_until_goaway(p.addr, sent, |id| {
        [frame(HEADERS, END_HEADERS, id, &block), frame(DATA, END_STREAM, id, b"x")].concat()
    })
    .await;
    assert_eq!((goaway.stream, goaway.code()), (0, ENHANCE_YOUR_CALM), "{goaway:?}");
    assert!(serves(&mut legit).await, "the other connection was not served after the flood");
    let reached = blue.seen().iter().filter(|s| s.path == "/slow").count();
    assert!(reached <= 100, "{reached} of {sent} reset requests reached the origin");
}

/// An empty-DATA flood (RUSTSEC-2026-0258 class): 10,000 empty DATA frames on
/// one open request stream, each costing the proxy work but no flow-control
/// window, get GOAWAY(ENHANCE_YOUR_CALM) and a close; another client's
/// connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_flood_gets_goaway() {
    use tokio::io::AsyncWriteExt;
    let (_blue, p, mut legit) = shop().await;
    let (mut frames, mut w) = raw_h2(p.addr).await;
    let head = frame(HEADERS, END_HEADERS, 1, &request_block("shop.test", "POST", b"/echo", &[]));
    let _ = w.write_all(&[head, frame(DATA, 0, 1, b"").repeat(10_000)].concat()).await;
    let goaway = frames.until(|f| f.kind == GOAWAY).await.expect("closed without GOAWAY");
    assert_eq!(goaway.code(), ENHANCE_YOUR_CALM, "{goaway:?}");
    frames.until_closed(|f| f.kind == HEADERS).await;
    assert!(serves(&mut legit).await, "the other connection was not served after the flood");
}

/// A CONTINUATION flood (CVE-2024-27316 class): a header block that never
/// ends gets GOAWAY(ENHANCE_YOUR_CALM) after a few frames, and the proxy stops
/// reading: a 64 MiB flood of 1-byte CONTINUATION frames cannot be written
/// whole. Nothing reaches the origin; another connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_gets_goaway() {
    use tokio::io::AsyncWriteExt;
    let (blue, p, mut legit) = shop().await;
    // The block ends in a literal field `x-pad` (new name, no indexing) whose value is to be
    // 100,000 bytes long, so that every 1-byte CONTINUATION leaves it unfinished.
    let head =
        [request_block("shop.test", "GET", b"/flood", &[]), vec![0, 5], b"x-pad".to_vec(), hpack_int(0, 7, 100_000)]
            .concat();
    let one = frame(CONTINUATION, 0, 1, b"a");
    // A short burst first, read whole by the proxy: the GOAWAY comes, then a clean close.
    let (mut frames, mut w) = raw_h2(p.addr).await;
    let burst = [frame(HEADERS, END_STREAM, 1, &head), one.repeat(20)].concat();
    w.write_all(&burst).await.unwrap();
    let goaway = frames.until(|f| f.kind == GOAWAY).await.expect("closed without GOAWAY");
    assert_eq!(goaway.code(), ENHANCE_YOUR_CALM, "{goaway:?}");
    frames.until_closed(|f| f.kind == HEADERS).await;
    // Then a flood: the proxy must stop reading (and close) long before 64 MiB.
    let (mut frames, mut w) = raw_h2(p.addr).await;
    w.write_all(&frame(HEADERS, END_STREAM, 1, &head)).await.unwrap();
    let mib = one.repeat(1024 * 1024 / one.len());
    let writer = tokio::spawn(async move {
        for sent in 0..64 {
            if w.write_all(&mib).await.is_err() {
                return sent;
            }
        }
        64
    });
    frames.until_closed(|f| f.kind == HEADERS).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), writer).await.expect("the flood still flows").unwrap();
    assert!(sent < 64, "the proxy read a 64 MiB header block");
    assert!(serves(&mut legit).await, "the other connection was not served after the flood");
    assert!(blue.seen().iter().all(|s| s.path != "/flood"), "the flooding request reached the origin");
}

/// An HPACK bomb (the CVE-2016-1544 pattern): a 4,000-byte field put in the
/// dynamic table, then referenced by one-byte indexes. 20 references (80 KB
/// decoded, over `max_header_bytes`) get 431 on that stream alone; 10,000
/// (40 MB) get GOAWAY(ENHANCE_YOUR_CALM). Neither reaches the origin, and
/// another connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bomb_is_refused() {
    use tokio::io::AsyncWriteExt;
    let (blue, p, mut legit) = shop().await;
    let bomb = |refs: usize| {
        let big = field(0x40, b"x-bomb", &[b'a'; 4000]); // 4,038 bytes of the 4,096-byte table
        [request_block("shop.test", "GET", b"/bomb", &[]), big, vec![0x80 | 62; refs]].concat()
    };
    let (mut frames, mut w) = raw_h2(p.addr).await;
    w.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &bomb(20))).await.unwrap();
    let answer = frames.until(|f| f.stream == 1).await.expect("closed without an answer");
    assert_eq!((answer.kind, answer.status()), (HEADERS, 431), "{answer:?}");
    // The connection (and its HPACK state) is still good for the next request.
    w.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 3, &request_block("shop.test", "GET", b"/", &[])))
        .await
        .unwrap();
    let answer = frames.until(|f| f.stream == 3 && f.kind != DATA).await.expect("closed without an answer");
    assert_eq!((answer.kind, answer.status()), (HEADERS, 200), "{answer:?}");
    w.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 5, &bomb(10_000))).await.unwrap();
    let goaway = frames.until(|f| f.kind == GOAWAY).await.expect("closed without GOAWAY");
    assert_eq!(goaway.code(), ENHANCE_YOUR_CALM, "{goaway:?}");
    frames.until_closed(|f| f.stream == 5).await;
    assert!(serves(&mut legit).await, "the other connection was not served after the bomb");
    assert!(blue.seen().iter().all(|s| s.path != "/bomb"), "a bomb reached the origin");
}

/// B-9: one stream whose upstream dies mid-body (half its `Content-Length`,
/// then a close) is reset alone (RST_STREAM, never an END_STREAM that would
/// make the short body look complete to a client that does not count), while
/// 10 streams in flight on the same h2 connection complete whole, and the
/// connection takes a new stream afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cut_mid_body_resets_only_its_stream() {
    use tokio::io::AsyncWriteExt;
    let blue = Origin::start("blue").await;
    // An origin for host `cut.test` that sends 10,000 of 20,000 declared bytes, then closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cut_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if support::next_request(&mut s, &mut buf).await.is_some() {
                    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 20000\r\n\r\n";
                    let _ = s.write_all(&[&head[..], &[b'x'; 10_000]].concat()).await;
                    // (Later, so that the head and the half body reach the client first.)
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])])
        + &format!("  - name: cut\n    hosts: [cut.test]\n    live: a\n    targets:\n      a: {{ endpoints: [\"{cut_addr}\"] }}\n");
    let p = Proxy::start(&sites).await;
    p.wait_healthy("shop", &["blue"]).await;
    let (mut frames, mut w) = raw_h2(p.addr).await;
    let req = |id: u32, authority: &str, path: &[u8]| {
        frame(HEADERS, END_STREAM | END_HEADERS, id, &request_block(authority, "GET", path, &[]))
    };
    let slow: Vec<u32> = (1..20).step_by(2).collect();
    w.write_all(&slow.iter().flat_map(|&id| req(id, "shop.test", b"/slow?ms=500")).collect::<Vec<u8>>()).await.unwrap();
    assert!(support::eventually(Duration::from_secs(5), || blue.count() == 10).await, "the slow streams never started");
    w.write_all(&req(21, "cut.test", b"/half")).await.unwrap();
    let ends = frames.ends(&[&slow[..], &[21]].concat()).await;
    for id in slow {
        assert_eq!(ends[&id], (200, "blue slow done".len(), true), "slow stream {id}");
    }
    let (_, bytes, clean) = ends[&21];
    assert!(!clean && bytes < 20_000, "the cut stream ended with END_STREAM after {bytes} bytes");
    w.write_all(&req(23, "shop.test", b"/")).await.unwrap();
    assert_eq!(frames.ends(&[23]).await[&23], (200, 4, true), "the connection took no new stream after the reset");
}

/// C-6 (d), h2 downgrade smuggling: requests an HTTP/1.1 upstream could read
/// differently (a `content-length` the DATA disagrees with, `transfer-encoding`,
/// CR, LF or NUL in a value or `:path`, an uppercase name, a second `:path`)
/// are each refused, by a stream reset, GOAWAY or 400. No smuggled request
/// reaches the origin and the upstream connections stay in step: canaries
/// afterwards reach it as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_that_could_desync_an_h1_upstream_are_refused() {
    use tokio::io::AsyncWriteExt;
    let (blue, p, mut legit) = shop().await;
    const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nhost: shop.test\r\n\r\n";
    let chunked = [&b"0\r\n\r\n"[..], SMUGGLED].concat();
    let long = [&b"hello"[..], SMUGGLED].concat();
    let crlf_path = [&b"/p HTTP/1.1\r\nhost: shop.test\r\n\r\n"[..], SMUGGLED].concat();
    let cases: Vec<(&[u8], Fields, &[u8])> = vec![
        (b"/cl-short", &[(b"content-length", b"5")], b"hel"),
        (b"/cl-long", &[(b"content-length", b"5")], &long),
        (b"/cl-zero", &[(b"content-length", b"0")], SMUGGLED),
        (b"/te", &[(b"transfer-encoding", b"chunked")], &chunked),
        (b"/te-cl", &[(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], &chunked),
        (b"/crlf", &[(b"x-a", b"b\r\ntransfer-encoding: chunked")], &chunked),
        (b"/lf", &[(b"x-a", b"b\ntransfer-encoding: chunked")], &chunked),
        (b"/cr", &[(b"x-a", b"b\rtransfer-encoding: chunked")], &chunked),
        (b"/nul", &[(b"x-a", b"b\0c")], b""),
        (b"/upper", &[(b"X-Upper", b"1")], b""),
        (b"/dup", &[(b":path", b"/smuggled")], b""),
        (&crlf_path, &[], b""),
    ];
    let post = |path: &[u8], extra: Fields, body: &[u8]| {
        let block = request_block("shop.test", "POST", path, extra);
        match body {
            b"" => frame(HEADERS, END_STREAM | END_HEADERS, 1, &block),
            _ => [frame(HEADERS, END_HEADERS, 1, &block), frame(DATA, END_STREAM, 1, body)].concat(),
        }
    };
    // The control: the same encoding, well-formed, is served.
    let (mut frames, mut w) = raw_h2(p.addr).await;
    w.write_all(&post(b"/echo", &[(b"content-length", b"5"), (b"x-a", b"b")], b"hello")).await.unwrap();
    assert_eq!(frames.ends(&[1]).await[&1], (200, 5, true));
    for (path, extra, body) in cases {
        let (mut frames, mut w) = raw_h2(p.addr).await;
        w.write_all(&post(path, extra, body)).await.unwrap();
        let case = String::from_utf8_lossy(path);
        let answer = frames.until(|f| f.kind == GOAWAY || (f.stream == 1 && f.kind != DATA)).await;
        match &answer {
            None => {}
            Some(f) if f.kind == GOAWAY || f.kind == RST_STREAM => {}
            Some(f) => assert_eq!((f.kind, f.status()), (HEADERS, 400), "{case:?} was answered"),
        }
    }
    // The excess DATA only after the request (all its declared body) has reached the origin.
    for (path, cl, first) in [("/split-cl0", "0", &b""[..]), ("/split-cl5", "5", b"hello")] {
        let (mut frames, mut w) = raw_h2(p.addr).await;
        let block = request_block("shop.test", "POST", path.as_bytes(), &[(b"content-length", cl.as_bytes())]);
        w.write_all(&[frame(HEADERS, END_HEADERS, 1, &block), frame(DATA, 0, 1, first)].concat()).await.unwrap();
        let arrived = || blue.seen().iter().any(|s| s.path == path && s.body_len == first.len());
        assert!(support::eventually(Duration::from_secs(5), arrived).await, "{path} never reached the origin");
        w.write_all(&frame(DATA, END_STREAM, 1, SMUGGLED)).await.unwrap();
        frames.ends(&[1]).await;
    }
    // Canaries on pooled upstream connections: each reaches the origin as sent.
    let canaries: Vec<_> = (0..5)
        .map(|i| {
            let mut s = legit.clone();
            tokio::spawn(
                async move { s.send_request(get("shop.test", &format!("/canary{i}"))).await.unwrap().status() },
            )
        })
        .collect();
    for c in canaries {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert!(serves(&mut legit).await);
    let seen = blue.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    for s in &seen {
        assert!(
            ["/", "/echo", "/cl-short", "/cl-long", "/cl-zero", "/split-cl0", "/split-cl5"].contains(&s.path.as_str())
                || s.path.starts_with("/canary"),
            "{paths:?}"
        );
        assert!(s.headers.get("transfer-encoding").is_none(), "{s:?}");
    }
    assert_eq!(paths.iter().filter(|p| p.starts_with("/canary")).count(), 5, "{paths:?}");
}

/// C-4 in bytes: an h2 request with only 4 extra fields, of 20 KiB each (80 KiB
/// in all, over the default `max_header_bytes` of 64 KiB, in HEADERS and
/// CONTINUATION frames), gets 431 on its stream alone and never reaches the
/// origin, while 2 such fields (40 KiB) are served; the same connection then
/// serves a normal request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_header_lists_over_max_header_bytes_get_431() {
    use tokio::io::AsyncWriteExt;
    let (blue, p, mut legit) = shop().await;
    let big = vec![b'a'; 20 * 1024];
    let names: [&[u8]; 4] = [b"x-big0", b"x-big1", b"x-big2", b"x-big3"];
    // A header block in frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE).
    let request = |id: u32, path: &[u8], fields: usize| {
        let extra: Vec<(&[u8], &[u8])> = names[..fields].iter().map(|n| (*n, &big[..])).collect();
        let block = request_block("shop.test", "GET", path, &extra);
        let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
        let last = chunks.len() - 1;
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let (kind, flags) = if i == 0 { (HEADERS, END_STREAM) } else { (CONTINUATION, 0) };
            out.extend(frame(kind, if i == last { flags | END_HEADERS } else { flags }, id, chunk));
        }
        out
    };
    let (mut frames, mut w) = raw_h2(p.addr).await;
    w.write_all(&request(1, b"/big40", 2)).await.unwrap();
    assert_eq!(frames.ends(&[1]).await[&1].0, 200, "a 40 KiB header list was refused");
    w.write_all(&request(3, b"/big80", 4)).await.unwrap();
    let answer = frames.until(|f| f.stream == 3 || f.kind == GOAWAY).await.expect("closed without an answer");
    assert_eq!((answer.kind, answer.status()), (HEADERS, 431), "{answer:?}");
    w.write_all(&request(5, b"/after", 0)).await.unwrap();
    assert_eq!(frames.ends(&[5]).await[&5], (200, 4, true), "the connection took no new stream after the 431");
    assert!(serves(&mut legit).await);
    let paths: Vec<String> = blue.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/", "/big40", "/after", "/"], "the 80 KiB header list reached the origin");
}

/// C-9 over HTTP/2: `CONNECT` (`:method` and `:authority` only) to a listening
/// address or to the site's host gets 405 or a stream reset, and an extended
/// CONNECT (`:protocol websocket`, RFC 8441, which cutover does not enable:
/// its SETTINGS carry no ENABLE_CONNECT_PROTOCOL) is refused too. Nothing
/// connects to the named address, nothing reaches the origin, and the
/// connection still serves a normal request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connect_and_extended_connect_are_refused() {
    use tokio::io::AsyncWriteExt;
    let (blue, p, mut legit) = shop().await;
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t = target.local_addr().unwrap().to_string();
    // The proxy's SETTINGS, read by hand: no SETTINGS_ENABLE_CONNECT_PROTOCOL (0x8) = 1.
    let (r, mut w) = tokio::net::TcpStream::connect(p.addr).await.unwrap().into_split();
    w.write_all(&[&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &frame(SETTINGS, 0, 0, &[])].concat()).await.unwrap();
    let mut frames = Frames::new(r);
    let settings = frames.until(|f| f.kind == SETTINGS && f.flags & 1 == 0).await.expect("no SETTINGS");
    assert!(!settings.payload.chunks(6).any(|s| s == [0, 8, 0, 0, 0, 1]), "extended CONNECT is enabled: {settings:?}");
    w.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();

    let connect =
        |authority: &str| [field(0, b":method", b"CONNECT"), field(0, b":authority", authority.as_bytes())].concat();
    let extended = [
        field(0, b":method", b"CONNECT"),
        field(0, b":protocol", b"websocket"),
        field(0, b":scheme", b"http"),
        field(0, b":path", b"/chat"),
        field(0, b":authority", b"shop.test"),
        field(0, b"sec-websocket-version", b"13"),
    ]
    .concat();
    drop((frames, w));
    let after = frame(HEADERS, END_STREAM | END_HEADERS, 3, &request_block("shop.test", "GET", b"/after", &[]));
    for (case, block) in [
        ("CONNECT to an address", connect(&t)),
        ("CONNECT to the site", connect("shop.test:80")),
        ("extended CONNECT", extended),
    ] {
        // A connection each: the answers' HPACK state stays simple to read.
        let (mut frames, mut w) = raw_h2(p.addr).await;
        w.write_all(&frame(HEADERS, END_HEADERS, 1, &block)).await.unwrap();
        let answer = frames.until(|f| f.stream == 1 || f.kind == GOAWAY).await.expect("closed without an answer");
        match answer.kind {
            RST_STREAM => {}
            HEADERS => assert_eq!(answer.status(), 405, "{case}: {answer:?}"),
            _ => panic!("{case}: {answer:?}"),
        }
        w.write_all(&after).await.unwrap();
        assert_eq!(frames.ends(&[3]).await[&3], (200, 4, true), "no new stream after the refused {case}");
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), target.accept()).await;
    assert!(accepted.is_err(), "CONNECT opened a tunnel");
    assert!(serves(&mut legit).await);
    let paths: Vec<String> = blue.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/", "/after", "/after", "/after", "/"], "a CONNECT was forwarded");
}

/// An HTTP/2 request whose `Host` field disagrees with its `:authority`
/// (which names the site) gets `400` and reaches no origin: a front proxy
/// routing by one and an origin by the other would disagree on its site.
/// An agreeing one, in any case, is served.
#[tokio::test]
async fn an_h2_host_that_disagrees_with_the_authority_is_refused() {
    let (blue, evil) = (Origin::start("blue").await, Origin::start("evil").await);
    let sites = [
        site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]),
        site("evil", "evil.test", "blue", &[("blue", vec![evil.addr])]),
    ]
    .concat();
    let p = Proxy::start(&sites).await;
    let mut sender = h2c(p.addr).await;
    let with_host = |host: &str| {
        let mut r = get("shop.test", "/");
        r.headers_mut().insert("host", host.parse().unwrap());
        r
    };
    for (host, status) in [("evil.test", 400), ("shop.test.evil.test", 400), ("shop.test", 200), ("SHOP.Test", 200)] {
        let resp = sender.send_request(with_host(host)).await.expect("h2 stream failed");
        assert_eq!(resp.status().as_u16(), status, "Host: {host}");
    }
    assert_eq!(evil.count(), 0, "a request reached the site its Host named: {:?}", evil.seen());
    assert_eq!(blue.count(), 2);
}
