//! cutover's own HTTP/1.1 upstream client (requests without a body), against
//! a raw origin that answers each path with scripted bytes: every way a
//! response body can be delimited, interim answers, connection reuse, an
//! upstream that closes a kept-alive connection under a request, and answers
//! that must never reach the client.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::{site, Client, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the raw origin does with a request for one path.
#[derive(Clone)]
enum Script {
    /// Writes these bytes and keeps the connection.
    Answer(&'static [u8]),
    /// Writes these bytes, then closes.
    AnswerAndClose(&'static [u8]),
    /// Writes these bytes, then sends nothing more, keeping the connection open.
    AnswerThenHang(&'static [u8]),
    /// Writes these bytes, then closes 100 ms later.
    AnswerThenCloseLater(&'static [u8]),
    /// The first request on a connection gets `ok`; the next one on the same
    /// connection is read and the connection closed without an answer (the
    /// keep-alive race: the upstream timed the connection out as it arrived).
    CloseOnSecond,
    /// As `CloseOnSecond`, but the first answer comes after 300 ms, so that
    /// requests sent together each open a connection of their own.
    SlowThenCloseOnSecond,
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A raw HTTP/1.1 origin; records `(connection number, method, path)` per request.
struct RawOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(usize, String, String)>>>,
}

impl RawOrigin {
    async fn start(scripts: &[(&str, Script)]) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scripts: Arc<HashMap<String, Script>> =
            Arc::new(scripts.iter().map(|(p, s)| (p.to_string(), s.clone())).collect());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((stream, _)) = listener.accept().await else { return };
                tokio::spawn(serve(stream, n, scripts.clone(), log.clone()));
            }
        });
        RawOrigin { addr, seen }
    }

    /// Connections that carried requests other than health probes.
    fn connections(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        let mut ids: Vec<usize> = seen.iter().filter(|(_, _, p)| p != "/up").map(|(n, _, _)| *n).collect();
        ids.dedup();
        ids.len()
    }

    fn requests_for(&self, path: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|(_, _, p)| p == path).count()
    }
}

