//! Hostile clients (SPEC §3 "Bad input" and "Headers"; reliability.md §2.2 and
//! §6 group C). Every case talks raw bytes to a real proxy in front of a
//! recording origin and checks two things: what the client got, and what the
//! origin did *not* receive. Requests that could be read two ways are followed
//! by a pipelined canary on the same connection, which must never be answered
//! nor reach the origin. Every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{site, Client, Options, Origin, Proxy, Seen};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

async fn one_site(extra: &str) -> (Proxy, Origin) {
    let blue = Origin::start("blue").await;
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]);
    let p = Proxy::start_with(&sites, Options { extra: extra.into(), ..Default::default() }).await;
    (p, blue)
}

/// What came back on one raw connection.
struct Raw {
    text: String,
    /// The proxy closed the connection (EOF or reset) before the time limit.
    closed: bool,
}

impl Raw {
    /// The status of the first response, 0 if none.
    fn status(&self) -> u16 {
        self.text.strip_prefix("HTTP/1.1 ").and_then(|s| s.get(..3)).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// How many responses came back.
    fn responses(&self) -> usize {
        self.text.matches("HTTP/1.1 ").count()
    }
}

/// Sends `req` on a fresh connection and reads until the proxy closes it or `limit` passes.
async fn raw_for(addr: SocketAddr, req: &[u8], limit: Duration) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The proxy may answer and close before it read all of a hostile request:
    // a failed write is not a failure of the test.
    let _ = s.write_all(req).await;
    read_until_close(&mut s, limit).await
}

async fn raw(addr: SocketAddr, req: &[u8]) -> Raw {
    raw_for(addr, req, Duration::from_secs(2)).await
}

async fn read_until_close(s: &mut TcpStream, limit: Duration) -> Raw {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    Raw { text: String::from_utf8_lossy(&out).into(), closed }
}

/// Reads exactly one response (head + `Content-Length` body) from a kept-alive connection.
async fn read_one_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if first_response(&out).is_some() {
                return;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    timeout(Duration::from_secs(3), read).await.expect("no complete response within 3 s");
    String::from_utf8_lossy(&out).into()
}

/// Lets anything the proxy might still forward arrive before counting.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn paths(origin: &Origin) -> Vec<String> {
    origin.seen().iter().map(|s| s.path.clone()).collect()
}

fn header<'a>(seen: &'a Seen, name: &str) -> Vec<&'a [u8]> {
    seen.headers.get_all(name).iter().map(|v| v.as_bytes()).collect()
}

const CANARY: &[u8] = b"GET /canary HTTP/1.1\r\nHost: shop.test\r\n\r\n";

/// Sends `req` followed by a pipelined canary and asserts: one `status`
/// answer, the connection closed, and the canary never answered.
async fn refused_with_canary(addr: SocketAddr, req: &[u8], status: u16) {
    let r = raw(addr, &[req, CANARY].concat()).await;
    let shown = String::from_utf8_lossy(&req[..req.len().min(200)]);
    assert_eq!(r.status(), status, "{shown:?} → {:?}", r.text);
    assert_eq!(r.responses(), 1, "the canary was answered after {shown:?}: {:?}", r.text);
    assert!(r.closed, "connection left open after {shown:?}");
}

/// 1. `Transfer-Encoding: chunked, chunked` (hyper alone accepts it) is
/// refused with 400, the connection closes, and neither it nor the pipelined
/// canary reaches the origin.
#[tokio::test]
async fn te_chunked_chunked_is_refused_and_closes() {
    let (p, blue) = one_site("").await;
    let req = b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n";
    refused_with_canary(p.addr, req, 400).await;
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
}

/// 2. Every `Transfer-Encoding` other than one single `chunked` field —
/// `gzip, chunked`, `identity`, two TE lines (in either order, even both
/// `chunked`), a leading comma, `xchunked` — gets 400 and is never forwarded.
#[tokio::test]
async fn other_transfer_encodings_are_refused() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 7] = [
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ];
    for req in cases {
        refused_with_canary(p.addr, req, 400).await;
    }
    // HTTP/1.0 has no chunked coding at all.
    let r = raw(p.addr, b"POST / HTTP/1.0\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
    assert!(r.text.starts_with("HTTP/1.1 400") || r.text.starts_with("HTTP/1.0 400"), "{:?}", r.text);
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
}

/// 3. `Content-Length` that disagrees with itself — two lines, a comma list,
/// or not plain digits (`+4`, `-4`, `0x4`, empty, 2^64) — gets 400 and is never forwarded.
#[tokio::test]
async fn conflicting_or_malformed_content_length_is_refused() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 9] = [
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4, 5\r\n\r\nabcde",
        // Equal, but twice: refused as nginx refuses it, and as the list `5, 5` is.
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5, 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: +4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: -4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 0x4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: \r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 18446744073709551616\r\n\r\nabcd",
    ];
    for req in cases {
        refused_with_canary(p.addr, req, 400).await;
    }
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
}

/// 4. `Content-Length` together with `Transfer-Encoding: chunked` (both
/// orders) gets 400 and the connection closes; nothing reaches the origin.
/// The same holds behind a small `POST` whose body came with its head
/// (cutover's own server read both), and behind a chunked request in the
/// same packets (read by hyper's server, which is given one request at a
/// time). The canary is never answered.
#[tokio::test]
async fn te_and_content_length_is_refused_and_closes() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 2] = [
        b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    for req in cases {
        refused_with_canary(p.addr, req, 400).await;
    }
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));

    let small = b"POST /small HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n\r\nok";
    for req in cases {
        let r = raw(p.addr, &[&small[..], req, CANARY].concat()).await;
        assert!(r.text.starts_with("HTTP/1.1 200"), "{:?}", r.text);
        let second = r.text.match_indices("HTTP/1.1 ").nth(1).map(|(i, _)| &r.text[i..]).unwrap_or_default();
        assert!(second.starts_with("HTTP/1.1 400"), "{:?}", r.text);
        assert_eq!(r.responses(), 2, "the canary was answered: {:?}", r.text);
        assert!(r.closed, "client connection kept alive after TE+CL");
    }
    settle().await;
    assert_eq!(paths(&blue), ["/small", "/small"], "forwarded after the small POST");

    let first = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
    for req in cases {
        let r = raw(p.addr, &[&first[..], req, CANARY].concat()).await;
        assert!(r.text.starts_with("HTTP/1.1 200"), "{:?}", r.text);
        let second = r.text.match_indices("HTTP/1.1 ").nth(1).map(|(i, _)| &r.text[i..]).unwrap_or_default();
        assert!(second.starts_with("HTTP/1.1 400"), "{:?}", r.text);
        assert_eq!(r.responses(), 2, "the canary was answered: {:?}", r.text);
        assert!(r.closed, "client connection kept alive after TE+CL");
    }
    settle().await;
    // Only the chunked requests before them came through.
    let seen = blue.seen();
    assert_eq!(seen.len(), 4, "{:?}", paths(&blue));
    assert!(seen[2..].iter().all(|s| s.path == "/echo" && s.body_len == 2), "{:?}", paths(&blue));
}

/// 4a. Header syntax a lenient reader could take for framing — whitespace
/// before the colon, a folded or control-character `Transfer-Encoding`, a
/// non-token or empty field name, a first field line that starts with
/// whitespace, a request line with a doubled space — gets `400`, closes the
/// connection and reaches nothing, canary included.
#[tokio::test]
async fn odd_header_syntax_is_refused_and_forwards_nothing() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 10] = [
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length : 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\x0c\r\n\r\n0\r\n\r\n",
        // A dotless i (U+0131) in the name: not a token.
        "POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encod\u{131}ng: chunked\r\n\r\n0\r\n\r\n".as_bytes(),
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nX\x80: 1\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\n: chunked\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: shop.test\r\n\r\n0\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: shop.test\r\n\r\n",
    ];
    for req in cases {
        refused_with_canary(p.addr, req, 400).await;
    }
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
}

/// 4a'. Chunk syntax an upstream or a front proxy could read differently — a
/// signed, `0x`-prefixed or empty size, a bare LF after the size or after the
/// data, a bare CR in an extension, more data than the size — ends the
/// request: an error answer or none, the connection closed, and the
/// pipelined canary neither answered nor forwarded.
#[tokio::test]
async fn odd_chunk_syntax_ends_the_connection() {
    let (p, blue) = one_site("").await;
    let head = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    let bodies: [&[u8]; 7] = [
        b"-0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5;a\rb\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX\r\n0\r\n\r\n",
    ];
    for body in bodies {
        let shown = String::from_utf8_lossy(body);
        let r = raw(p.addr, &[&head[..], body, CANARY].concat()).await;
        assert!(r.closed, "connection left open after {shown:?}: {:?}", r.text);
        assert!(r.responses() <= 1, "the canary was answered after {shown:?}: {:?}", r.text);
        assert!(!r.text.starts_with("HTTP/1.1 2"), "{shown:?} was accepted: {:?}", r.text);
    }
    settle().await;
    let seen = blue.seen();
    assert!(seen.iter().all(|s| s.path == "/echo"), "{:?}", paths(&blue));
    assert!(seen.iter().all(|s| s.body_len < 5), "a broken body reached the origin whole: {:?}", paths(&blue));
}

