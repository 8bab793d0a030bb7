//! Drain of every kind of traffic (SPEC §3 Drain): WebSockets, streaming
//! responses and uploads started on the old target survive a switch; what is
//! still open at the drain deadline is closed, staggered, and counted.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use support::{Origin, Proxy};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket origin that answers every text message with `NAME:message`.
async fn ws_origin(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        if ws.send(Message::text(format!("{name}:{t}"))).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn ws_sites(blue: SocketAddr, green: SocketAddr, drain: &str) -> String {
    format!(
        "  - name: chat\n    hosts: [chat.test]\n    live: blue\n    targets:\n      blue: {{ endpoints: [\"{blue}\"] }}\n      green: {{ endpoints: [\"{green}\"] }}\n    health: {{ interval: 50ms, healthy_threshold: 1 }}\n    switch: {{ drain_timeout: {drain}, close_spread: 300ms }}\n"
    )
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_ws(proxy: SocketAddr) -> Ws {
    let req = http::Request::get(format!("ws://{proxy}/socket"))
        .header("host", "chat.test")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", tokio_tungstenite::tungstenite::handshake::client::generate_key())
        .body(())
        .unwrap();
    tokio_tungstenite::connect_async(req).await.expect("websocket through the proxy").0
}

async fn echo(ws: &mut Ws, text: &str) -> Option<String> {
    ws.send(Message::text(text)).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => Some(t.to_string()),
        _ => None,
    }
}

/// A WebSocket keeps echoing after a switch, counts as in flight on blue, and
/// is closed at blue's drain deadline; a new one reaches green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_survives_switch_and_closes_at_drain_deadline() {
    let (blue, green) = (ws_origin("blue").await, ws_origin("green").await);
    let p = Proxy::start(&ws_sites(blue, green, "1s")).await;
    p.wait_healthy("chat", &["blue", "green"]).await;

    let mut old = open_ws(p.addr).await;
    assert_eq!(echo(&mut old, "hi").await.as_deref(), Some("blue:hi"));
    let switched_at = Instant::now();
    p.switch("chat", "green").await;
    assert_eq!(echo(&mut old, "still").await.as_deref(), Some("blue:still"));
    let (_, site) = p.api("GET", "/v1/sites/chat", None).await;
    assert_eq!(site["targets"]["blue"]["state"], "draining", "{site}");
    assert_eq!(site["targets"]["blue"]["inflight"], 1);

    let mut new = open_ws(p.addr).await;
    assert_eq!(echo(&mut new, "hello").await.as_deref(), Some("green:hello"));

    // Closed at the deadline (1 s) plus at most the spread (300 ms): a FIN, seen as the end of the stream.
    let end = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match old.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the old WebSocket was never closed");
    let closed_after = switched_at.elapsed();
    assert!(closed_after >= Duration::from_millis(950), "closed before the deadline: {closed_after:?}");
    assert_eq!(echo(&mut new, "after").await.as_deref(), Some("green:after"), "the new WebSocket was closed too");

    let (_, site) = p.api("GET", "/v1/sites/chat", None).await;
    assert_eq!(site["targets"]["blue"]["state"], "standby");
    assert_eq!(site["targets"]["blue"]["inflight"], 0);
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(
        metrics.contains(r#"cutover_drain_forced_closes_total{kind="upgrade",site="chat",target="blue"} 1"#),
        "{metrics}"
    );
}

/// The close at the drain deadline is a FIN the client can answer: bytes it
/// still sends after the FIN (a frame that was on its way) are read and
/// dropped, and it gets no reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_closed_at_the_deadline_is_not_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (blue, green) = (ws_origin("blue").await, ws_origin("green").await);
    let p = Proxy::start(&ws_sites(blue, green, "300ms")).await;
    p.wait_healthy("chat", &["blue", "green"]).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let upgrade = "GET /socket HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    s.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the upgrade");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    p.switch("chat", "green").await;
    let eof = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    });
    eof.await.expect("never closed").expect("the deadline's close was a reset");
    // A masked WebSocket text frame that was already on its way, twice: a
    // socket that was closed answers the first with a reset, which fails the second.
    let frame = [0x81, 0x84, 1, 2, 3, 4, b'l' ^ 1, b'a' ^ 2, b't' ^ 3, b'e' ^ 4];
    s.write_all(&frame).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(&frame).await.expect("reset after the FIN");
    s.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    match s.read(&mut buf).await {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => panic!("reset after the FIN: {e}"),
    }
}

