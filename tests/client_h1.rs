//! The client side of HTTP/1.1 (SPEC §3): cutover's own server answers `GET`
//! and `HEAD` without a body, hyper's server everything else, on the same
//! connection. These cases talk raw bytes and check the framing a client
//! relies on: pipelined requests answered in order across the hand-over,
//! `HEAD` and chunked framing, `Connection: close`, `Date` on cutover's own
//! answers, trailers, HTTP/1.0.

mod support;

use std::time::Duration;

use support::{site, Origin, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

async fn one_site() -> (Proxy, Origin) {
    let blue = Origin::start("blue").await;
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]);
    (Proxy::start(&sites).await, blue)
}

/// One response as read off the wire.
#[derive(Debug)]
struct Answer {
    status_line: String,
    /// Field lines, names lowercased.
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    /// Trailer field lines of a chunked body, names lowercased.
    trailers: Vec<(String, String)>,
}

impl Answer {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A kept-alive raw connection that reads responses one by one.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(p: &Proxy) -> Conn {
        Conn { s: TcpStream::connect(p.addr).await.unwrap(), buf: Vec::new() }
    }

    async fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).await.unwrap();
    }

    /// Reads until `done` finds what it needs in the buffer; returns what it found.
    async fn fill_until(&mut self, done: impl Fn(&[u8]) -> Option<usize>) -> usize {
        let read = async {
            loop {
                if let Some(n) = done(&self.buf) {
                    return n;
                }
                let mut chunk = [0u8; 8192];
                let n = self.s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-response; had {:?}", String::from_utf8_lossy(&self.buf));
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        timeout(Duration::from_secs(3), read).await.expect("no complete response within 3 s")
    }

    async fn line(&mut self) -> String {
        let end = self.fill_until(|b| b.windows(2).position(|w| w == b"\r\n")).await;
        let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 2);
        line
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        self.fill_until(|b| (b.len() >= n).then_some(n)).await;
        self.buf.drain(..n).collect()
    }

    async fn fields(&mut self) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                return fields;
            }
            let (n, v) = line.split_once(':').expect("a field line");
            fields.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
    }

    /// Reads one response; `head`: it answers a HEAD request (no body).
    async fn response(&mut self, head: bool) -> Answer {
        let status_line = self.line().await;
        let fields = self.fields().await;
        let mut a = Answer { status_line, fields, body: Vec::new(), trailers: Vec::new() };
        let no_body = head || a.status_line.contains(" 204 ") || a.status_line.contains(" 304 ");
        if no_body {
            return a;
        }
        if a.field("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(self.line().await.trim(), 16).expect("a chunk size");
                if size == 0 {
                    a.trailers = self.fields().await;
                    return a;
                }
                a.body.extend(self.take(size).await);
                assert_eq!(self.take(2).await, b"\r\n");
            }
        }
        let len: usize = a.field("content-length").expect("a length or chunked").parse().unwrap();
        a.body = self.take(len).await;
        a
    }

    /// Whether the proxy closes the connection (with nothing more to read) within 2 s.
    async fn closes(&mut self) -> bool {
        let mut rest = [0u8; 64];
        matches!(timeout(Duration::from_secs(2), self.s.read(&mut rest)).await, Ok(Ok(0)) | Ok(Err(_)))
            && self.buf.is_empty()
    }
}

const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\n";

/// GET, POST with a body, GET, HEAD in one write: cutover's server answers the
/// first, hands the connection (with the rest of the bytes) to hyper's for the
/// POST, and every answer comes back in order with its own framing.
#[tokio::test]
async fn pipelined_requests_cross_the_hand_over_in_order() {
    let (p, blue) = one_site().await;
    let mut c = Conn::open(&p).await;
    let post = b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\n\r\nhello";
    let head = b"HEAD /c HTTP/1.1\r\nHost: shop.test\r\n\r\n";
    c.send(&[GET, post, b"GET /b HTTP/1.1\r\nHost: shop.test\r\n\r\n", head].concat()).await;
    let a = c.response(false).await;
    assert_eq!((a.status_line.as_str(), &a.body[..]), ("HTTP/1.1 200 OK", &b"blue"[..]));
    let echo = c.response(false).await;
    assert_eq!(&echo.body[..], b"hello", "{echo:?}");
    let b = c.response(false).await;
    assert_eq!(&b.body[..], b"blue");
    let h = c.response(true).await;
    assert_eq!(h.field("content-length"), Some("4"), "HEAD keeps the length of the GET: {h:?}");
    // Nothing else arrives: the HEAD answer had no body.
    c.send(GET).await;
    assert_eq!(c.response(false).await.body, b"blue");
    let paths: Vec<_> = blue.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/a", "/echo", "/b", "/c", "/a"]);
}

/// A body of unknown length goes to the client chunked, and the connection
/// carries the next request. (Trailers on this path: `upstream_h1.rs`.)
#[tokio::test]
async fn unknown_lengths_are_chunked() {
    let (p, _blue) = one_site().await;
    let mut c = Conn::open(&p).await;
    c.send(b"GET /stream?chunks=3&ms=20 HTTP/1.1\r\nHost: shop.test\r\n\r\n").await;
    let a = c.response(false).await;
    assert_eq!(a.field("transfer-encoding"), Some("chunked"), "{a:?}");
    assert_eq!(String::from_utf8_lossy(&a.body), "blue chunk 0\nblue chunk 1\nblue chunk 2\n");
    c.send(GET).await;
    assert_eq!(c.response(false).await.body, b"blue");
}