async fn serve(
    mut stream: TcpStream,
    n: usize,
    scripts: Arc<HashMap<String, Script>>,
    seen: Arc<Mutex<Vec<(usize, String, String)>>>,
) {
    let mut buf = Vec::new();
    let mut served = 0;
    while let Some((method, path)) = support::next_request(&mut stream, &mut buf).await {
        seen.lock().unwrap().push((n, method, path.clone()));
        let script =
            if path == "/up" { Script::Answer(OK) } else { scripts.get(&path).cloned().expect("scripted path") };
        match script {
            Script::Answer(bytes) => {
                if stream.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Script::AnswerAndClose(bytes) => {
                let _ = stream.write_all(bytes).await;
                return;
            }
            Script::AnswerThenHang(bytes) => {
                let _ = stream.write_all(bytes).await;
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                return;
            }
            Script::AnswerThenCloseLater(bytes) => {
                let _ = stream.write_all(bytes).await;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                return;
            }
            Script::CloseOnSecond if served == 0 => {
                if stream.write_all(OK).await.is_err() {
                    return;
                }
            }
            Script::CloseOnSecond => return,
            Script::SlowThenCloseOnSecond if served == 0 => {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                if stream.write_all(OK).await.is_err() {
                    return;
                }
            }
            Script::SlowThenCloseOnSecond => return,
        }
        served += 1;
    }
}

async fn proxy_for(origin: &RawOrigin) -> Proxy {
    proxy_with(origin, "").await
}

/// A proxy in front of the origin at `addr`.
async fn proxy_for_addr(addr: SocketAddr) -> Proxy {
    let sites = site("raw", "raw.test", "blue", &[("blue", vec![addr])]);
    let p = Proxy::start(&sites).await;
    p.wait_healthy("raw", &["blue"]).await;
    p
}

/// A proxy in front of `origin` with `extra` top-level YAML.
async fn proxy_with(origin: &RawOrigin, extra: &str) -> Proxy {
    let sites = site("raw", "raw.test", "blue", &[("blue", vec![origin.addr])]);
    let p = Proxy::start_with(&sites, support::Options { extra: extra.into(), ..Default::default() }).await;
    p.wait_healthy("raw", &["blue"]).await;
    p
}

/// A `POST` with a one-byte body: status, headers and body, or the transport error.
async fn post(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> Result<(u16, http::HeaderMap, Bytes), hyper::Error> {
    post_body(client, path, Bytes::from_static(b"x")).await
}

/// A `POST` with `body` (over 16 KiB: hyper's upstream client carries it, not cutover's own).
async fn post_body(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    body: Bytes,
) -> Result<(u16, http::HeaderMap, Bytes), hyper::Error> {
    client.ready().await?;
    let req = Request::post(path).header("host", "raw.test").body(Full::new(body)).unwrap();
    let resp = client.send_request(req).await?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    Ok((status, headers, resp.into_body().collect().await?.to_bytes()))
}

/// One request with `method` on a kept-alive client connection: status, body
/// and trailers (it asks for them), or the transport error.
async fn fetch(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
) -> Result<(u16, http::HeaderMap, Bytes, Option<http::HeaderMap>), hyper::Error> {
    client.ready().await?;
    let req = Request::builder().method(method).uri(path).header("host", "raw.test").header("te", "trailers");
    let req = req.body(Full::default()).unwrap();
    let resp = client.send_request(req).await?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let collected = resp.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    Ok((status, headers, collected.to_bytes(), trailers))
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// Chunked bodies (split chunks, extensions, trailers) are decoded and
/// re-framed for the client; the connection is reused afterwards.
#[tokio::test]
async fn chunked_body_with_extensions_and_trailers() {
    let origin = RawOrigin::start(&[(
        "/chunked",
        Script::Answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
              5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-checksum: abc\r\n\r\n",
        ),
    )])
    .await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    for _ in 0..3 {
        let (status, headers, body, trailers) = fetch(&mut c, "GET", "/chunked").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "hello world");
        assert_eq!(trailers.expect("trailers relayed")["x-checksum"], "abc");
        assert!(headers.get("content-length").is_none());
    }
    assert_eq!(origin.connections(), 1, "the upstream connection was not reused");
    // A client that did not say `TE: trailers` gets the body without them.
    let mut raw = TcpStream::connect(p.addr).await.unwrap();
    raw.write_all(b"GET /chunked HTTP/1.1\r\nHost: raw.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("world"), "{answer:?}");
    assert!(!answer.contains("x-checksum: abc"), "trailers sent without TE: trailers: {answer:?}");
}

/// Content-Length bodies go through whole; one upstream connection carries
/// every request of a kept-alive client.
#[tokio::test]
async fn keep_alive_reuses_one_upstream_connection() {
    let origin = RawOrigin::start(&[("/ok", Script::Answer(OK))]).await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    for _ in 0..20 {
        let (status, headers, body, _) = fetch(&mut c, "GET", "/ok").await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        assert_eq!(headers["content-length"], "2");
    }
    assert_eq!(origin.connections(), 1);
}

/// The upstream's hop-by-hop fields, and the fields its `Connection` names,
/// stay on the upstream connection; the rest of the head reaches the client.
#[tokio::test]
async fn hop_by_hop_response_fields_stay_upstream() {
    let origin = RawOrigin::start(&[(
        "/hop",
        Script::Answer(
            b"HTTP/1.1 200 OK\r\nx-secret: 1\r\nconnection: keep-alive, x-secret\r\nkeep-alive: timeout=5\r\n\
              proxy-connection: keep-alive\r\nupgrade: foo\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok",
        ),
    )])
    .await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    for _ in 0..2 {
        let (status, headers, body, _) = fetch(&mut c, "GET", "/hop").await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        assert_eq!(headers["x-kept"], "yes");
        assert_eq!(headers["content-length"], "2");
        for gone in ["x-secret", "keep-alive", "proxy-connection", "upgrade", "connection"] {
            assert!(headers.get(gone).is_none(), "{gone} reached the client: {headers:?}");
        }
    }
    assert_eq!(origin.connections(), 1, "the upstream connection was not reused");
}

/// A body that ends when the upstream closes is relayed whole, and that
/// connection is not pooled.
#[tokio::test]
async fn close_delimited_body() {
    let origin =
        RawOrigin::start(&[("/eof", Script::AnswerAndClose(b"HTTP/1.1 200 OK\r\nx-kind: eof\r\n\r\nuntil the end"))])
            .await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    for _ in 0..2 {
        let (status, headers, body, _) = fetch(&mut c, "GET", "/eof").await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"until the end"[..]));
        assert_eq!(headers["x-kind"], "eof");
    }
    assert_eq!(origin.connections(), 2);
}