/// Switching back to a draining target cancels its drain: its WebSocket stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_back_cancels_the_drain() {
    let (blue, green) = (ws_origin("blue").await, ws_origin("green").await);
    let p = Proxy::start(&ws_sites(blue, green, "400ms")).await;
    p.wait_healthy("chat", &["blue", "green"]).await;
    let mut ws = open_ws(p.addr).await;
    p.switch("chat", "green").await;
    p.switch("chat", "blue").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(echo(&mut ws, "alive").await.as_deref(), Some("blue:alive"));
    let (_, site) = p.api("GET", "/v1/sites/chat", None).await;
    assert_eq!(site["targets"]["blue"]["state"], "live");
}

/// Many WebSockets open at a deadline are closed spread over `close_spread`, not all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_closes_are_staggered() {
    let (blue, green) = (ws_origin("blue").await, ws_origin("green").await);
    let p = Proxy::start(&ws_sites(blue, green, "200ms")).await;
    p.wait_healthy("chat", &["blue", "green"]).await;
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(open_ws(p.addr).await);
    }
    p.switch("chat", "green").await;
    let start = Instant::now();
    let mut closes = Vec::new();
    for mut ws in sockets {
        closes.push(tokio::spawn(async move {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return start.elapsed(),
                    Some(Ok(_)) => {}
                }
            }
        }));
    }
    let mut times = Vec::new();
    for c in closes {
        times.push(tokio::time::timeout(Duration::from_secs(3), c).await.expect("closed").unwrap());
    }
    times.sort();
    let spread = times[times.len() - 1] - times[0];
    assert!(spread >= Duration::from_millis(100), "20 closes within {spread:?}: not staggered ({times:?})");
    assert!(times[times.len() - 1] <= Duration::from_millis(1500), "{times:?}");
}

fn http_sites(blue: SocketAddr, green: SocketAddr, drain: &str) -> String {
    format!(
        "  - name: shop\n    hosts: [shop.test]\n    live: blue\n    targets:\n      blue: {{ endpoints: [\"{blue}\"] }}\n      green: {{ endpoints: [\"{green}\"] }}\n    health: {{ path: /up, interval: 50ms, healthy_threshold: 1 }}\n    switch: {{ drain_timeout: {drain}, close_spread: 100ms }}\n"
    )
}