/// 4b. After a request hyper's server took (a body), the next request head
/// is judged as cutover's own server judges a first one: a request that
/// could be read two ways, sent after the answer, gets `400` and is never
/// forwarded.
#[tokio::test]
async fn a_request_read_two_ways_after_a_body_is_refused() {
    let (p, blue) = one_site("").await;
    let ambiguous = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /first HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    let first = read_one_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first:?}");
    s.write_all(&[&ambiguous[..], CANARY].concat()).await.unwrap();
    let r = read_until_close(&mut s, Duration::from_secs(2)).await;
    assert_eq!(r.status(), 400, "{:?}", r.text);
    assert_eq!(r.responses(), 1, "the canary was answered: {:?}", r.text);
    assert!(r.closed, "connection left open after a request read two ways");
    settle().await;
    assert_eq!(paths(&blue), ["/first"], "forwarded after the first request");
}

/// 4d. An `Upgrade` the upstream declines (it answers `200`, not `101`)
/// leaves the connection HTTP/1.1, and the next request heads are judged as
/// any others: one that could be read two ways gets `400` and is never
/// forwarded, and an ordinary one is answered, also after the connection
/// idled past the park delay.
#[tokio::test]
async fn requests_after_a_declined_upgrade_are_judged() {
    let (p, blue) = one_site("").await;
    let upgrade: &[u8] = b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let refused: [&[u8]; 3] = [
        b"POST /clte HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /tecl HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        b"POST /dupcl HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    ];
    for req in refused {
        let r = raw(p.addr, &[upgrade, req, CANARY].concat()).await;
        assert!(r.text.starts_with("HTTP/1.1 200"), "{:?}", r.text);
        let second = r.text.match_indices("HTTP/1.1 ").nth(1).map(|(i, _)| &r.text[i..]).unwrap_or_default();
        assert!(second.starts_with("HTTP/1.1 400"), "{:?}", r.text);
        assert_eq!(r.responses(), 2, "the canary was answered: {:?}", r.text);
        assert!(r.closed, "connection left open after a request read two ways");
    }
    settle().await;
    assert_eq!(paths(&blue), ["/ws", "/ws", "/ws"], "forwarded after the declined upgrade");
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(upgrade).await.unwrap();
    assert!(read_one_response(&mut s).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET /after HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
    let after = read_one_response(&mut s).await;
    assert!(after.starts_with("HTTP/1.1 200") && after.ends_with("blue"), "{after:?}");
    // Declined by cutover itself (no site for the host): the same.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: nowhere.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    assert!(read_one_response(&mut s).await.starts_with("HTTP/1.1 404"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET /after HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
    assert!(read_one_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // The client closes after a declined upgrade: cutover closes its side too.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(upgrade).await.unwrap();
    assert!(read_one_response(&mut s).await.starts_with("HTTP/1.1 200"));
    s.shutdown().await.unwrap();
    let r = read_until_close(&mut s, Duration::from_secs(2)).await;
    assert!(r.closed && r.text.is_empty(), "the connection was kept after the client closed: {:?}", r.text);
}

/// 4e. A line of a chunked body's trailer section that ends with a bare LF:
/// hyper would read on into the trailers, a pipelined request with them,
/// where a reader that takes LF for a line's end sees two requests. The
/// connection closes there, and the request behind is never forwarded.
#[tokio::test]
async fn a_bare_lf_in_a_chunked_trailer_section_closes_the_connection() {
    let (p, blue) = one_site("").await;
    let head: &[u8] = b"POST /x HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n";
    let tails: [&[u8]; 3] = [b"0\r\n\n", b"0\r\nA: b\n\r\n", b"0\r\nA: b\r\n\n"];
    for tail in tails {
        let r = raw(p.addr, &[head, tail, CANARY].concat()).await;
        assert!(r.closed, "connection left open after {:?}: {:?}", String::from_utf8_lossy(tail), r.text);
        assert!(!r.text.contains("blue"), "answered after {:?}: {:?}", String::from_utf8_lossy(tail), r.text);
    }
    settle().await;
    assert!(!paths(&blue).iter().any(|p| p == "/canary"), "forwarded: {:?}", paths(&blue));
}

/// 4f. An HTTP/1.0 request may come without `Host`: it reaches a `*` site,
/// and the upstream, spoken to in HTTP/1.1 (which requires `Host`), is named
/// by its address.
#[tokio::test]
async fn an_http_1_0_request_without_host_names_the_upstream() {
    let blue = Origin::start("blue").await;
    let p = Proxy::start(&site("any", "\"*\"", "blue", &[("blue", vec![blue.addr])])).await;
    let r = raw(p.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert!(r.text.starts_with("HTTP/1.0 200"), "{:?}", r.text);
    let seen = blue.seen();
    let old = seen.iter().find(|s| s.path == "/old").expect("forwarded");
    assert_eq!(header(old, "host"), [blue.addr.to_string().as_bytes()]);
    assert!(header(old, "x-forwarded-host").is_empty());
}

/// 4c. Bodies and plain `GET`s alternate on one kept-alive connection
/// without losing a byte, and a `GET` whose head arrives in two parts, the
/// first with the body before it, is answered once it is whole.
#[tokio::test]
async fn bodies_and_gets_alternate_on_one_connection() {
    let (p, blue) = one_site("").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    for i in 0..3 {
        let post = format!("POST /post{i} HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\nhello");
        s.write_all(post.as_bytes()).await.unwrap();
        let r = read_one_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
        s.write_all(format!("GET /get{i} HTTP/1.1\r\nHost: shop.test\r\n\r\n").as_bytes()).await.unwrap();
        let r = read_one_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    }
    // After a body, a head and its body in a later write (as urllib3 sends
    // them): that body is the request's, not the start of a next head.
    s.write_all(b"POST /post3 HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\nhello").await.unwrap();
    let r = read_one_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    s.write_all(b"POST /late HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"12345").await.unwrap();
    let r = read_one_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    // A body, and half of the next head in the same write; the rest later.
    s.write_all(b"POST /split HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n\r\nokGET /after HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let r = read_one_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"st: shop.test\r\n\r\n").await.unwrap();
    let r = read_one_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    settle().await;
    let seen = paths(&blue);
    assert_eq!(seen, ["/post0", "/get0", "/post1", "/get1", "/post2", "/get2", "/post3", "/late", "/split", "/after"]);
    assert!(blue.seen().iter().filter(|s| s.path.starts_with("/post") || s.path == "/late").all(|s| s.body_len == 5));
}

/// 4d. Back and forth between the two servers, at random: `GET`s, bodies
/// with a length and chunked bodies, one to three pipelined at a time, each
/// group written in one to four pieces with short pauses. Every answer comes
/// back in order with its own body, and the origin sees every body whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mixes_of_gets_and_bodies_lose_nothing() {
    let (p, blue) = one_site("").await;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut inbox: Vec<u8> = Vec::new();
    let (mut bodies_sent, mut i) = (0usize, 0usize);
    while i < 150 {
        let group = 1 + next(3) as usize;
        let mut bytes = Vec::new();
        let mut expect = Vec::new();
        for _ in 0..group {
            i += 1;
            match next(3) {
                0 => {
                    bytes.extend_from_slice(format!("GET /g{i} HTTP/1.1\r\nHost: shop.test\r\n\r\n").as_bytes());
                    expect.push(b"blue".to_vec());
                }
                kind => {
                    let len = 1 + next(1500) as usize;
                    let body: Vec<u8> = (0..len).map(|k| b'a' + ((k + i) % 26) as u8).collect();
                    if kind == 1 {
                        let head = format!("POST /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: {len}\r\n\r\n");
                        bytes.extend_from_slice(head.as_bytes());
                        bytes.extend_from_slice(&body);
                    } else {
                        bytes.extend_from_slice(
                            b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n",
                        );
                        let cut = 1 + next(len as u64) as usize;
                        for part in [&body[..cut.min(len)], &body[cut.min(len)..]] {
                            if !part.is_empty() {
                                bytes.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                                bytes.extend_from_slice(part);
                                bytes.extend_from_slice(b"\r\n");
                            }
                        }
                        bytes.extend_from_slice(b"0\r\n\r\n");
                    }
                    bodies_sent += 1;
                    expect.push(body);
                }
            }
        }
        let pieces = 1 + next(4) as usize;
        let mut at = 0;
        for k in 0..pieces {
            let end = if k + 1 == pieces {
                bytes.len()
            } else {
                (at + 1 + next(bytes.len() as u64) as usize).min(bytes.len())
            };
            s.write_all(&bytes[at..end]).await.unwrap();
            at = end;
            if next(2) == 0 {
                tokio::time::sleep(Duration::from_millis(next(3))).await;
            }
        }
        for want in expect {
            let got =
                timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer in 5 s");
            assert_eq!(got.0, 200, "request {i}: {:?}", String::from_utf8_lossy(&got.1));
            assert_eq!(got.1, want, "request {i}: wrong body");
        }
    }
    settle().await;
    let seen = blue.seen();
    assert_eq!(seen.iter().filter(|s| s.path == "/echo").count(), bodies_sent);
}

/// 4e. Small bodies that come whole with their heads (cutover's own server
/// takes them): `POST`, `PUT`, `PATCH` and `DELETE`, pipelined in one write
/// with a `GET`, each reach the origin with their method, length and body,
/// and come back in order. A body that looks like a request head is a body:
/// the canary in it is never a request.
#[tokio::test]
async fn small_bodies_sent_with_their_heads_are_forwarded_exactly() {
    let (p, blue) = one_site("").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let requests: [(&str, &[u8]); 6] =
        [("POST", b"hello"), ("PUT", b"abc"), ("PATCH", b""), ("DELETE", b"wxyz"), ("POST", CANARY), ("GET", b"")];
    let mut bytes = Vec::new();
    for (method, body) in requests {
        let length = if method == "GET" { String::new() } else { format!("Content-Length: {}\r\n", body.len()) };
        let path = if method == "GET" { "/plain" } else { "/echo" };
        bytes.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nHost: shop.test\r\n{length}\r\n").as_bytes());
        bytes.extend_from_slice(body);
    }
    s.write_all(&bytes).await.unwrap();
    let mut inbox = Vec::new();
    for (method, body) in requests {
        let (status, got) =
            timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer");
        assert_eq!(status, 200, "{method}: {:?}", String::from_utf8_lossy(&got));
        let want: &[u8] = if method == "GET" { b"blue" } else { body };
        assert_eq!(got, want, "{method}: wrong body");
    }
    settle().await;
    let seen = blue.seen();
    let methods: Vec<String> = seen.iter().map(|s| s.method.to_string()).collect();
    assert_eq!(methods, ["POST", "PUT", "PATCH", "DELETE", "POST", "GET"], "{:?}", paths(&blue));
    for (seen, (method, body)) in seen.iter().zip(requests) {
        assert_eq!(seen.body_len, body.len(), "{method}");
        if method != "GET" {
            assert_eq!(header(seen, "content-length"), [body.len().to_string().as_bytes()], "{method}");
        }
    }
    assert!(!paths(&blue).contains(&"/canary".to_string()));
}

/// 4e'. A body written apart from its head, in pieces a few milliseconds
/// apart (as urllib3 and Node write them; hyper's server streams it), at and
/// around the 16 KiB cutover's own server takes whole: each reaches the
/// origin whole and the connection goes on.
#[tokio::test]
async fn bodies_written_after_their_heads_are_forwarded_exactly() {
    let (p, blue) = one_site("").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut inbox = Vec::new();
    let sizes = [5usize, 4000, 16 * 1024, 16 * 1024 + 1];
    for len in sizes {
        let body: Vec<u8> = (0..len).map(|k| b'a' + (k % 26) as u8).collect();
        let head = format!("PUT /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: {len}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (a, b) = body.split_at(len / 2);
        s.write_all(a).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.write_all(&[b, b"GET /next HTTP/1.1\r\nHost: shop.test\r\n\r\n"].concat()).await.unwrap();
        let (status, got) =
            timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer");
        assert_eq!(status, 200, "{len}");
        assert!(got == body, "{len}: wrong body");
        let (status, got) =
            timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer");
        assert_eq!((status, &got[..]), (200, &b"blue"[..]), "{len}");
    }
    settle().await;
    let seen = blue.seen();
    let puts: Vec<usize> = seen.iter().filter(|s| s.path == "/echo").map(|s| s.body_len).collect();
    assert_eq!(puts, sizes);
    assert_eq!(seen.len(), 2 * sizes.len());
}

/// 4f. A read-only site refuses a small `POST` that came whole with its head
/// and keeps the connection: the body is not read as a next request, the
/// pipelined `GET` behind it is answered, and nothing of the write reaches
/// the origin.
#[tokio::test]
async fn a_refused_small_body_is_not_read_as_a_request() {
    let (p, blue) = one_site("").await;
    p.wait_healthy("shop", &["blue"]).await;
    let (status, _) = p.api("PUT", "/v1/sites/shop/mode", Some(serde_json::json!({"read_only": true}))).await;
    assert_eq!(status, 200);
    let post = format!("POST /write HTTP/1.1\r\nHost: shop.test\r\nContent-Length: {}\r\n\r\n", CANARY.len());
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[post.as_bytes(), CANARY, b"GET /after HTTP/1.1\r\nHost: shop.test\r\n\r\n"].concat()).await.unwrap();
    let mut inbox = Vec::new();
    let (status, body) = timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer");
    assert_eq!(status, 503, "{:?}", String::from_utf8_lossy(&body));
    let (status, body) = timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer");
    assert_eq!((status, &body[..]), (200, &b"blue"[..]), "{:?}", String::from_utf8_lossy(&body));
    settle().await;
    assert_eq!(paths(&blue), ["/after"]);
}

/// 4g. A read-only refusal of a write whose body hyper's server streams (it
/// came after the head, or chunked) reads and drops a small body, so the
/// connection carries the next request; a large body, or one that waits for
/// `100 Continue`, closes the connection after an answer that says so. No
/// byte of any of them reaches the origin.
#[tokio::test]
async fn a_refused_streamed_body_is_discarded_or_the_connection_closes() {
    let (p, blue) = one_site("").await;
    p.wait_healthy("shop", &["blue"]).await;
    let (status, _) = p.api("PUT", "/v1/sites/shop/mode", Some(serde_json::json!({"read_only": true}))).await;
    assert_eq!(status, 200);
    let late: [(&[u8], &[u8]); 2] = [
        (b"POST /late HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\n", b"hello"),
        (b"PUT /chunked HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ];
    for (head, body) in late {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(head).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(&[body, b"GET /after HTTP/1.1\r\nHost: shop.test\r\n\r\n"].concat()).await.unwrap();
        let mut inbox = Vec::new();
        let (status, _) = timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer");
        assert_eq!(status, 503);
        let (status, body) =
            timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("connection not kept");
        assert_eq!((status, &body[..]), (200, &b"blue"[..]));
    }
    let closing: [&[u8]; 2] = [
        b"POST /big HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 1000000\r\n\r\nabc",
        b"POST /expect HTTP/1.1\r\nHost: shop.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    ];
    for req in closing {
        let r = raw(p.addr, req).await;
        assert_eq!(r.status(), 503, "{:?}", r.text);
        assert!(r.text.to_ascii_lowercase().contains("connection: close"), "{:?}", r.text);
        assert!(r.closed, "{:?}", r.text);
    }
    settle().await;
    assert_eq!(paths(&blue), ["/after", "/after"]);
}

/// Where the first whole response in `bytes` (a head and a `Content-Length`
/// body) has its body and where it ends; `None` while it is incomplete.
fn first_response(bytes: &[u8]) -> Option<(usize, usize)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    (bytes.len() >= end + len).then_some((end, end + len))
}

/// Reads the next response (status, `Content-Length` body) from `s`, keeping
/// what follows it in `inbox`.
async fn next_response(s: &mut TcpStream, inbox: &mut Vec<u8>) -> (u16, Vec<u8>) {
    let mut buf = [0u8; 8192];
    loop {
        if let Some((body, end)) = first_response(inbox) {
            let status = inbox.get(9..12).and_then(|c| std::str::from_utf8(c).ok()?.parse().ok()).unwrap_or(0);
            let answer = (status, inbox[body..end].to_vec());
            inbox.drain(..end);
            return answer;
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed");
        inbox.extend_from_slice(&buf[..n]);
    }
}

/// 5. `CONNECT` (to a configured host or to any address) gets 405 and the
/// connection closes; nothing is forwarded and nothing connects to the
/// named address (no open proxy).
#[tokio::test]
async fn connect_is_refused_and_opens_nothing() {
    let (p, blue) = one_site("").await;
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t = target.local_addr().unwrap();
    let to_target = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n");
    for req in [to_target.as_bytes(), b"CONNECT shop.test:80 HTTP/1.1\r\nHost: shop.test:80\r\n\r\n"] {
        refused_with_canary(p.addr, req, 405).await;
    }
    assert!(timeout(Duration::from_millis(200), target.accept()).await.is_err(), "CONNECT opened a tunnel");
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
}

/// 6. An absolute-form target names the site, never the `Host` header: an
/// authority no site has gets 404 even with a known `Host` (and is not
/// forwarded, not even to the origin's own address); a known authority with a
/// foreign `Host` is routed by the authority, and the origin sees origin-form
/// and `Host` = `X-Forwarded-Host` = the authority.
#[tokio::test]
async fn absolute_form_authority_wins_over_host() {
    let (p, blue) = one_site("").await;
    let direct = format!("GET http://{}/x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n", blue.addr);
    for req in [b"GET http://evil.test/x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n", direct.as_bytes()] {
        let r = raw(p.addr, req).await;
        assert_eq!(r.status(), 404, "{:?}", r.text);
    }
    settle().await;
    assert_eq!(blue.count(), 0, "an unknown authority was forwarded: {:?}", paths(&blue));

    let r = raw(p.addr, b"GET http://shop.test:8080/abs?q=1 HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text);
    let seen = &blue.seen()[0];
    assert_eq!(seen.path, "/abs");
    assert_eq!(header(seen, "host"), [b"shop.test:8080"]);
    assert_eq!(header(seen, "x-forwarded-host"), [b"shop.test:8080"]);
}

/// 6a. Framing read one way only: a `GET` or `HEAD` with a `Content-Length`
/// body has that body forwarded with it; heads whose lines end in a bare LF
/// (which RFC 9112 §2.2 lets a recipient accept) are read as their CRLF
/// forms; `Content-Length: 05` is 5, and tabs around `chunked` are
/// whitespace. Either way the pipelined canary behind is its own request, never
/// part of the one before.
#[tokio::test]
async fn bodies_on_gets_and_bare_lf_heads_keep_the_framing() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 5] = [
        b"GET /get-body HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\nhello",
        b"HEAD /head-body HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /bare-lf HTTP/1.1\nHost: shop.test\n\n",
        b"POST /cl-05 HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 05\r\n\r\nhello",
        b"POST /te-tab HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding:\tchunked\t\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    for req in cases {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&[req, CANARY].concat()).await.unwrap();
        let mut inbox = Vec::new();
        let head = req.starts_with(b"HEAD");
        if head {
            // A HEAD answer has no body whatever its Content-Length says.
            let _ = timeout(Duration::from_secs(3), read_head(&mut s, &mut inbox)).await;
            let end = inbox.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |i| i + 4);
            assert!(inbox.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&inbox));
            inbox.drain(..end);
        } else {
            assert_eq!(next_response(&mut s, &mut inbox).await.0, 200, "{:?}", String::from_utf8_lossy(req));
        }
        let (status, body) = next_response(&mut s, &mut inbox).await;
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"blue"[..]),
            "the canary after {:?}",
            String::from_utf8_lossy(req)
        );
    }
    settle().await;
    let seen = blue.seen();
    let got: Vec<(&str, usize)> = seen.iter().map(|s| (s.path.as_str(), s.body_len)).collect();
    assert_eq!(
        got,
        [
            ("/get-body", 5),
            ("/canary", 0),
            ("/head-body", 5),
            ("/canary", 0),
            ("/bare-lf", 0),
            ("/canary", 0),
            ("/cl-05", 5),
            ("/canary", 0),
            ("/te-tab", 5),
            ("/canary", 0)
        ],
        "what the origin saw"
    );
}

/// 6b. An origin-form target that starts with `//` is a path, never an
/// authority: it is routed by `Host` and reaches the origin unchanged, as
/// do percent-encoded bytes (`%00`, `%ff`) in the path and query, which
/// cutover does not decode.
#[tokio::test]
async fn a_double_slash_path_is_a_path() {
    let (p, blue) = one_site("").await;
    for target in ["//evil.test/x", "//shop.test/y", "/a%00b/%ff%fe?q=%00%0d%0a"] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n");
        let r = raw(p.addr, req.as_bytes()).await;
        assert_eq!(r.status(), 200, "{target}: {:?}", r.text);
    }
    // Unknown as a host, `//evil.test/x` is still only a path of shop.test.
    let r = raw(p.addr, b"GET //shop.test/z HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status(), 404, "{:?}", r.text);
    settle().await;
    let seen = blue.seen();
    assert_eq!(paths(&blue), ["//evil.test/x", "//shop.test/y", "/a%00b/%ff%fe"], "{seen:?}");
    assert!(seen.iter().all(|s| header(s, "host") == [b"shop.test"]), "{seen:?}");
}

/// 7. `Host` must be exactly one valid `uri-host [":" port]` on HTTP/1.1:
/// missing, repeated (same or different values), with invalid characters,
/// empty, with bytes >= 0x80, with userinfo or a non-numeric port → 400, and
/// so does an absolute-form authority with userinfo, and an absolute-form
/// target whose scheme is not `http` (`https` on this plain listener, `ftp`);
/// nothing is forwarded.
#[tokio::test]
async fn invalid_host_is_refused() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 9] = [
        b"GET / HTTP/1.1\r\nX-No-Host: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nHost: shop.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nHost: evil.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: shop\xff.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: shop.test@evil.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: shop.test:abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: shop.test:+80\r\n\r\n",
    ];
    for req in cases {
        refused_with_canary(p.addr, req, 400).await;
    }
    // Userinfo in an absolute-form target is refused as well (RFC 9110 §4.2.4).
    for req in [
        &b"GET http://evil@shop.test/ HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"[..],
        b"GET http://shop.test:abc/ HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        b"GET https://shop.test/ HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        b"GET ftp://shop.test/ HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        b"POST https://shop.test/ HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ] {
        let r = raw(p.addr, req).await;
        assert_eq!(r.status(), 400, "{:?}", r.text);
    }
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", blue.seen());
}

