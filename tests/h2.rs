//! HTTP/2: h2c with prior knowledge from clients, `protocol: h2` to
//! upstreams, trailers passed through.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
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