/// A streaming response (chunks over ~2 s) started on blue completes
/// byte-exact after a switch; a large slow upload started on blue completes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_uploads_complete_across_a_switch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "30s")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;

    let addr = p.addr;
    let stream = tokio::spawn(async move { support::get(addr, "shop.test", "/stream?chunks=10&ms=200").await });
    // An upload of 4 MiB sent in 64 KiB chunks over ~1.3 s.
    let upload = tokio::spawn(async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(2);
        tokio::spawn(async move {
            for i in 0..64u32 {
                let chunk = Bytes::from(vec![(i % 251) as u8; 64 * 1024]);
                if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::post("/echo").header("host", "shop.test").body(body).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let origin = resp.headers()["x-origin"].to_str().unwrap().to_string();
        (resp.status().as_u16(), origin, resp.into_body().collect().await.unwrap().to_bytes())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    p.switch("shop", "green").await;
    assert_eq!(support::get(p.addr, "shop.test", "/").await.body, "green");

    let streamed = stream.await.unwrap();
    assert_eq!(streamed.status, 200);
    let expected: String = (0..10).map(|i| format!("blue chunk {i}\n")).collect();
    assert_eq!(streamed.body, expected);
    let (status, origin, echoed) = upload.await.unwrap();
    assert_eq!((status, origin.as_str()), (200, "blue"));
    let expected: Vec<u8> = (0..64u32).flat_map(|i| vec![(i % 251) as u8; 64 * 1024]).collect();
    assert!(echoed == expected, "upload came back altered ({} bytes)", echoed.len());
}

/// A response still streaming at the drain deadline is cut and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_open_at_the_deadline_is_cut() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "300ms")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/stream?chunks=50&ms=100")
        .header("host", "shop.test")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    assert!(body.frame().await.unwrap().is_ok());
    let start = Instant::now();
    p.switch("shop", "green").await;
    let outcome = support::cut_or_completed(&mut body, Duration::from_secs(3))
        .await
        .expect("the stream was neither cut nor completed");
    assert_eq!(outcome, "cut");
    assert!(start.elapsed() >= Duration::from_millis(280), "cut before the deadline: {:?}", start.elapsed());
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(
        metrics.contains(r#"cutover_drain_forced_closes_total{kind="stream",site="shop",target="blue"} 1"#),
        "{metrics}"
    );
    let (_, site) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(site["targets"]["blue"]["inflight"], 0);
}

/// An upgraded connection keeps its place under `max_connections` while the
/// tunnel is open, and gives it back when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_count_towards_max_connections() {
    let (blue, green) = (ws_origin("blue").await, ws_origin("green").await);
    let opts = support::Options { extra: "limits: { max_connections: 1 }".into(), ..Default::default() };
    let p = Proxy::start_with(&ws_sites(blue, green, "1s"), opts).await;
    p.wait_healthy("chat", &["blue", "green"]).await;
    let mut ws = open_ws(p.addr).await;
    assert_eq!(echo(&mut ws, "x").await.as_deref(), Some("blue:x"));
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_client_connections{listener="http"} 1"#), "{metrics}");
    // The only slot is the tunnel's: a new connection is closed at once.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: chat.test\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await.expect("not closed").unwrap_or(0);
    assert_eq!(n, 0, "a connection beyond max_connections was served");
    drop(ws);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ws2 = open_ws(p.addr).await;
    assert_eq!(echo(&mut ws2, "y").await.as_deref(), Some("blue:y"));
}

/// A request still waiting for its answer at the drain deadline is cut with
/// `504`, on cutover's own client (a `GET`) and on hyper's (a 20 KiB
/// `POST`); counted as forced closes, not as the endpoint's failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_its_answer_at_the_deadline_is_cut() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "300ms")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let addr = p.addr;
    let get = tokio::spawn(async move { support::get(addr, "shop.test", "/slow?ms=5000").await });
    let post = tokio::spawn(async move {
        let mut client = support::Client::connect(addr).await;
        let req = Request::post("/slow?ms=5000")
            .header("host", "shop.test")
            .body(http_body_util::Full::new(Bytes::from(vec![b'x'; 20 * 1024])))
            .unwrap();
        client.send(req).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    p.switch("shop", "green").await;
    for (what, answer) in [("GET", get), ("POST", post)] {
        let answer = tokio::time::timeout(Duration::from_secs(3), answer).await.expect("not cut").unwrap();
        assert_eq!(answer.status, 504, "{what}: {}", answer.body);
        assert!(answer.body.contains("drain deadline"), "{what}: {}", answer.body);
        assert!(start.elapsed() >= Duration::from_millis(280), "{what} cut before the deadline");
    }
    assert_eq!(blue.seen().iter().filter(|s| s.path == "/slow").count(), 2, "both requests reached blue");
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(
        metrics.contains(r#"cutover_drain_forced_closes_total{kind="stream",site="shop",target="blue"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cutover_upstream_errors_total{kind="timeout",site="shop",target="blue"} 0"#),
        "{metrics}"
    );
    let (_, site) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(site["targets"]["blue"]["inflight"], 0, "{site}");
    assert_eq!(site["targets"]["blue"]["state"], "standby", "{site}");
}

/// At a switch the old target's idle pooled connections close at once, and a
/// request still running there closes its connection when it ends instead of
/// pooling it (reliability plan A-8). Back live, the target pools again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_targets_pooled_connections_close_at_the_switch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "10s")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let addr = p.addr;
    let gets: Vec<_> =
        (0..4).map(|_| tokio::spawn(async move { support::get(addr, "shop.test", "/slow?ms=100").await })).collect();
    for g in gets {
        assert_eq!(g.await.unwrap().status, 200);
    }
    assert_eq!(blue.open_data_connections(), 4, "four concurrent requests leave four pooled connections");
    let slow = tokio::spawn(async move { support::get(addr, "shop.test", "/slow?ms=800").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.switch("shop", "green").await;
    assert!(
        support::eventually(Duration::from_secs(1), || blue.open_data_connections() == 1).await,
        "idle connections to blue still open after the switch: {}",
        blue.open_data_connections()
    );
    let answer = slow.await.unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "blue slow done"));
    assert!(
        support::eventually(Duration::from_secs(1), || blue.open_data_connections() == 0).await,
        "the connection of the request that finished on blue was kept"
    );

    p.switch("shop", "blue").await;
    let before = blue.data_connections();
    let mut client = support::Client::connect(addr).await;
    for _ in 0..5 {
        assert_eq!(client.get("shop.test", "/").await.unwrap().body, "blue");
    }
    assert_eq!(blue.data_connections(), before + 1, "five sequential requests on blue share one upstream connection");
    assert_eq!(green.open_data_connections(), 0, "green's pool was retired when blue came back");
}