/// 8. Client-supplied `X-Forwarded-For/-Proto/-Host` from a peer outside
/// `trusted_proxies` (here the list is not empty, it just does not contain
/// the peer) are replaced, repeated fields included: the origin sees exactly
/// one of each, with 127.0.0.1 / http / the real host. `Forwarded`,
/// `X-Real-IP` and `X-Forwarded-Port` are dropped, with a body or without.
#[tokio::test]
async fn spoofed_forwarded_headers_are_replaced() {
    let (p, blue) = one_site("trusted_proxies: [10.0.0.0/8]").await;
    for body in ["", "Content-Length: 2\r\n\r\nhi"] {
        let req = format!(
            "POST /who HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 10.0.0.1\r\n\
             X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX-Forwarded-Host: evil2.test\r\n\
             Forwarded: for=1.2.3.4;proto=https\r\nX-Real-IP: 1.2.3.4\r\nX-Forwarded-Port: 443\r\nConnection: close\r\n{}",
            if body.is_empty() { "Content-Length: 0\r\n\r\n" } else { body }
        );
        let r = raw(p.addr, req.as_bytes()).await;
        assert_eq!(r.status(), 200, "{:?}", r.text);
    }
    for seen in blue.seen() {
        assert_eq!(header(&seen, "x-forwarded-for"), [b"127.0.0.1"]);
        assert_eq!(header(&seen, "x-forwarded-proto"), [b"http"]);
        assert_eq!(header(&seen, "x-forwarded-host"), [b"shop.test"]);
        for dropped in ["forwarded", "x-real-ip", "x-forwarded-port"] {
            assert!(header(&seen, dropped).is_empty(), "{dropped} reached the origin (body {})", seen.body_len);
        }
    }
    assert_eq!(blue.count(), 2);
}

