//! Large response bodies relayed by cutover's own client and server. On Linux,
//! one of at least 64 KiB with a `Content-Length` goes from socket to socket
//! with `splice(2)`, never through user space: every byte must still arrive
//! in order, both connections stay reusable, and an upstream that ends
//! early, sends too much or stalls into a drain deadline is handled as for
//! any other body.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{site, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Byte `i` of every body: a pattern that shows a lost, repeated or moved byte.
fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| ((i % 251) ^ (i / 4096 % 256)) as u8).collect()
}

/// A raw origin. `/big/N`: `N` bytes with a `Content-Length`, written in
/// 64 KiB pieces; `/paused/N`: the same, 20 ms after the head (so that none
/// of the body comes with it: all `N` bytes are left to relay); `/chunked/N`: `N`
/// bytes chunked (copied, never spliced); `/short/N`: says `N`, sends half, closes; `/extra/N`: `N`
/// bytes and some more in the same write; `/stall/N`: says `N`, sends an
/// eighth, then waits. Records `(connection number, path)` of each request,
/// and the connections open.
struct RawOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(usize, String)>>>,
    open: Arc<Mutex<HashSet<usize>>>,
}

impl RawOrigin {
    async fn start() -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(Mutex::new(HashSet::new()));
        let (log, opened) = (seen.clone(), open.clone());
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (log, opened) = (log.clone(), opened.clone());
                opened.lock().unwrap().insert(n);
                tokio::spawn(async move {
                    serve(stream, n, log).await;
                    opened.lock().unwrap().remove(&n);
                });
            }
        });
        RawOrigin { addr, seen, open }
    }

    /// The connection that carried the last request for `path`.
    fn conn_of(&self, path: &str) -> usize {
        self.seen.lock().unwrap().iter().rev().find(|(_, p)| p == path).expect("never requested").0
    }

    /// Connections that carried requests other than health probes.
    fn connections(&self) -> usize {
        let mut ids: Vec<usize> =
            self.seen.lock().unwrap().iter().filter(|(_, p)| p != "/up").map(|(n, _)| *n).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }
}