/// HEAD, 204 and 304 answers have no body whatever their headers say, and
/// leave the connection reusable; 1xx interim answers are skipped; an empty
/// field value passes.
#[tokio::test]
async fn bodiless_answers_and_interim_responses() {
    let origin = RawOrigin::start(&[
        ("/head", Script::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")),
        ("/204", Script::Answer(b"HTTP/1.1 204 No Content\r\nx-empty:\r\ncontent-length: 0\r\n\r\n")),
        ("/304", Script::Answer(b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n")),
        (
            "/early",
            Script::Answer(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal"),
        ),
    ])
    .await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    let (status, headers, body, _) = fetch(&mut c, "HEAD", "/head").await.unwrap();
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(headers["content-length"], "1234");
    let (status, headers, body, _) = fetch(&mut c, "GET", "/204").await.unwrap();
    assert_eq!((status, body.len()), (204, 0));
    assert_eq!(headers["x-empty"], "", "an empty field value is kept");
    assert!(headers.get("content-length").is_none(), "a 204 never has Content-Length: {headers:?}");
    let (status, headers, _, _) = fetch(&mut c, "GET", "/304").await.unwrap();
    assert_eq!(status, 304);
    assert_eq!(headers["etag"], "\"x\"");
    let (status, _, body, _) = fetch(&mut c, "GET", "/early").await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"final"[..]));
    assert_eq!(origin.connections(), 1, "bodiless answers must leave the connection reusable");
}

/// A pooled connection the upstream closes as the next request arrives: an
/// idempotent request is retried on a new connection (the client sees 200),
/// a `POST` is not (502: it may have been acted on).
#[tokio::test]
async fn stale_pooled_connection_retried_only_when_idempotent() {
    let origin = RawOrigin::start(&[("/race", Script::CloseOnSecond)]).await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    for _ in 0..4 {
        let (status, _, body, _) = fetch(&mut c, "GET", "/race").await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    }
    // Every second GET found its pooled connection closed under it and went again.
    assert_eq!(origin.requests_for("/race"), 7);
    // The pool now holds the last GET's connection, which the upstream closes under the POST.
    let (status, _, _, _) = fetch(&mut c, "POST", "/race").await.unwrap();
    assert_eq!(status, 502, "a POST must not be sent twice");
    assert_eq!(origin.seen.lock().unwrap().iter().filter(|(_, m, _)| m == "POST").count(), 1);
    let (status, _, _, _) = fetch(&mut c, "GET", "/race").await.unwrap();
    assert_eq!(status, 200, "the next request gets a fresh connection");
}

/// A request that is not retried on a stale connection (a `POST`; anything
/// with a streamed body) takes a pooled connection only when it was idle
/// less than 500 ms, so it does not race an upstream's keep-alive timer
/// (reliability plan B-7); idempotent requests still reuse older ones.
#[tokio::test]
async fn an_unretried_request_takes_only_a_recently_used_connection() {
    let origin = RawOrigin::start(&[("/race", Script::CloseOnSecond)]).await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    let upload = Bytes::from(vec![b'u'; 20 * 1024]);
    // A small POST (cutover's own client), then a 20 KiB one (hyper's), each
    // after its connection was idle 700 ms: each on a new connection.
    assert_eq!(fetch(&mut c, "GET", "/race").await.unwrap().0, 200);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(fetch(&mut c, "POST", "/race").await.unwrap().0, 200, "a POST took a connection idle 700 ms");
    assert_eq!(post_body(&mut c, "/race", upload.clone()).await.unwrap().0, 200);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(post_body(&mut c, "/race", upload).await.unwrap().0, 200, "an upload took a connection idle 700 ms");
    assert_eq!(origin.connections(), 4);
    // The connections idle that long were kept: a GET still reuses one
    // (which this upstream closes under it, so it is retried on a new one).
    assert_eq!(fetch(&mut c, "GET", "/race").await.unwrap().0, 200);
    assert_eq!(origin.requests_for("/race"), 6);
}

/// An upstream that closed every pooled connection at once (a restart): the
/// retry after the first stale one takes a new connection, instead of trying
/// the next stale ones until the attempts run out.
#[tokio::test]
async fn retry_after_a_stale_connection_takes_a_new_one() {
    let origin = RawOrigin::start(&[("/restart", Script::SlowThenCloseOnSecond)]).await;
    let p = proxy_for(&origin).await;
    // Six requests at once: six upstream connections, all pooled afterwards,
    // each of which the upstream closes under its next request.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect(p.addr).await);
    }
    let answers = futures_util::future::join_all(clients.iter_mut().map(|c| fetch(c, "GET", "/restart"))).await;
    for a in answers {
        assert_eq!(a.unwrap().0, 200);
    }
    assert_eq!(origin.connections(), 6);
    let mut c = connect(p.addr).await;
    let (status, _, body, _) = fetch(&mut c, "GET", "/restart").await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"ok"[..]), "the retry must not take another stale connection");
    // One stale connection tried, then a new one.
    assert_eq!(origin.requests_for("/restart"), 8);
}