/// 9. Hop-by-hop abuse: `Connection` naming `X-Forwarded-For` cannot delete
/// the proxy's own header; naming `Host`, `Content-Length`,
/// `Transfer-Encoding` or `X-Request-Id` does not strip them from the
/// request: it arrives with its host, its id and its body intact.
#[tokio::test]
async fn connection_header_cannot_remove_what_the_proxy_relies_on() {
    let (p, blue) = one_site("").await;
    let r = raw(
        p.addr,
        b"GET /xff HTTP/1.1\r\nHost: shop.test\r\nConnection: close, X-Forwarded-For\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 200, "{:?}", r.text);
    let seen = &blue.seen()[0];
    assert_eq!(header(seen, "x-forwarded-for"), [b"127.0.0.1"], "our XFF was removed or the spoof kept");

    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let req = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nConnection: host, content-length, x-request-id\r\n\
        X-Request-Id: trace-1\r\nContent-Length: 5\r\n\r\nhello";
    s.write_all(req).await.unwrap();
    let answer = read_one_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer:?}");
    let req = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nConnection: transfer-encoding\r\n\
        Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n";
    s.write_all(req).await.unwrap();
    let answer = read_one_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("abcdefg"), "{answer:?}");

    let seen = blue.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(header(&seen[1], "host"), [b"shop.test"]);
    assert_eq!(header(&seen[1], "content-length"), [b"5"]);
    assert_eq!(header(&seen[1], "x-request-id"), [b"trace-1"]);
    assert_eq!(seen[1].body_len, 5);
    assert_eq!(header(&seen[2], "host"), [b"shop.test"]);
    assert_eq!(seen[2].body_len, 7);
    for s in &seen {
        assert!(s.headers.get("connection").is_none_or(|v| !v.as_bytes().contains(&b',')), "{:?}", s.headers);
    }
}