async fn serve(mut stream: TcpStream, n: usize, seen: Arc<Mutex<Vec<(usize, String)>>>) {
    let mut buf = Vec::new();
    while let Some((method, path)) = support::next_request(&mut stream, &mut buf).await {
        seen.lock().unwrap().push((n, path.clone()));
        if path == "/up" {
            if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                return;
            }
            continue;
        }
        let (kind, len) = path[1..].split_once('/').expect("/kind/length");
        let len: usize = len.parse().unwrap();
        let head = match kind {
            "chunked" => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_string(),
            _ => format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n"),
        };
        if stream.write_all(head.as_bytes()).await.is_err() || method == "HEAD" {
            continue;
        }
        let body = pattern(0, len);
        if kind == "paused" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match kind {
            "big" | "paused" => {
                for piece in body.chunks(64 * 1024) {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                }
            }
            "chunked" => {
                for piece in body.chunks(64 * 1024) {
                    let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                if stream.write_all(b"0\r\n\r\n").await.is_err() {
                    return;
                }
            }
            "short" => {
                let _ = stream.write_all(&body[..len / 2]).await;
                return;
            }
            "extra" => {
                let mut all = body;
                all.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nforged");
                if stream.write_all(&all).await.is_err() {
                    return;
                }
            }
            "stall" => {
                let _ = stream.write_all(&body[..len / 8]).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            _ => panic!("unscripted path {path}"),
        }
    }
}

async fn proxy_for(origin: &RawOrigin) -> Proxy {
    let p = Proxy::start(&site("big", "big.test", "blue", &[("blue", vec![origin.addr])])).await;
    p.wait_healthy("big", &["blue"]).await;
    p
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// One request on a kept-alive connection: status, `Content-Length` and body, or the transport error.
async fn fetch(
    client: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    method: &str,
    path: &str,
) -> Result<(u16, Option<String>, Bytes), hyper::Error> {
    client.ready().await?;
    let req = Request::builder().method(method).uri(path).header("host", "big.test").body(Empty::new()).unwrap();
    let resp = client.send_request(req).await?;
    let status = resp.status().as_u16();
    let length = resp.headers().get("content-length").map(|v| v.to_str().unwrap().to_string());
    Ok((status, length, resp.into_body().collect().await?.to_bytes()))
}

/// Bodies of every size around the splice threshold arrive whole and in order
/// on one kept-alive client connection, which one upstream connection serves
/// throughout; `HEAD` gets the length and no body.
#[tokio::test]
async fn large_bodies_arrive_whole_on_reused_connections() {
    let origin = RawOrigin::start().await;
    let p = proxy_for(&origin).await;
    let mut client = connect(p.addr).await;
    let paths = [1 << 20, 5_000_003, 70_000, 1_000, 3 << 20].map(|len| (len, format!("/big/{len}")));
    // Exactly at the threshold (spliced) and one byte under (copied).
    let at_threshold = [65_536, 65_535].map(|len| (len, format!("/paused/{len}")));
    for (len, path) in paths.iter().chain(&at_threshold) {
        let (status, length, body) = fetch(&mut client, "GET", path).await.unwrap();
        assert_eq!((status, length), (200, Some(len.to_string())));
        assert!(body == pattern(0, *len), "{path} came back altered ({} bytes)", body.len());
    }
    let (status, length, body) = fetch(&mut client, "HEAD", "/big/1048576").await.unwrap();
    assert_eq!((status, length.as_deref(), body.len()), (200, Some("1048576"), 0));
    assert_eq!(origin.connections(), 1, "the upstream connection went back to the pool after each body");
}

/// Many clients at once, each fetching large bodies over one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_bodies_do_not_mix() {
    let origin = RawOrigin::start().await;
    let p = proxy_for(&origin).await;
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let addr = p.addr;
            tokio::spawn(async move {
                let mut client = connect(addr).await;
                for round in 0..3 {
                    let len = (1 << 20) + i * 4099 + round;
                    let (status, _, body) = fetch(&mut client, "GET", &format!("/big/{len}")).await.unwrap();
                    assert_eq!(status, 200);
                    assert!(body == pattern(0, len), "client {i} round {round}: body altered ({} bytes)", body.len());
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
}

/// A client that reads slowly through a small receive buffer makes cutover
/// wait on its socket many times; it still gets every byte, and its
/// connection carries the next request.
#[tokio::test]
async fn slow_reader_gets_every_byte() {
    let origin = RawOrigin::start().await;
    let p = proxy_for(&origin).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut s = socket.connect(p.addr).await.unwrap();
    let len = 4 << 20;
    for _ in 0..2 {
        s.write_all(format!("GET /big/{len} HTTP/1.1\r\nhost: big.test\r\n\r\n").as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut piece = vec![0u8; 16 * 1024];
        let body_at = loop {
            let n = s.read(&mut piece).await.unwrap();
            assert!(n > 0, "the connection closed early");
            got.extend_from_slice(&piece[..n]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&got[..body_at]).to_lowercase();
        assert!(head.starts_with("http/1.1 200 ok\r\n") && head.contains(&format!("content-length: {len}\r\n")));
        let mut reads = 0;
        while got.len() < body_at + len {
            let n = s.read(&mut piece).await.unwrap();
            assert!(n > 0, "the connection closed after {} body bytes", got.len() - body_at);
            got.extend_from_slice(&piece[..n]);
            reads += 1;
            if reads % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        assert!(got[body_at..] == pattern(0, len), "the body came back altered");
    }
}

/// An upstream that closes half-way through its length: the client's
/// connection breaks (it cannot take the answer for complete), the upstream
/// connection is not reused, and the next request is served.
#[tokio::test]
async fn upstream_that_ends_early_breaks_the_client_connection() {
    let origin = RawOrigin::start().await;
    let p = proxy_for(&origin).await;
    let mut client = connect(p.addr).await;
    assert!(fetch(&mut client, "GET", "/short/1048576").await.is_err(), "an incomplete body must not look complete");
    let mut client = connect(p.addr).await;
    let (status, _, body) = fetch(&mut client, "GET", "/big/200000").await.unwrap();
    assert!(status == 200 && body == pattern(0, 200_000));
    assert_eq!(origin.connections(), 2);
}

/// A client that goes away in the middle of a large body: the upstream
/// connection is not reused (the rest of its body is unread), the request
/// leaves the in-flight count, and the next client is served.
#[tokio::test]
async fn client_that_leaves_mid_body_frees_everything() {
    let origin = RawOrigin::start().await;
    let p = proxy_for(&origin).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /big/16777216 HTTP/1.1\r\nhost: big.test\r\n\r\n").await.unwrap();
    let mut piece = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 512 * 1024 {
        let n = s.read(&mut piece).await.unwrap();
        assert!(n > 0, "closed early");
        got += n;
    }
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, site) = p.api("GET", "/v1/sites/big", None).await;
        if site["targets"]["blue"]["inflight"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the abandoned request stayed in flight: {site}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = connect(p.addr).await;
    let (status, _, body) = fetch(&mut client, "GET", "/big/300000").await.unwrap();
    assert!(status == 200 && body == pattern(0, 300_000));
    assert_eq!(origin.connections(), 2, "the half-read upstream connection was not reused");
}

/// A client that stops reading its response is cut once it has read nothing
/// for `idle_timeout` (nginx's `send_timeout`), whether the body is spliced
/// (`Content-Length`) or copied (chunked), by cutover's own server or by
/// hyper's: the request leaves the in-flight count, its upstream connection
/// is closed (the origin sees it end), and the next request gets a true answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_cut_at_idle_timeout() {
    let origin = RawOrigin::start().await;
    let opts = support::Options { extra: "limits: { idle_timeout: 1s }".into(), ..Default::default() };
    let p = Proxy::start_with(&site("big", "big.test", "blue", &[("blue", vec![origin.addr])]), opts).await;
    p.wait_healthy("big", &["blue"]).await;
    // Far more than the sockets and the pipe hold between the origin and the client.
    let len = 24 << 20;
    // GET: cutover's own server; POST (with a body, even empty): hyper's.
    for (method, kind) in [("GET", "big"), ("GET", "chunked"), ("POST", "big")] {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut s = socket.connect(p.addr).await.unwrap();
        let length = if method == "POST" { "content-length: 0\r\n" } else { "" };
        let head = format!("{method} /{kind}/{len} HTTP/1.1\r\nhost: big.test\r\n{length}\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // Read nothing, well past idle_timeout (the origin makes the body first):
        // the request is in flight, then no longer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let mut seen_in_flight = false;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (_, site) = p.api("GET", "/v1/sites/big", None).await;
            let inflight = site["targets"]["blue"]["inflight"].as_u64();
            seen_in_flight |= inflight == Some(1);
            if seen_in_flight && inflight == Some(0) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{method} {kind}: still in flight (or never): {site}");
        }
        // What the kernel still held arrives, then the end: never the whole body.
        let mut piece = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut piece)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got += n,
                Err(_) => panic!("{method} {kind}: the connection is still open after {got} bytes"),
            }
        }
        assert!(got < len, "{method} {kind}: the whole body arrived");
        // Its upstream connection is closed, not left open in the middle of
        // its body (where no other request could ever use it).
        let conn = origin.conn_of(&format!("/{kind}/{len}"));
        let closed = support::eventually(Duration::from_secs(5), || !origin.open.lock().unwrap().contains(&conn)).await;
        assert!(closed, "{method} {kind}: the upstream connection is still open");
        // The next request gets a true answer, on a new connection or one whose body ended.
        let (status, _, body) = fetch(&mut connect(p.addr).await, method, "/big/100000").await.unwrap();
        assert_eq!((status, body == pattern(0, 100_000)), (200, true), "{method} {kind}: the next answer");
    }
}

/// An upstream that writes more than its length: the client gets exactly the
/// length, never the extra bytes, and the next request gets a true answer.
#[tokio::test]
async fn bytes_past_the_length_never_reach_the_client() {
    let origin = RawOrigin::start().await;
    let p = proxy_for(&origin).await;
    let mut client = connect(p.addr).await;
    let (status, _, body) = fetch(&mut client, "GET", "/extra/300000").await.unwrap();
    assert!(status == 200 && body == pattern(0, 300_000));
    let (status, length, body) = fetch(&mut client, "GET", "/big/100000").await.unwrap();
    assert_eq!((status, length.as_deref()), (200, Some("100000")));
    assert!(body == pattern(0, 100_000), "the upstream's extra bytes were taken for an answer");
    assert_eq!(origin.connections(), 2, "the connection with bytes left over was not reused");
}

/// A large body whose upstream stalls is cut at its target's drain deadline
/// after a switch, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_body_is_cut_at_the_drain_deadline() {
    let (blue, green) = (RawOrigin::start().await, RawOrigin::start().await);
    let mut sites = site("big", "big.test", "blue", &[("blue", vec![blue.addr]), ("green", vec![green.addr])]);
    sites.push_str("    switch: { drain_timeout: 300ms, close_spread: 50ms }\n");
    let p = Proxy::start(&sites).await;
    p.wait_healthy("big", &["blue", "green"]).await;
    let mut client = connect(p.addr).await;
    client.ready().await.unwrap();
    let req = Request::get("/stall/4194304").header("host", "big.test").body(Empty::new()).unwrap();
    let mut body = client.send_request(req).await.unwrap().into_body();
    assert!(body.frame().await.unwrap().is_ok(), "the first bytes arrive");
    p.switch("big", "green").await;
    let outcome =
        support::cut_or_completed(&mut body, Duration::from_secs(5)).await.expect("the stalled body was never cut");
    assert_eq!(outcome, "cut");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(
        metrics.contains(r#"cutover_drain_forced_closes_total{kind="stream",site="big",target="blue"} 1"#),
        "{metrics}"
    );
}