/// Answers that could be read two ways or are broken never reach the client
/// as if they were fine.
#[tokio::test]
async fn invalid_answers_are_502_or_cut() {
    let big_head: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok", "a".repeat(70 * 1024))
            .into_bytes()
            .into_boxed_slice(),
    );
    let origin = RawOrigin::start(&[
        ("/garbage", Script::AnswerAndClose(b"SMTP ready\r\n\r\n")),
        ("/two-lengths", Script::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!")),
        ("/bad-length", Script::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok")),
        ("/big-head", Script::Answer(big_head)),
        ("/short", Script::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")),
        (
            "/bad-chunk",
            Script::AnswerAndClose(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ),
        ("/silent", Script::AnswerAndClose(b"")),
        // An obsolete folded line, and a bare CR inside a field value.
        ("/obs-fold", Script::Answer(b"HTTP/1.1 200 OK\r\nx-a: one\r\n two\r\ncontent-length: 2\r\n\r\nok")),
        ("/bare-cr", Script::Answer(b"HTTP/1.1 200 OK\r\nx-a: one\rtwo\r\ncontent-length: 2\r\n\r\nok")),
        // Codings cutover cannot undo would reach the client unmarked.
        ("/gzip-chunked", Script::Answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n")),
        ("/gzip", Script::AnswerAndClose(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzipped")),
        (
            "/chunked-twice",
            Script::Answer(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
        ),
    ])
    .await;
    let p = proxy_for(&origin).await;
    let refused = [
        "/garbage",
        "/two-lengths",
        "/bad-length",
        "/big-head",
        "/silent",
        "/gzip-chunked",
        "/gzip",
        "/chunked-twice",
        "/obs-fold",
        "/bare-cr",
    ];
    for path in refused {
        let mut c = connect(p.addr).await;
        let (status, _, _, _) = fetch(&mut c, "GET", path).await.unwrap();
        assert_eq!(status, 502, "{path}");
    }
    for path in ["/short", "/bad-chunk"] {
        let mut c = connect(p.addr).await;
        // A 502 when the upstream failed before any of the response went out;
        // once it has, the body must end in an error. Never a complete 200.
        let r = fetch(&mut c, "GET", path).await;
        assert!(matches!(r, Ok((502, ..)) | Err(_)), "{path}: {r:?}");
    }
    // The same through hyper's client (a request with a body).
    for path in ["/gzip-chunked", "/gzip", "/chunked-twice"] {
        let mut c = connect(p.addr).await;
        let (status, _, _) = post(&mut c, path).await.unwrap();
        assert_eq!(status, 502, "POST {path}");
    }
}

/// An upstream that breaks off a body it had started (it closes 9 bytes into
/// 100) counts as the target's `reset`, once each time, whether the client
/// got a `502` (nothing had gone out) or the start of the answer, on both
/// upstream clients.
#[tokio::test]
async fn a_body_broken_off_counts_as_a_reset() {
    const SHORT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this";
    // 1 MiB announced, 100 KiB sent: the rest would be spliced (Linux).
    let big: &'static [u8] = Box::leak(
        [&b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n"[..], &vec![b'b'; 100 * 1024]]
            .concat()
            .into_boxed_slice(),
    );
    let origin = RawOrigin::start(&[
        ("/short", Script::AnswerAndClose(SHORT)),
        ("/short-later", Script::AnswerThenCloseLater(SHORT)),
        ("/big-short", Script::AnswerThenCloseLater(big)),
    ])
    .await;
    let p = proxy_for(&origin).await;
    let reset = |n: usize| format!(r#"cutover_upstream_errors_total{{kind="reset",site="raw",target="blue"}} {n}"#);
    let mut c = connect(p.addr).await;
    let r = fetch(&mut c, "GET", "/short").await;
    assert!(matches!(r, Ok((502, ..)) | Err(_)), "{r:?}");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(&reset(1)), "{metrics}");
    let mut c = connect(p.addr).await;
    assert!(fetch(&mut c, "GET", "/short-later").await.is_err(), "the start of the answer, then a cut");
    let mut c = connect(p.addr).await;
    let upload = Bytes::from(vec![b'u'; 20 * 1024]);
    assert!(post_body(&mut c, "/short-later", upload).await.is_err(), "hyper's client: a cut");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(&reset(3)), "{metrics}");
    let mut c = connect(p.addr).await;
    assert!(fetch(&mut c, "GET", "/big-short").await.is_err(), "a large body cut short");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(&reset(4)), "{metrics}");
}

/// An upstream that goes silent in the middle of a body is cut after
/// `upstream_response_timeout` of silence, on both upstream clients; a slow
/// stream that keeps sending is not.
#[tokio::test]
async fn an_upstream_silent_mid_body_is_cut() {
    let origin = RawOrigin::start(&[
        ("/hang", Script::AnswerThenHang(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")),
        ("/hang-chunked", Script::AnswerThenHang(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")),
    ])
    .await;
    let p = proxy_with(&origin, "limits: { upstream_response_timeout: 300ms }").await;
    for path in ["/hang", "/hang-chunked"] {
        let mut c = connect(p.addr).await;
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), fetch(&mut c, "GET", path)).await;
        assert!(matches!(r, Ok(Err(_))), "GET {path}: {r:?}");
        let mut c = connect(p.addr).await;
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), post(&mut c, path)).await;
        assert!(matches!(r, Ok(Err(_))), "POST {path}: {r:?}");
    }
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(
        metrics.contains(r#"cutover_upstream_errors_total{kind="timeout",site="raw",target="blue"} 4"#),
        "{metrics}"
    );

    // Chunks every 150 ms for 1.2 s: never 300 ms of silence.
    let blue = support::Origin::start("blue").await;
    let sites = site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]);
    let extra = "limits: { upstream_response_timeout: 300ms }".to_string();
    let p = Proxy::start_with(&sites, support::Options { extra, ..Default::default() }).await;
    let a = Client::connect(p.addr).await.get("shop.test", "/stream?chunks=8&ms=150").await.unwrap();
    assert_eq!((a.status, a.body.lines().count()), (200, 8), "{}", a.body);
}

/// A response with both Content-Length and Transfer-Encoding gets 502 on both
/// upstream clients (RFC 9112 §6.3: "ought to be handled as an error") and
/// its connection is dropped; bytes left over after a body also keep a
/// connection out of the pool.
#[tokio::test]
async fn ambiguous_framing_is_not_trusted_again() {
    let origin = RawOrigin::start(&[
        (
            "/both",
            Script::Answer(
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n",
            ),
        ),
        ("/extra", Script::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")),
        // HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1): read, but not trusted again.
        (
            "/http10-chunked",
            Script::Answer(
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n",
            ),
        ),
    ])
    .await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    for _ in 0..2 {
        let (status, _, body, _) = fetch(&mut c, "GET", "/both").await.unwrap();
        assert_eq!(status, 502, "{body:?}");
    }
    assert_eq!(origin.connections(), 2);
    for _ in 0..2 {
        let (status, _, body, _) = fetch(&mut c, "GET", "/extra").await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    }
    assert_eq!(origin.connections(), 4);
    for _ in 0..2 {
        let (status, _, body, _) = fetch(&mut c, "GET", "/http10-chunked").await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"wiki"[..]));
    }
    assert_eq!(origin.connections(), 6);
    // Through hyper's client (a request with a body) too.
    let mut c = connect(p.addr).await;
    let (status, _, _) = post(&mut c, "/both").await.unwrap();
    assert_eq!(status, 502);
}

/// A client that goes away mid-body takes the upstream connection with it
/// (never pooled half-read); the next request still works.
#[tokio::test]
async fn abandoned_body_is_not_pooled() {
    static BIG: std::sync::OnceLock<&'static [u8]> = std::sync::OnceLock::new();
    let big = *BIG.get_or_init(|| {
        let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 8 << 20).into_bytes();
        v.extend(std::iter::repeat_n(b'x', 8 << 20));
        Box::leak(v.into_boxed_slice())
    });
    let origin = RawOrigin::start(&[("/big", Script::Answer(big)), ("/ok", Script::Answer(OK))]).await;
    let p = proxy_for(&origin).await;
    let mut raw = TcpStream::connect(p.addr).await.unwrap();
    raw.write_all(b"GET /big HTTP/1.1\r\nhost: raw.test\r\n\r\n").await.unwrap();
    let mut first = [0u8; 1024];
    let _ = raw.read(&mut first).await.unwrap();
    drop(raw);
    let mut c = Client::connect(p.addr).await;
    let a = c.get("raw.test", "/ok").await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    assert_eq!(origin.connections(), 2, "the half-read connection was reused");
}

/// The upstream's fields reach the client as it sent them, whichever server
/// writes the answer: cutover's own HTTP/1.1 server (which copies them in one
/// piece), hyper's HTTP/1.1 server after a hand-over, and hyper's HTTP/2
/// server (both get them in a map). Repeated fields stay repeated, an empty
/// value stays empty, any spacing after a colon is read as the upstream meant
/// it, the upstream's `Date` is kept (not doubled), and a list-form
/// `Content-Length` goes out as one number.
#[tokio::test]
async fn upstream_fields_reach_every_kind_of_client() {
    const FIELDS: &[u8] = b"HTTP/1.1 200 OK\r\nServer: raw\r\nSet-Cookie: a=1\r\nX-Empty: \r\nset-cookie: b=2\r\n\
        Content-Length: 2, 2\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nConnection: keep-alive\r\nX-Multi: 1\r\n\
        x-multi: 2\r\nX-Tight:v1\r\nX-Spaced: \t v2\r\n\r\nok";
    let origin = RawOrigin::start(&[("/fields", Script::Answer(FIELDS))]).await;
    let p = proxy_for(&origin).await;
    let check = |via: &str, headers: &http::HeaderMap| {
        let all = |name: &str| headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>();
        assert_eq!(all("set-cookie"), ["a=1", "b=2"], "{via}: {headers:?}");
        assert_eq!(all("x-multi"), ["1", "2"], "{via}");
        assert_eq!(all("x-empty"), [""], "{via}");
        assert_eq!(all("server"), ["raw"], "{via}");
        assert_eq!((all("x-tight"), all("x-spaced")), (vec!["v1"], vec!["v2"]), "{via}");
        assert_eq!(all("date"), ["Mon, 01 Jan 2024 00:00:00 GMT"], "{via}");
        assert!(headers.get("connection").is_none(), "{via}");
        // (h2 has its own framing; hyper's client passes a list-form length on as it is.)
        if !via.starts_with("h2") && !via.contains("hyper's client") {
            assert_eq!(all("content-length"), ["2"], "{via}");
        }
    };

    // cutover's own server: the bytes on the wire.
    let raw = b"GET /fields HTTP/1.1\r\nhost: raw.test\r\nconnection: close\r\n\r\n";
    let wire = support::raw_exchange(p.addr, raw).await;
    let (head, body) = wire.split_once("\r\n\r\n").unwrap();
    assert_eq!(body, "ok");
    assert_eq!(head.matches("Content-Length").count() + head.matches("content-length").count(), 1, "{head}");
    assert!(head.contains("\r\nSet-Cookie: a=1\r\n") && head.contains("\r\nX-Empty: \r\n"), "{head}");
    let mut c = connect(p.addr).await;
    let (status, headers, body, _) = fetch(&mut c, "GET", "/fields").await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    check("own server", &headers);
    let (status, headers, body, _) = fetch(&mut c, "HEAD", "/fields").await.unwrap();
    assert_eq!((status, body.len()), (200, 0));
    check("own server, HEAD", &headers);

    // hyper's HTTP/1.1 server: a POST with a body hands the connection over
    // (and goes upstream with hyper's client); the GET after it is answered
    // by cutover's client and hyper's server.
    c.ready().await.unwrap();
    let post = Request::post("/fields").header("host", "raw.test").body(Full::new(Bytes::from_static(b"x"))).unwrap();
    let resp = c.send_request(post).await.unwrap();
    check("hyper h1, POST through hyper's client", resp.headers());
    assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"ok");
    let (_, headers, _, _) = fetch(&mut c, "GET", "/fields").await.unwrap();
    check("hyper h1, GET after the hand-over", &headers);

    // hyper's HTTP/2 server.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let exec = hyper_util::rt::TokioExecutor::new();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(exec, TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let get = Request::get("http://raw.test/fields").body(Full::<Bytes>::default()).unwrap();
    let resp = h2.send_request(get).await.unwrap();
    check("h2", resp.headers());
    assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"ok");
}

