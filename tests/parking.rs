//! Parked idle HTTP/1.1 connections: soon after going quiet (no request
//! open and no byte moving), cutover drops the connection's server state
//! (cutover's own, or hyper's with its two 8 KiB buffers) and keeps only the
//! socket; the next request gets a fresh server on the same socket. These tests check that nothing a
//! client can observe changes, except that an idle connection now lives until
//! `idle_timeout` instead of being cut by hyper at `header_read_timeout`.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{site, Options, Origin, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Far longer than the park delay (20 ms) plus one check interval, and than
/// the `header_read_timeout` of these tests.
const PARKED: Duration = Duration::from_millis(2600);

async fn one_site(extra: &str, origin: SocketAddr) -> Proxy {
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![origin])]);
    Proxy::start_with(&sites, Options { extra: extra.into(), ..Default::default() }).await
}

const GET: &[u8] = b"GET /page HTTP/1.1\r\nHost: shop.test\r\n\r\n";

/// An origin, a proxy with `extra` config in front of it, and a client
/// connection that has been served one `GET` and is now idle.
async fn served_once(extra: &str) -> (Origin, Proxy, Conn) {
    let blue = Origin::start("blue").await;
    let p = one_site(extra, blue.addr).await;
    let mut s = Conn::open(p.addr).await;
    s.send(GET).await;
    let (head, _) = s.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (blue, p, s)
}

/// A raw client connection with what it read past the last response.
struct Conn {
    s: TcpStream,
    pending: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn { s: TcpStream::connect(addr).await.unwrap(), pending: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads one response with a `Content-Length` body; returns head and body.
    async fn response(&mut self) -> (String, Vec<u8>) {
        let mut buf = vec![0u8; 64 * 1024];
        let (s, out) = (&mut self.s, &mut self.pending);
        let read = async {
            loop {
                if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&out[..end]).to_string();
                    let len: usize = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().to_string()))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if out.len() >= end + 4 + len {
                        let body = out[end + 4..end + 4 + len].to_vec();
                        out.drain(..end + 4 + len);
                        return (head, body);
                    }
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => panic!("connection closed; got {:?}", String::from_utf8_lossy(out)),
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        timeout(Duration::from_secs(10), read).await.expect("no complete response within 10 s")
    }

    /// Waits for the proxy to close the connection; `None` if still open after `limit`.
    async fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        match timeout(limit, self.s.read(&mut buf)).await {
            Err(_) => None,
            Ok(Ok(0)) | Ok(Err(_)) => Some(start.elapsed()),
            Ok(Ok(_)) => panic!("unexpected bytes on an idle connection"),
        }
    }
}

/// A connection idle past `header_read_timeout` (which hyper alone would have
/// closed) is parked instead, and serves again, several times over.
#[tokio::test]
async fn parked_connection_serves_again() {
    let blue = Origin::start("blue").await;
    let p = one_site("limits: { header_read_timeout: 2s, idle_timeout: 60s }", blue.addr).await;
    let mut s = Conn::open(p.addr).await;
    for round in 0..3 {
        s.send(GET).await;
        let (head, body) = s.response().await;
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        assert_eq!(body, b"blue", "round {round}");
        // Longer than header_read_timeout: hyper's keep-alive timer would cut it.
        tokio::time::sleep(PARKED + Duration::from_millis(500)).await;
    }
    s.send(GET).await;
    let (head, _) = s.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(blue.count(), 4);
}

/// HTTP/2 with prior knowledge starts a connection: a parked HTTP/1.1
/// connection that wakes with the HTTP/2 preface is answered in HTTP/1.1
/// (or closed), never switched to HTTP/2.
#[tokio::test]
async fn a_parked_connection_does_not_switch_to_http2() {
    let (_blue, _p, mut s) = served_once("").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
    let mut got = std::mem::take(&mut s.pending);
    let mut buf = [0u8; 1024];
    while let Ok(Ok(n @ 1..)) = timeout(Duration::from_secs(2), s.s.read(&mut buf)).await {
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(&got));
}

/// Two pipelined requests sent to a parked connection in one write are both answered, in order.
#[tokio::test]
async fn pipelined_requests_wake_a_parked_connection() {
    let (blue, _p, mut s) = served_once("").await;
    tokio::time::sleep(PARKED).await;
    s.send(b"GET /one HTTP/1.1\r\nHost: shop.test\r\n\r\nGET /two HTTP/1.1\r\nHost: shop.test\r\n\r\n").await;
    for _ in 0..2 {
        let (head, body) = s.response().await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"blue");
    }
    let paths: Vec<String> = blue.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/page", "/one", "/two"]);
}

/// A client that stops in the middle of a request head for longer than the
/// park delay is not cut: its half-read head is never thrown away.
#[tokio::test]
async fn half_sent_request_head_survives_the_park_delay() {
    let (blue, _p, mut s) = served_once("limits: { header_read_timeout: 10s }").await;
    s.send(b"GET /half HTTP/1.1\r\nHo").await;
    tokio::time::sleep(PARKED).await;
    s.send(b"st: shop.test\r\n\r\n").await;
    let (head, body) = s.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"blue");
    assert!(blue.seen().iter().any(|r| r.path == "/half"));
}

/// A request followed in the same write by the start of a second head, the
/// rest of which comes after the park delay: the waiting bytes keep the
/// connection from being parked, and the second request is answered.
#[tokio::test]
async fn pipelined_half_head_survives_the_park_delay() {
    let (blue, _p, mut s) = served_once("limits: { header_read_timeout: 10s }").await;
    s.send(b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\nGET /second HTTP/1.1\r\nHo").await;
    let (head, _) = s.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tokio::time::sleep(PARKED).await;
    s.send(b"st: shop.test\r\n\r\n").await;
    let (head, body) = s.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"blue");
    let paths: Vec<String> = blue.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/page", "/first", "/second"]);
}