/// 10. Header names with `_` never reach the origin (dropped, nginx style),
/// whatever they imitate: `X_Forwarded_For`, `Content_Length`,
/// `Transfer_Encoding`, or a plain `X_Custom`; the request itself is served.
#[tokio::test]
async fn underscore_header_names_are_dropped() {
    let (p, blue) = one_site("").await;
    let req = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nX_Forwarded_For: 1.2.3.4\r\nX_Custom: 1\r\n\
        Content_Length: 99\r\nTransfer_Encoding: chunked\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    let r = raw(p.addr, req).await;
    assert_eq!(r.status(), 200, "{:?}", r.text);
    assert!(r.text.ends_with("ok"), "{:?}", r.text);
    let seen = &blue.seen()[0];
    let names: Vec<&str> = seen.headers.keys().map(|k| k.as_str()).collect();
    assert!(names.iter().all(|n| !n.contains('_')), "underscore names reached the origin: {names:?}");
    assert_eq!(header(seen, "x-forwarded-for"), [b"127.0.0.1"]);
    assert_eq!(seen.body_len, 2);
}

/// 11. Bytes >= 0x80: obs-text in a header value is forwarded byte-exact, a
/// UTF-8 path is forwarded as sent, a path that is not UTF-8 is refused with
/// 400; NUL or a bare CR in a header value → 400, never forwarded; the proxy
/// keeps serving afterwards (no panic).
#[tokio::test]
async fn high_bytes_and_control_characters() {
    let (p, blue) = one_site("").await;
    let value: &[u8] = b"caf\xe9 \xff\x80 end";
    let req =
        [&b"GET /bin HTTP/1.1\r\nHost: shop.test\r\nX-Bin: "[..], value, b"\r\nConnection: close\r\n\r\n"].concat();
    let r = raw(p.addr, &req).await;
    assert!(matches!(r.status(), 200 | 400), "{:?}", r.text);
    if r.status() == 200 {
        let seen = blue.seen().into_iter().find(|s| s.path == "/bin").expect("answered 200 but not forwarded");
        assert_eq!(header(&seen, "x-bin"), [value], "obs-text altered on the way");
    }

    let r = raw(p.addr, b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").await;
    assert!(matches!(r.status(), 200 | 400), "{:?}", r.text);
    if r.status() == 200 {
        assert!(paths(&blue).contains(&"/caf\u{e9}".to_string()), "{:?}", paths(&blue));
    }
    let before = blue.count();
    let refused: [&[u8]; 4] = [
        b"GET /\xff\xfe HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        b"GET /nul HTTP/1.1\r\nHost: shop.test\r\nX-Bad: a\x00b\r\n\r\n",
        b"GET /cr HTTP/1.1\r\nHost: shop.test\r\nX-Bad: a\rb\r\n\r\n",
        b"GET /cr2 HTTP/1.1\r\nHost: shop.test\r\nX-Bad: a\r\nX-Injected\r\n\r\n",
    ];
    for req in refused {
        refused_with_canary(p.addr, req, 400).await;
    }
    settle().await;
    assert_eq!(blue.count(), before, "forwarded: {:?}", paths(&blue));
    assert_eq!(support::get(p.addr, "shop.test", "/alive").await.status, 200);
}

/// 12. A 100 KiB header (limit 64 KiB) and a head with 150 fields (limit
/// 100) get 431 and are never forwarded; the proxy keeps serving.
#[tokio::test]
async fn oversized_heads_get_431() {
    let (p, blue) = one_site("").await;
    let big = format!("GET /big HTTP/1.1\r\nHost: shop.test\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let r = raw(p.addr, big.as_bytes()).await;
    assert_eq!(r.status(), 431, "{:?}", r.text.get(..200));
    assert!(r.closed);

    let mut many = String::from("GET /many HTTP/1.1\r\nHost: shop.test\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(p.addr, many.as_bytes()).await;
    assert_eq!(r.status(), 431, "{:?}", r.text);
    assert!(r.closed);
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
    assert_eq!(support::get(p.addr, "shop.test", "/alive").await.status, 200);
}

/// With `max_header_bytes` below 8 KiB (hyper's smallest buffer), a head
/// over the limit still gets 431, with a body or without; one under it is served.
#[tokio::test]
async fn heads_over_a_small_max_header_bytes_get_431() {
    let (p, blue) = one_site("limits: { max_header_bytes: 2048 }").await;
    let pad = "a".repeat(3000);
    let get = format!("GET /big HTTP/1.1\r\nHost: shop.test\r\nX-Pad: {pad}\r\n\r\n");
    let post = format!("POST /big HTTP/1.1\r\nHost: shop.test\r\nX-Pad: {pad}\r\nContent-Length: 2\r\n\r\nok");
    for head in [get, post] {
        let r = raw(p.addr, head.as_bytes()).await;
        assert_eq!(r.status(), 431, "{:?}", r.text.get(..200));
        assert!(r.closed);
    }
    let fits = format!("GET /fits HTTP/1.1\r\nHost: shop.test\r\nX-Pad: {}\r\n\r\n", "a".repeat(1500));
    assert_eq!(raw(p.addr, fits.as_bytes()).await.status(), 200);
    settle().await;
    assert_eq!(paths(&blue), vec!["/fits".to_string()]);
}

/// A 431 closes the connection, whichever limit refused the head (a 100 KiB
/// field, 150 fields, a head over a small `max_header_bytes`, sent alone or
/// behind a served request): the canary pipelined behind it is never
/// answered nor forwarded, since a server reading on after a refused head
/// could take part of it for a request.
#[tokio::test]
async fn a_431_closes_the_connection_before_a_pipelined_request() {
    let (p, blue) = one_site("").await;
    let (small, small_blue) = one_site("limits: { max_header_bytes: 2048 }").await;
    let big = format!("GET /big HTTP/1.1\r\nHost: shop.test\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let many: String = (0..150).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let many = format!("GET /many HTTP/1.1\r\nHost: shop.test\r\n{many}\r\n");
    let pad = format!("GET /pad HTTP/1.1\r\nHost: shop.test\r\nX-Pad: {}\r\n\r\n", "a".repeat(3000));
    for (addr, head) in [(p.addr, &big), (p.addr, &many), (small.addr, &pad)] {
        refused_with_canary(addr, head.as_bytes(), 431).await;
        // Behind a request that is served, on the same connection.
        let first = b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\n";
        let r = raw(addr, &[&first[..], head.as_bytes(), CANARY].concat()).await;
        let statuses: Vec<&str> = r.text.match_indices("HTTP/1.1 ").map(|(i, _)| &r.text[i + 9..i + 12]).collect();
        assert_eq!(statuses, ["200", "431"], "{:?}", r.text.get(..300));
        assert!(r.closed, "connection left open after a 431 behind a request");
    }
    settle().await;
    for origin in [&blue, &small_blue] {
        assert!(paths(origin).iter().all(|p| p == "/first"), "forwarded: {:?}", paths(origin));
    }
    assert_eq!(paths(&blue).len() + paths(&small_blue).len(), 3);
}

/// A 1 MiB head sent slowly (16 KiB every 20 ms) gets 431 once it passes
/// the 64 KiB limit, long before its end: the proxy neither buffers the rest
/// nor waits for it, closes the connection, and forwards nothing.
#[tokio::test]
async fn a_big_head_sent_slowly_gets_431_at_the_limit() {
    let (p, blue) = one_site("").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /slow-big HTTP/1.1\r\nHost: shop.test\r\n").await.unwrap();
    let piece = format!("X-Pad: {}\r\n", "a".repeat(16 * 1024 - 9));
    let (mut sent, mut got) = (0, Vec::new());
    let mut buf = [0u8; 4096];
    while sent < 1 << 20 {
        if s.write_all(piece.as_bytes()).await.is_err() {
            break;
        }
        sent += piece.len();
        match timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if !got.is_empty() {
            break;
        }
    }
    assert!(sent < 1 << 20, "the whole 1 MiB head was taken in");
    let rest = read_until_close(&mut s, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got).to_string() + &rest.text;
    assert!(text.starts_with("HTTP/1.1 431"), "after {sent} bytes: {text:?}");
    assert!(rest.closed, "connection left open after the 431");
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
}

/// Sends one more byte of a request head every 100 ms (for 3 s at most) until
/// the proxy closes the connection; how long after `start` that was.
async fn drip_until_cut(s: &mut TcpStream, start: Instant) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    for _ in 0..30 {
        if s.write_all(b"x").await.is_err() {
            return Some(start.elapsed());
        }
        match timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            // Still open (or a 408 before the close, which is fine).
            Err(_) | Ok(Ok(1..)) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
        }
    }
    None
}

/// 13. Slowloris: a client that starts a head and then dribbles one byte
/// every 100 ms is cut at `header_read_timeout` (500 ms), a total-time
/// limit that progress does not reset; nothing reaches the origin.
#[tokio::test]
async fn slowloris_is_cut_at_header_read_timeout() {
    let (p, blue) = one_site("limits: { header_read_timeout: 500ms }").await;
    let start = Instant::now();
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n").await.unwrap();
    let cut = drip_until_cut(&mut s, start).await.expect("the slow client was never disconnected");
    assert!(cut < Duration::from_secs(2), "cut after {cut:?}");
    assert!(cut >= Duration::from_millis(400), "cut before the timeout: {cut:?}");
    settle().await;
    assert_eq!(blue.count(), 0, "forwarded: {:?}", paths(&blue));
    assert_eq!(support::get(p.addr, "shop.test", "/").await.status, 200);
}

/// The same on a kept-alive connection, after a first request was answered:
/// every request head has `header_read_timeout` to arrive.
#[tokio::test]
async fn slowloris_after_a_first_request_is_cut_too() {
    let (p, blue) = one_site("limits: { header_read_timeout: 500ms, idle_timeout: 60s }").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    // Idle well past the header timeout: the connection stays (idle_timeout is long).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let start = Instant::now();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: shop.test\r\n").await.unwrap();
    let cut = drip_until_cut(&mut s, start).await.expect("the slow second request head was never cut");
    assert!(cut >= Duration::from_millis(400) && cut < Duration::from_secs(2), "cut after {cut:?}");
    settle().await;
    assert_eq!(paths(&blue), vec!["/first".to_string()]);
}

/// A parked connection whose next request head arrives half, in one packet,
/// and then nothing more: the half head still has `header_read_timeout`, not
/// `idle_timeout` (the first bytes of a re-awakened connection are read at
/// once, and count as the head's start all the same).
#[tokio::test]
async fn half_head_on_a_parked_connection_is_cut_at_header_read_timeout() {
    let (p, blue) = one_site("limits: { header_read_timeout: 500ms, idle_timeout: 60s }").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let n = timeout(Duration::from_secs(2), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    // Idle well past the parking delay: parked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    s.write_all(b"GET /half HTTP/1.1\r\nHost: shop.test\r\n").await.unwrap();
    let r = read_until_close(&mut s, Duration::from_secs(3)).await;
    half_head_was_cut(&r, start, &blue).await;
}

/// A half head that came in the same packet as the request before it, and
/// then nothing more: it has `header_read_timeout` from the moment that
/// request was answered, not `idle_timeout`.
#[tokio::test]
async fn half_head_behind_a_pipelined_request_is_cut_at_header_read_timeout() {
    let (p, blue) = one_site("limits: { header_read_timeout: 500ms, idle_timeout: 60s }").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\nGET /half HTTP/1.1\r\n").await.unwrap();
    let r = read_until_close(&mut s, Duration::from_secs(3)).await;
    assert!(r.text.starts_with("HTTP/1.1 200"), "{:?}", r.text);
    half_head_was_cut(&r, start, &blue).await;
}

/// A half head that came in the same packet as a request hyper's server
/// took (an `OPTIONS`, a chunked `POST`), and its rest after the connection
/// has been quiet long enough to be parked: nothing is lost, both are
/// answered, and the connection stays usable.
#[tokio::test]
async fn half_head_behind_a_hyper_request_survives_parking() {
    let (p, blue) = one_site("").await;
    let firsts: [&[u8]; 2] = [
        b"OPTIONS /first HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ];
    for first in firsts {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&[first, b"GET /se"].concat()).await.unwrap();
        let mut inbox = Vec::new();
        let (status, _) = timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no answer");
        assert_eq!(status, 200);
        // Longer than PARK_AFTER (20 ms), well within header_read_timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"cond HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
        let (status, body) =
            timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("the second was lost");
        assert_eq!((status, &body[..]), (200, &b"blue"[..]));
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"GET /third HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
        let (status, _) = timeout(Duration::from_secs(5), next_response(&mut s, &mut inbox)).await.expect("no third");
        assert_eq!(status, 200);
    }
    settle().await;
    assert_eq!(paths(&blue), ["/first", "/second", "/third", "/echo", "/second", "/third"]);
}

/// The connection of a half head (sent at `start`, after `/first`) was closed
/// at `header_read_timeout` (500 ms), and nothing but `/first` was forwarded.
async fn half_head_was_cut(r: &Raw, start: Instant, blue: &Origin) {
    assert!(r.closed, "the half head was kept past header_read_timeout");
    let cut = start.elapsed();
    assert!(cut >= Duration::from_millis(400) && cut < Duration::from_secs(2), "cut after {cut:?}");
    settle().await;
    assert_eq!(paths(blue), vec!["/first".to_string()]);
}

/// 14. `max_connections: 2`: two kept-alive connections are served, a third
/// TCP connection is closed at once without an answer (and counted), the first
/// two keep working, and once one of them closes a new connection is accepted again.
#[tokio::test]
async fn connections_beyond_max_are_closed_at_once() {
    let (p, blue) = one_site("limits: { max_connections: 2 }").await;
    let mut a = Client::connect(p.addr).await;
    let mut b = Client::connect(p.addr).await;
    assert_eq!(a.get("shop.test", "/a").await.unwrap().status, 200);
    assert_eq!(b.get("shop.test", "/b").await.unwrap().status, 200);

    let mut third = TcpStream::connect(p.addr).await.unwrap();
    let _ = third.write_all(b"GET /third HTTP/1.1\r\nHost: shop.test\r\n\r\n").await;
    let r = read_until_close(&mut third, Duration::from_secs(1)).await;
    assert!(r.closed, "the third connection was kept open");
    assert!(r.text.is_empty(), "the third connection was answered: {:?}", r.text);

    assert_eq!(a.get("shop.test", "/a").await.unwrap().status, 200);
    assert_eq!(b.get("shop.test", "/b").await.unwrap().status, 200);
    assert!(!paths(&blue).contains(&"/third".to_string()));
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains("cutover_client_connections_refused_total{listener=\"http\"} 1"), "{metrics}");

    drop(a);
    let mut served = false;
    for _ in 0..20 {
        let r = raw_for(
            p.addr,
            b"GET /again HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
            Duration::from_secs(1),
        )
        .await;
        if r.status() == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a freed connection slot was never reused");
}

/// 15. `idle_timeout: 300ms`: a kept-alive connection left idle after its
/// response is closed by the proxy (not before the timeout, well within 1.5 s),
/// and so is a connection that never sends a byte.
#[tokio::test]
async fn idle_connections_are_closed() {
    let (p, _blue) = one_site("limits: { idle_timeout: 300ms }").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
    let answer = read_one_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let idle = Instant::now();
    let r = read_until_close(&mut s, Duration::from_millis(1500)).await;
    assert!(r.closed, "idle connection still open after 1.5 s");
    assert!(idle.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", idle.elapsed());

    let start = Instant::now();
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let r = read_until_close(&mut silent, Duration::from_millis(1500)).await;
    assert!(r.closed, "silent connection still open after 1.5 s");
    assert!(start.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", start.elapsed());
}

/// 15b. A connection that sends nothing, or stalls inside the h2 preface, is
/// closed at `header_read_timeout` even though `idle_timeout` is long: hyper's
/// own timer is not armed before the protocol is known.
#[tokio::test]
async fn silent_and_stalled_preface_connections_are_cut_at_header_read_timeout() {
    let (p, blue) = one_site("limits: { header_read_timeout: 400ms, idle_timeout: 60s }").await;
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let start = Instant::now();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(opening).await.unwrap();
        let r = read_until_close(&mut s, Duration::from_secs(3)).await;
        assert!(r.closed, "connection opened with {opening:?} still open after 3 s");
        assert!(start.elapsed() >= Duration::from_millis(350), "closed too early: {:?}", start.elapsed());
    }
    assert_eq!(blue.count(), 0);
}

/// 16. Request smuggling (CL.TE with a smuggled request in the chunked body's
/// tail, and TE.CL): the origin never sees `/smuggled`, the client gets exactly one
/// answer and the connection is closed.
#[tokio::test]
async fn smuggled_request_never_reaches_the_origin() {
    let (p, blue) = one_site("").await;
    let cases: [&[u8]; 3] = [
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 45\r\nTransfer-Encoding: chunked\r\n\r\n\
          2b\r\nGET /smuggled HTTP/1.1\r\nHost: shop.test\r\n\r\n\r\n0\r\n\r\n",
    ];
    for req in cases {
        let r = raw(p.addr, req).await;
        assert!(matches!(r.status(), 200 | 400), "{:?}", r.text);
        assert_eq!(r.responses(), 1, "{:?}", r.text);
        assert!(r.closed, "connection kept alive after an ambiguous request");
    }
    settle().await;
    let seen = paths(&blue);
    assert!(!seen.iter().any(|p| p.contains("smuggled")), "smuggled request reached the origin: {seen:?}");
    assert!(seen.iter().all(|p| p == "/"), "{seen:?}");
}

/// A request that could be read two ways, pipelined behind a chunked one in
/// the same write (so hyper's server, which reads the chunked one, could
/// have read it too): judged before hyper gets its bytes, answered `400`, and
/// never forwarded; the chunked request before it is answered as usual.
#[tokio::test]
async fn an_ambiguous_request_behind_a_chunked_one_is_refused() {
    let (p, blue) = one_site("").await;
    let chunked: &[u8] =
        b"POST /first HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n";
    let ambiguous: [&[u8]; 2] = [
        b"POST /second HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /second HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    ];
    for second in ambiguous {
        let r = raw(p.addr, &[chunked, second, CANARY].concat()).await;
        assert!(r.text.starts_with("HTTP/1.1 200"), "{:?}", r.text);
        assert_eq!(r.responses(), 2, "{:?}", r.text);
        assert!(r.text.contains("HTTP/1.1 400"), "{:?}", r.text);
        assert!(r.closed, "connection kept alive after an ambiguous request");
    }
    // An empty line after a body (which some clients send), or a length of
    // many digits (hyper reads it), and the next request sent only after the
    // answer: judged all the same.
    let with_crlf: &[u8] =
        b"POST /first HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\r\n";
    let long_length: &[u8] =
        b"POST /first HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          POST /first HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 0000000000000000000003\r\n\r\nabc";
    for (opening, answers) in [(with_crlf, 1), (long_length, 2)] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(opening).await.unwrap();
        let mut got = Vec::new();
        while got.windows(9).filter(|w| w == b"HTTP/1.1 ").count() < answers || !got.ends_with(b"blue") {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut chunk)).await {
                Ok(Ok(n @ 1..)) => got.extend_from_slice(&chunk[..n]),
                other => panic!("{other:?} after {:?}", String::from_utf8_lossy(&got)),
            }
        }
        s.write_all(ambiguous[0]).await.unwrap();
        let r = read_until_close(&mut s, Duration::from_secs(2)).await;
        assert!(r.text.starts_with("HTTP/1.1 400") && r.closed, "{:?}", r.text);
    }
    // Behind a chunked request, a plain GET and another chunked one are answered in order.
    let get: &[u8] = b"GET /third HTTP/1.1\r\nHost: shop.test\r\n\r\n";
    let last: &[u8] =
        b"POST /fourth HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n";
    let r = raw(p.addr, &[chunked, get, last].concat()).await;
    assert_eq!((r.text.matches("HTTP/1.1 200").count(), r.closed), (3, true), "{:?}", r.text);
    settle().await;
    let seen = paths(&blue);
    assert!(!seen.iter().any(|p| p == "/second" || p == "/canary"), "forwarded: {seen:?}");
    assert_eq!(seen.iter().filter(|p| *p == "/first").count(), 6, "{seen:?}");
    assert!(seen.ends_with(&["/third".to_string(), "/fourth".to_string()]), "{seen:?}");
}

/// An upstream that answers before it has read the request body (a `401`
/// from the head alone): the body that comes late is the rest of that
/// request, never a request of its own, however long the connection was
/// quiet in between (an idle connection is parked after 20 ms).
#[tokio::test]
async fn a_late_body_after_an_early_answer_is_never_a_request() {
    // A 401 from the head alone; the body read only after it.
    let (origin, seen) = raw_origin(BodyRead::After, |head, _| match head.starts_with("get /up ") {
        true => (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n".to_vec(), true),
        false => (b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n".to_vec(), true),
    })
    .await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![origin])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: shop.test\r\n\r\n";
    let head = format!("POST /early HTTP/1.1\r\nHost: shop.test\r\nContent-Length: {}\r\n\r\n", smuggled.len());
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let answered = timeout(Duration::from_secs(5), read_head(&mut s, &mut got)).await.unwrap();
    assert!(answered.is_some() && got.starts_with(b"HTTP/1.1 401"), "{:?}", String::from_utf8_lossy(&got));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = s.write_all(smuggled).await;
    let rest = read_until_close(&mut s, Duration::from_secs(2)).await;
    assert!(!rest.text.contains("HTTP/1.1"), "the late body was answered as a request: {:?}", rest.text);
    settle().await;
    let paths = seen.lock().unwrap().clone();
    assert!(!paths.iter().any(|p| p == "/smuggled"), "the late body reached the origin as a request: {paths:?}");
}

/// Sends `head` on a new connection; the connection and what came back up
/// to the end of the first answer's head (within 5 s).
async fn first_answer(addr: SocketAddr, head: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let mut got = Vec::new();
    timeout(Duration::from_secs(5), read_head(&mut s, &mut got)).await.unwrap();
    (s, got)
}

/// Reads from `s` into `buf` until it holds a whole head; its length, or
/// `None` when the connection ends first.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// When a [`raw_origin`] reads a request's `Content-Length` body.
#[derive(Clone, Copy, PartialEq)]
enum BodyRead {
    /// Before it answers (the answer sees the body).
    Before,
    /// After it answered.
    After,
    /// Never (the answer should end the connection).
    Never,
}

/// An HTTP/1.1 origin on 127.0.0.1 that speaks raw bytes: for each request
/// head (lowercased) and its body (empty unless read [`BodyRead::Before`]),
/// `answer` gives the bytes written back and whether the connection goes on.
/// Returns its address and the path of every request it saw.
async fn raw_origin(
    read: BodyRead,
    answer: fn(&str, &[u8]) -> (Vec<u8>, bool),
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(end) = read_head(&mut s, &mut buf).await {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    record.lock().unwrap().push(head.split(' ').nth(1).unwrap_or_default().to_string());
                    let length: usize = match read {
                        BodyRead::Never => 0,
                        _ => head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0),
                    };
                    let before = if read == BodyRead::Before { length } else { 0 };
                    if !read_to(&mut s, &mut buf, end + before).await {
                        return;
                    }
                    let (reply, go_on) = answer(&head, &buf[end..end + before]);
                    buf.drain(..end + before);
                    if s.write_all(&reply).await.is_err() || !go_on {
                        return;
                    }
                    if read == BodyRead::After {
                        if !read_to(&mut s, &mut buf, length).await {
                            return;
                        }
                        buf.drain(..length);
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// h2c smuggling: an `Upgrade` that offers `h2c`, alone or among other
/// protocols, in any case, never reaches an upstream that would switch to
/// it (its tunnel would carry HTTP/2 requests past every per-request rule);
/// the request is forwarded without it and answered as plain HTTP/1.1. A
/// WebSocket upgrade to the same upstream still switches.
#[tokio::test]
async fn an_upgrade_offering_h2c_is_never_forwarded() {
    let (origin, seen) = raw_origin(BodyRead::Never, |head, _| match head.contains("\r\nupgrade:") {
        true => (b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n".to_vec(), true),
        false => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain".to_vec(), true),
    })
    .await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![origin])])).await;
    let ask = |protocol: &str| {
        format!(
            "GET /u HTTP/1.1\r\nHost: shop.test\r\nUpgrade: {protocol}\r\n\
             Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
    };
    for protocol in ["h2c", "H2C", "websocket, h2c", "h2c, websocket", "websocket,h2c/1"] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(ask(protocol).as_bytes()).await.unwrap();
        let answer = read_one_response(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("plain"), "{protocol}: {answer:?}");
        // Still HTTP/1.1: the next request on the connection is answered.
        s.write_all(b"GET /next HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
        assert!(read_one_response(&mut s).await.starts_with("HTTP/1.1 200"), "{protocol}");
    }
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(ask("websocket").as_bytes()).await.unwrap();
    let answer = read_one_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "the control upgrade did not switch: {answer:?}");
    let seen: Vec<_> = seen.lock().unwrap().iter().filter(|p| *p != "/up").cloned().collect();
    assert_eq!(seen.len(), 11, "{seen:?}");
}

/// Reads from `s` into `buf` until it holds `len` bytes; `false` when the
/// connection ends first.
async fn read_to(s: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> bool {
    while buf.len() < len {
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// A request target that is not a path (`GET x`) gets 400, one over 8 KiB
/// gets 414 (60 KiB too), alone or behind a served request; each closes the
/// connection, and neither it nor the canary pipelined behind it is forwarded.
#[tokio::test]
async fn request_targets_that_are_no_path_or_too_long_are_refused() {
    let (p, blue) = one_site("").await;
    refused_with_canary(p.addr, b"GET x HTTP/1.1\r\nHost: shop.test\r\n\r\n", 400).await;
    for len in [9 * 1024, 60 * 1024] {
        let long = format!("GET /{} HTTP/1.1\r\nHost: shop.test\r\n\r\n", "a".repeat(len));
        refused_with_canary(p.addr, long.as_bytes(), 414).await;
        let r =
            raw(p.addr, &[b"GET /first HTTP/1.1\r\nHost: shop.test\r\n\r\n", long.as_bytes(), CANARY].concat()).await;
        assert_eq!(r.responses(), 2, "{:?}", r.text);
        assert!(r.text.starts_with("HTTP/1.1 200") && r.text.contains("HTTP/1.1 414"), "{:?}", r.text);
        assert!(r.closed, "connection left open after a 414 behind a request");
    }
    let options = raw(p.addr, b"OPTIONS * HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").await;
    assert_ne!(options.status(), 400, "{:?}", options.text);
    settle().await;
    assert!(paths(&blue).iter().all(|p| p == "*" || p == "/first"), "forwarded: {:?}", paths(&blue));
}

/// An upstream that ignores `Expect: 100-continue` gets the body after
/// cutover's wait for its `100 Continue` (1 s), and that wait is not the
/// upstream's silence: with an `upstream_response_timeout` shorter than it,
/// the upload still gets the upstream's answer, not `504`.
#[tokio::test]
async fn the_wait_for_100_continue_is_not_upstream_silence() {
    // Never sends 100 Continue; echoes the body once it is all there.
    let (ignoring, _) = raw_origin(BodyRead::Before, |_, body| {
        let mut answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(body);
        (answer, true)
    })
    .await;
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![ignoring])]);
    let extra = "limits: { upstream_response_timeout: 300ms }".to_string();
    let p = Proxy::start_with(&sites, Options { extra, ..Default::default() }).await;
    let req = b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\
        Connection: close\r\n\r\nhello";
    let r = raw_for(p.addr, req, Duration::from_secs(4)).await;
    assert!(r.text.contains("HTTP/1.1 200") && r.text.ends_with("hello"), "{:?}", r.text);
    assert!(!r.text.contains("HTTP/1.1 504"), "{:?}", r.text);
}

/// `Expect: 100-continue` (reliability.md B-8): an upstream that refuses from
/// the head alone (`401`) is answered without the client sending its body,
/// since cutover's `100 Continue` waits for the upstream's; an upstream that
/// reads the body gets it after its own `100 Continue` reached the client.
#[tokio::test]
async fn expect_100_continue_waits_for_the_upstream() {
    // /refuse: 401 at once, the body never read, the connection closed; /up: health.
    let (refusing, _) = raw_origin(BodyRead::Never, |head, _| match head.starts_with("get /up ") {
        true => (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n".to_vec(), true),
        false => (b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(), false),
    })
    .await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![refusing])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    let head = b"POST /refuse HTTP/1.1\r\nHost: shop.test\r\nExpect: 100-continue\r\nContent-Length: 10485760\r\n\r\n";
    let (_, got) = first_answer(p.addr, head).await;
    assert!(got.starts_with(b"HTTP/1.1 401"), "before the final answer: {:?}", String::from_utf8_lossy(&got));
    // The upload never went: the connection ends after the answer, and says
    // so every time, also when the upstream would keep its own.
    let (keeping, _) = raw_origin(BodyRead::Never, |head, _| match head.starts_with("get /up ") {
        true => (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n".to_vec(), true),
        false => (b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\n\r\n".to_vec(), true),
    })
    .await;
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![keeping])])).await;
    p.wait_healthy("shop", &["blue"]).await;
    let head = b"POST /reject HTTP/1.1\r\nHost: shop.test\r\nExpect: 100-continue\r\nContent-Length: 2000000\r\n\r\n";
    for _ in 0..10 {
        let (_, got) = first_answer(p.addr, head).await;
        let text = String::from_utf8_lossy(&got).to_lowercase();
        assert!(text.starts_with("http/1.1 417") && text.contains("\r\nconnection: close\r\n"), "{text:?}");
    }

    let (p, blue) = one_site("").await;
    let head = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
    let (mut s, got) = first_answer(p.addr, head).await;
    assert!(got.starts_with(b"HTTP/1.1 100 Continue"), "{:?}", String::from_utf8_lossy(&got));
    s.write_all(b"hello").await.unwrap();
    let rest = read_until_close(&mut s, Duration::from_secs(2)).await;
    let all = String::from_utf8_lossy(&got).to_string() + &rest.text;
    assert!(all.contains("HTTP/1.1 200") && all.ends_with("hello"), "{all:?}");
    assert_eq!(blue.seen()[0].body_len, 5);
}