/// An unregistered status code passes with an empty reason phrase (never a
/// made-up one such as hyper's `<none>`), from either of cutover's servers
/// and upstream clients; a code above 599 is not HTTP's and gets `502`, on
/// either upstream client.
#[tokio::test]
async fn unregistered_status_codes_pass_and_codes_above_599_are_refused() {
    let origin = RawOrigin::start(&[
        ("/499", Script::Answer(b"HTTP/1.1 499 Client Closed\r\ncontent-length: 0\r\n\r\n")),
        ("/499-bare", Script::Answer(b"HTTP/1.1 499 \r\ncontent-length: 0\r\n\r\n")),
        ("/600", Script::Answer(b"HTTP/1.1 600 Beyond\r\ncontent-length: 0\r\n\r\n")),
    ])
    .await;
    let p = proxy_for(&origin).await;
    let wire = support::raw_exchange(p.addr, b"GET /499 HTTP/1.1\r\nhost: raw.test\r\nconnection: close\r\n\r\n").await;
    assert!(wire.starts_with("HTTP/1.1 499 \r\n"), "{wire}");
    // HTTP/1.0 and chunked uploads are served by hyper's server; a 20 KiB
    // body goes by hyper's upstream client.
    let big = "x".repeat(20 * 1024);
    for path in ["/499", "/499-bare"] {
        for (head, body) in
            [("HTTP/1.0\r\n", ""), ("HTTP/1.1\r\nconnection: close\r\ncontent-length: 20480\r\n", &big[..])]
        {
            let req = format!("POST {path} {head}host: raw.test\r\n\r\n{body}");
            let wire = support::raw_exchange(p.addr, req.as_bytes()).await;
            let line = wire.lines().next().unwrap_or_default();
            let reason = line.strip_prefix("HTTP/1.0 499 ").or_else(|| line.strip_prefix("HTTP/1.1 499 "));
            // The upstream's own phrase when hyper's client carried it, else none.
            assert!(matches!(reason, Some("" | "Client Closed")), "{path}: {wire}");
        }
        let req = format!("POST {path} HTTP/1.1\r\nhost: raw.test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        let wire = support::raw_exchange(p.addr, req.as_bytes()).await;
        assert!(wire.starts_with("HTTP/1.1 499 ") && !wire.contains("<none>"), "{path} chunked: {wire}");
    }
    let wire = support::raw_exchange(p.addr, b"GET /600 HTTP/1.1\r\nhost: raw.test\r\nconnection: close\r\n\r\n").await;
    assert!(wire.starts_with("HTTP/1.1 502 "), "{wire}");
    // A 20 KiB body: hyper's client carries it.
    let mut c = connect(p.addr).await;
    let req = Request::post("/600").header("host", "raw.test").body(Full::new(Bytes::from(vec![b'x'; 20 * 1024])));
    let resp = c.send_request(req.unwrap()).await.unwrap();
    assert_eq!(resp.status(), 502, "hyper's client");
}

/// Looking for a recently used connection, a `POST` looks past older ones
/// in the pool instead of opening a new one.
#[tokio::test]
async fn an_unretried_request_finds_a_recent_connection_behind_older_ones() {
    let origin = support::Origin::start("blue").await;
    let p = proxy_for_addr(origin.addr).await;
    // Two upstream connections at once, idle together 700 ms.
    let addr = p.addr;
    let slow = || tokio::spawn(async move { support::get(addr, "raw.test", "/slow?ms=150").await });
    let (a, b) = (slow(), slow());
    assert_eq!((a.await.unwrap().status, b.await.unwrap().status), (200, 200));
    assert_eq!(origin.data_connections(), 2);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    // A GET takes the oldest and makes it the most recent; a POST then skips the other.
    let mut c = connect(p.addr).await;
    assert_eq!(fetch(&mut c, "GET", "/").await.unwrap().0, 200);
    assert_eq!(fetch(&mut c, "POST", "/").await.unwrap().0, 200);
    assert_eq!(origin.data_connections(), 2, "the POST opened a new connection");
}

/// An upstream's `Keep-Alive: timeout=N` shortens how long its idle
/// connections are kept (N less a margin: 500 ms for N = 1), for both upstream
/// clients, so none is reused just as the upstream closes it (reliability
/// plan B-7); within that time a connection is reused. The field stays upstream.
#[tokio::test]
async fn an_upstream_keep_alive_timeout_shortens_pooling() {
    const KEEPS_1S: &[u8] = b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=1, max=100\r\ncontent-length: 2\r\n\r\nok";
    let origin = RawOrigin::start(&[("/ka", Script::Answer(KEEPS_1S))]).await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    let pause = |ms| tokio::time::sleep(std::time::Duration::from_millis(ms));
    for _ in 0..3 {
        let (status, headers, _, _) = fetch(&mut c, "GET", "/ka").await.unwrap();
        assert_eq!(status, 200);
        assert!(headers.get("keep-alive").is_none(), "{headers:?}");
        pause(100).await;
    }
    assert_eq!(origin.connections(), 1, "reused within the upstream's keep-alive");
    pause(700).await;
    assert_eq!(fetch(&mut c, "GET", "/ka").await.unwrap().0, 200);
    assert_eq!(origin.connections(), 2, "reused although the upstream keeps it only 1 s");
    // hyper's client (bodies over 16 KiB) learns it too: another upstream.
    let origin = RawOrigin::start(&[("/ka", Script::Answer(KEEPS_1S))]).await;
    let p = proxy_for(&origin).await;
    let mut c = connect(p.addr).await;
    let upload = Bytes::from(vec![b'u'; 20 * 1024]);
    assert_eq!(post_body(&mut c, "/ka", upload.clone()).await.unwrap().0, 200);
    pause(100).await;
    assert_eq!(post_body(&mut c, "/ka", upload.clone()).await.unwrap().0, 200);
    assert_eq!(origin.connections(), 1);
    pause(700).await;
    let (status, headers, _) = post_body(&mut c, "/ka", upload).await.unwrap();
    assert!(status == 200 && headers.get("keep-alive").is_none(), "{status} {headers:?}");
    assert_eq!(origin.connections(), 2, "hyper's client reused a connection the upstream keeps only 1 s");
}