/// A parked connection is still closed at `idle_timeout`, counted from its last
/// activity, and is no longer counted in `cutover_client_connections` after.
#[tokio::test]
async fn parked_connection_is_closed_at_idle_timeout() {
    let (_blue, p, mut s) = served_once("limits: { idle_timeout: 3s }").await;
    let idle = Instant::now();
    let closed = s.closed_within(Duration::from_secs(8)).await;
    assert!(closed.is_some(), "parked connection still open 8 s after its last request");
    assert!(idle.elapsed() >= Duration::from_millis(2800), "closed too early: {:?}", idle.elapsed());
    // The gauge drops when the connection's task ends, just after the close.
    let mut open = Vec::new();
    for _ in 0..20 {
        let (_, metrics) = support::admin_raw(p.admin, "GET", "/metrics", "", None).await;
        let text = metrics.as_str().unwrap_or_default().to_string();
        open = text.lines().filter(|l| l.starts_with("cutover_client_connections{")).map(String::from).collect();
        if !open.is_empty() && open.iter().all(|l| l.ends_with(" 0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!open.is_empty() && open.iter().all(|l| l.ends_with(" 0")), "{open:?}");
}

/// A response the client does not read for a while is never parked away: the
/// client gets every byte once it reads again, and the connection still works.
/// Several sizes at once, on connections with a small receive buffer, so that
/// for some of them the proxy has read the whole response from the origin
/// while part of it still waits in its own write buffer.
#[tokio::test]
async fn slow_reader_gets_the_whole_response() {
    let sizes = [64 << 10, 512 << 10, 2 << 20, 8 << 20, 32 << 20];
    let mut checks = Vec::new();
    for len in sizes {
        let origin = big_origin(len).await;
        let p = one_site("", origin).await;
        checks.push(tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut s = Conn { s: socket.connect(p.addr).await.unwrap(), pending: Vec::new() };
            s.send(GET).await;
            // Let the proxy fill the socket buffers and block, past the park delay.
            tokio::time::sleep(PARKED).await;
            for round in 0..2 {
                let (head, body) = s.response().await;
                assert!(head.starts_with("HTTP/1.1 200"), "{len} B, round {round}: {head}");
                assert_eq!(body.len(), len, "{len} B, round {round}");
                assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "{len} B: body corrupted");
                if round == 0 {
                    s.send(GET).await;
                }
            }
            drop(p);
        }));
    }
    for c in checks {
        c.await.unwrap();
    }
}

/// On shutdown a parked connection is closed at once, not kept until the drain deadline.
#[tokio::test]
async fn shutdown_closes_parked_connections() {
    let (_blue, p, mut s) = served_once("limits: { idle_timeout: 60s }").await;
    tokio::time::sleep(PARKED).await;
    let stopping = tokio::spawn(p.stop());
    // The proxy's drain deadline is 5 s; a parked connection must not hold it up.
    let closed = s.closed_within(Duration::from_secs(4)).await;
    assert!(closed.is_some(), "parked connection still open 4 s after shutdown began");
    stopping.await.unwrap();
}

/// C-1 at scale: 200 slowloris connections, each sending one byte of a
/// request head every 100 ms (so never idle past the 20 ms park delay for
/// long, and never inactive for `header_read_timeout`), while a legit client
/// makes sequential requests on fresh connections. Every slowloris connection
/// is closed between ~`header_read_timeout` (1 s) and 5 s after its connect
/// (total time, not inactivity), none of their requests reaches the origin,
/// and every legit request gets 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_crowd_is_cut_while_legit_requests_are_served() {
    let blue = Origin::start("blue").await;
    let p = one_site("limits: { header_read_timeout: 1s }", blue.addr).await;
    p.wait_healthy("shop", &["blue"]).await;
    let addr = p.addr;
    let slow: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let start = Instant::now();
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /slowloris HTTP/1.1\r\nHost: shop.test\r\nX-Drip: ").await.unwrap();
                let mut buf = [0u8; 1024];
                // Drip until the proxy closes (EOF, or an error on either side); give up at 10 s.
                while start.elapsed() < Duration::from_secs(10) {
                    match timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                        Ok(Ok(_)) => {} // an error answer (408) before the close
                        Err(_) if s.write_all(b"a").await.is_err() => return Some(start.elapsed()),
                        Err(_) => {}
                    }
                }
                None
            })
        })
        .collect();
    let (mut served, mut failed) = (0, Vec::new());
    while slow.iter().any(|t| !t.is_finished()) {
        let answer = timeout(Duration::from_secs(5), async {
            let mut c = support::Client::connect(addr).await;
            c.get("shop.test", "/legit").await
        })
        .await;
        match answer {
            Ok(Ok(a)) if a.status == 200 && a.body == "blue" => served += 1,
            other => failed.push(format!("{other:?}")),
        }
    }
    assert!(failed.is_empty(), "{} of {} legit requests failed: {failed:?}", failed.len(), served + failed.len());
    assert!(served >= 10, "only {served} legit requests were made");
    for (i, t) in slow.into_iter().enumerate() {
        let cut = t.await.unwrap().unwrap_or_else(|| panic!("slowloris connection {i} was still open after 10 s"));
        assert!(cut >= Duration::from_millis(900) && cut < Duration::from_secs(5), "connection {i} cut after {cut:?}");
    }
    assert!(blue.seen().iter().all(|s| s.path == "/legit"), "a slowloris request reached the origin");
}

/// An origin answering every request on a connection with `len` bytes
/// (byte i is `i % 251`), with `Content-Length`.
async fn big_origin(len: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                        if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&body).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    addr
}