/// A request target with a fragment (`/x#frag`; RFC 9112 §3.2 origin-form
/// has none) has it stripped, as hyper's parser and cutover's own both do:
/// the upstream gets the target without it, over either server, and the path
/// rules judge that same path, so `#` can neither hide a path from them nor
/// reach an upstream that would resolve it otherwise.
#[tokio::test]
async fn a_fragment_in_the_target_is_stripped_before_rules_and_upstream() {
    let (origin, seen) =
        raw_origin(BodyRead::Before, |_, _| (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(), true)).await;
    let mut sites = site("shop", "shop.test", "blue", &[("blue", vec![origin])]);
    sites.push_str("    read_only: { allow_paths: [/open/*] }\n");
    let p = Proxy::start(&sites).await;
    let close = "Host: shop.test\r\nConnection: close\r\n";
    let served = [
        (format!("GET /x#frag HTTP/1.1\r\n{close}\r\n"), "/x"),
        (format!("GET /x?q=1#frag HTTP/1.1\r\n{close}\r\n"), "/x?q=1"),
        (format!("GET /a#/../admin HTTP/1.1\r\n{close}\r\n"), "/a"),
        (format!("GET /# HTTP/1.1\r\n{close}\r\n"), "/"),
        (format!("GET http://shop.test/x#frag HTTP/1.1\r\n{close}\r\n"), "/x"),
        (format!("POST /p#frag HTTP/1.1\r\n{close}Content-Length: 2\r\n\r\nhi"), "/p"),
        // HTTP/1.0 is served by hyper, not by cutover's own server.
        ("GET /h#frag HTTP/1.0\r\nHost: shop.test\r\n\r\n".to_string(), "/h"),
        // An encoded `#` is a path character like any other.
        (format!("GET /x%23y HTTP/1.1\r\n{close}\r\n"), "/x%23y"),
    ];
    for (req, _) in &served {
        let r = raw(p.addr, req.as_bytes()).await;
        assert!(r.text.starts_with("HTTP/1.1 200") || r.text.starts_with("HTTP/1.0 200"), "{req:?} → {:?}", r.text);
    }
    let (status, _) = p.api("PUT", "/v1/sites/shop/mode", Some(serde_json::json!({"read_only": true}))).await;
    assert_eq!(status, 200);
    let write = |target: &str| format!("POST {target} HTTP/1.1\r\n{close}Content-Length: 2\r\n\r\nhi");
    assert_eq!(raw(p.addr, write("/open/ok#frag").as_bytes()).await.status(), 200);
    for hidden in ["/closed#/open/x", "/closed#/../open/x", "/open#/"] {
        assert_eq!(raw(p.addr, write(hidden).as_bytes()).await.status(), 503, "{hidden}");
    }
    settle().await;
    let got: Vec<String> = seen.lock().unwrap().iter().filter(|p| *p != "/up").cloned().collect();
    let mut wanted: Vec<String> = served.iter().map(|(_, path)| path.to_string()).collect();
    wanted.push("/open/ok".into());
    assert_eq!(got, wanted, "what the upstream was sent");
}
