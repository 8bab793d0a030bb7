//! Nothing leaks (reliability.md §6 F-2): a round of every way a client
//! connection can end — kept alive and closed, gone mid-response, gone while
//! its request waits, refused, after a declined upgrade, mid-upload, cut at
//! the header timeout, left idle, h2c with a stream dropped — leaves no
//! connection counted, no request in flight, and, round after round, no more
//! open file descriptors than the first round left, beyond pooled upstream
//! connections. The only test in this file, so that this process's
//! descriptors are the proxy's and its origin's alone.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{site, Client, Options, Origin, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Writes `bytes` on a new connection, reads at most `read` bytes back (0:
/// none), and drops the connection.
async fn hit_and_run(p: &Proxy, bytes: &[u8], read: usize) {
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; read];
    if read > 0 {
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    }
}

/// Reads until the proxy closes the connection (at most 5 s).
async fn until_closed(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let read_all = async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
    tokio::time::timeout(Duration::from_secs(5), read_all).await.expect("the proxy never closed the connection");
}

async fn round(p: &Proxy) {
    let mut c = Client::connect(p.addr).await;
    for _ in 0..20 {
        assert_eq!(c.get("shop.test", "/").await.unwrap().status, 200);
    }
    drop(c);
    // Gone after the first bytes of a streamed answer, and while a request waits.
    hit_and_run(p, b"GET /stream?chunks=50&ms=10 HTTP/1.1\r\nHost: shop.test\r\n\r\n", 64).await;
    hit_and_run(p, b"GET /slow?ms=300 HTTP/1.1\r\nHost: shop.test\r\n\r\n", 0).await;
    // Refused: a request that could be read two ways.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    until_closed(s).await;
    // A declined upgrade, then the client goes, or closes its side only.
    let upgrade = b"GET /ws HTTP/1.1\r\nHost: shop.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    hit_and_run(p, upgrade, 512).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(upgrade).await.unwrap();
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
    s.shutdown().await.unwrap();
    until_closed(s).await;
    // Gone mid-upload, on both of cutover's body paths.
    hit_and_run(p, b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 100000\r\n\r\nabc", 0).await;
    hit_and_run(p, b"POST /echo HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", 0)
        .await;
    // Half a head, cut at the header timeout; an idle connection, cut at the idle timeout.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    until_closed(s).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
    until_closed(s).await;
    // h2c: answered streams, one dropped while it waits, then the connection dropped.
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let driver = tokio::spawn(conn);
    for path in ["/", "/echo"] {
        let req = Request::post(path).header("host", "shop.test").body(Full::new(Bytes::from_static(b"x"))).unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let req = Request::get("/slow?ms=300").header("host", "shop.test").body(Full::new(Bytes::new())).unwrap();
    let waiting = h2.send_request(req);
    let _ = tokio::time::timeout(Duration::from_millis(50), waiting).await;
    drop(h2);
    driver.abort();
}

/// The sum of every series of `name` in the exposition.
fn total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until no client connection is counted and no request is in flight.
async fn quiet(p: &Proxy) {
    let mut last = String::new();
    for _ in 0..100 {
        last = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
        if total(&last, "cutover_client_connections") == 0.0 && total(&last, "cutover_inflight_requests") == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("connections or requests still counted after the round:\n{last}");
}

/// Eight rounds leave the process with no more descriptors than one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_or_descriptor_outlives_its_client() {
    let blue = Origin::start("blue").await;
    let extra = "limits: { header_read_timeout: 300ms, idle_timeout: 300ms }";
    let p = Proxy::start_with(
        &site("shop", "shop.test", "blue", &[("blue", vec![blue.addr])]),
        Options { extra: extra.into(), ..Default::default() },
    )
    .await;
    // Descriptors other than pooled upstream connections (two each here, the
    // origin being in this process; the pools keep a few, differing from
    // round to round).
    let unexplained = || open_fds().saturating_sub(2 * blue.open_data_connections());
    round(&p).await;
    quiet(&p).await;
    let after_one = unexplained();
    for _ in 0..7 {
        round(&p).await;
        quiet(&p).await;
    }
    let after_eight = unexplained();
    assert!(after_eight <= after_one + 4, "{after_one} descriptors after one round, {after_eight} after eight");
    assert!(blue.open_data_connections() <= 8, "{} upstream connections open", blue.open_data_connections());
}