/// A chunked upstream body's trailers reach a client that said `TE: trailers`,
/// in the last chunk, with `Trailer` declaring them; the client's `TE` itself
/// stays on its hop (SPEC §3), and the connection carries the next request.
#[tokio::test]
async fn trailers_come_in_the_last_chunk() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(n @ 1..) = s.read(&mut chunk).await else { return };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        seen.lock().unwrap().push(String::from_utf8_lossy(&head).to_lowercase());
                        let answer: &[u8] = if head.starts_with(b"GET /up ") {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        } else {
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: grpc-status\r\n\r\n\
                              4\r\nbody\r\n0\r\ngrpc-status: 0\r\n\r\n"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let p = Proxy::start(&site("shop", "shop.test", "blue", &[("blue", vec![origin])])).await;
    let mut c = Conn::open(&p).await;
    for _ in 0..2 {
        c.send(b"GET /t HTTP/1.1\r\nHost: shop.test\r\nTE: trailers\r\n\r\n").await;
        let t = c.response(false).await;
        assert_eq!(t.body, b"body");
        assert_eq!(t.field("trailer"), Some("grpc-status"), "{t:?}");
        assert!(t.trailers.contains(&("grpc-status".into(), "0".into())), "{t:?}");
    }
    let heads = heads.lock().unwrap();
    let asked: Vec<&String> = heads.iter().filter(|h| h.starts_with("get /t ")).collect();
    assert_eq!(asked.len(), 2);
    assert!(asked.iter().all(|h| !h.contains("\r\nte:")), "the client's TE reached the upstream: {asked:?}");
}

/// `Connection` from the client stays on its connection, with the fields it
/// names; `Connection: close` is answered in kind and the connection ends.
#[tokio::test]
async fn connection_close_is_answered_and_honoured() {
    let (p, blue) = one_site().await;
    let mut c = Conn::open(&p).await;
    c.send(b"GET /a HTTP/1.1\r\nHost: shop.test\r\nConnection: keep-alive, X-Drop-Me\r\nx-drop-me: 1\r\n\r\n").await;
    assert_eq!(c.response(false).await.body, b"blue");
    c.send(b"GET /b HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").await;
    let a = c.response(false).await;
    assert_eq!(a.field("connection"), Some("close"), "{a:?}");
    assert!(c.closes().await, "the connection stayed open");
    for seen in blue.seen().iter().filter(|s| s.path != "/up") {
        for gone in ["connection", "x-drop-me"] {
            assert!(seen.headers.get(gone).is_none(), "{gone} reached the origin on {}", seen.path);
        }
    }
}

/// cutover's own answers (no site for the host) carry a length and a `Date`,
/// and keep the connection; an HTTP/1.0 request is hyper's, answered in 1.0.
#[tokio::test]
async fn own_answers_have_a_date_and_http10_is_answered_in_kind() {
    let (p, _blue) = one_site().await;
    let mut c = Conn::open(&p).await;
    c.send(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n").await;
    let a = c.response(false).await;
    assert!(a.status_line.starts_with("HTTP/1.1 404 "), "{a:?}");
    let date = a.field("date").expect("a Date field");
    assert!(date.ends_with(" GMT") && date.len() == 29, "{date:?}");
    assert_eq!(a.field("content-length").map(|l| l.parse::<usize>().unwrap()), Some(a.body.len()));
    c.send(GET).await;
    assert_eq!(c.response(false).await.body, b"blue");

    let mut c = Conn::open(&p).await;
    c.send(b"GET /a HTTP/1.0\r\nHost: shop.test\r\n\r\n").await;
    let a = c.response(false).await;
    assert!(a.status_line.starts_with("HTTP/1.0 200"), "{a:?}");
    assert!(c.closes().await, "HTTP/1.0 without keep-alive closes");
}

/// A request head that arrives in pieces is read whole, and one too large
/// for cutover's server still gets hyper's answer on the same connection.
#[tokio::test]
async fn heads_in_pieces_and_a_large_one() {
    let (p, blue) = one_site().await;
    let mut c = Conn::open(&p).await;
    for piece in [&b"GET /piec"[..], b"es HTTP/1.1\r\nHo", b"st: shop.test\r\n", b"\r\n"] {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(c.response(false).await.body, b"blue");
    // Larger than max_header_bytes (64 KiB by default): 431.
    let big = format!("GET /big HTTP/1.1\r\nHost: shop.test\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000));
    c.send(big.as_bytes()).await;
    let a = c.response(false).await;
    assert!(a.status_line.starts_with("HTTP/1.1 431"), "{a:?}");
    let paths: Vec<_> = blue.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/pieces"]);
}

/// Every seed of the request-head fuzz corpus, sent raw and all at once, gets
/// an HTTP answer or a closed connection, never a panic in the server that
/// reads it; the proxy serves normally afterwards.
#[tokio::test]
async fn fuzz_seeds_sent_raw_never_panic_the_server() {
    static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        default(info);
    }));
    let (p, _blue) = one_site().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/request_head");
    let seeds: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    assert!(seeds.len() >= 10, "the corpus has {} seeds", seeds.len());
    let sent = seeds.into_iter().map(|seed| {
        let addr = p.addr;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&seed).await;
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            // An answer, a close, or silence (a head still incomplete) within the limit.
            while let Ok(Ok(n @ 1..)) = timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
                got.extend_from_slice(&chunk[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            assert!(got.is_empty() || got.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(&got));
        })
    });
    for task in sent.collect::<Vec<_>>() {
        task.await.unwrap();
    }
    let mut c = Conn::open(&p).await;
    c.send(GET).await;
    assert_eq!(c.response(false).await.body, b"blue");
    assert!(!PANICKED.load(std::sync::atomic::Ordering::SeqCst), "a connection task panicked (see stderr)");
}
