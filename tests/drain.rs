//! Drain of every kind of traffic (SPEC §3 Drain): WebSockets, streaming
//! responses and uploads started on the old target survive a switch; what is
//! still open at the drain deadline is closed, staggered, and counted; a
//! switch back or a rollback cancels a drain. The proxy's own shutdown drains
//! too (SPEC §1 Signals): h1 answers close their connection, h2 gets GOAWAY.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use support::{h2_frames as h2, Origin, Proxy};
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

/// A client-masked WebSocket frame (RFC 6455 §5.2); payloads up to 64 KiB.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// The next whole (unmasked) frame from the server: its first byte and payload;
/// `None` once the connection ends, `Err` on a reset.
async fn read_ws_frame(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    use tokio::io::AsyncReadExt;
    loop {
        if buf.len() >= 2 {
            assert_eq!(buf[1] & 0x80, 0, "a server frame is never masked");
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if len != usize::MAX && buf.len() >= at + len {
                let frame = (buf[0], buf[at..at + len].to_vec());
                buf.drain(..at + len);
                return Ok(Some(frame));
            }
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await? {
            0 => return Ok(None),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A-4 with a client that closes: a WebSocket opened on blue echoes 400
/// messages of mixed sizes, sent in pipelined bursts, every one in order and
/// from blue, before and after a switch to green; then the client's close
/// (1000) goes through the tunnel, the origin's close frame with 1000 comes
/// back, and the connection ends with a FIN, not a reset. The tunnel is then
/// no longer in flight, so blue's drain ends long before its deadline with
/// no forced close; a WebSocket opened after the switch lands on green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_closed_by_its_client_echoes_in_order_and_ends_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (blue, green) = (ws_origin("blue").await, ws_origin("green").await);
    let p = Proxy::start(&ws_sites(blue, green, "60s")).await;
    p.wait_healthy("chat", &["blue", "green"]).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let upgrade = "GET /socket HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    s.write_all(upgrade.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the upgrade");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
    buf.drain(..end);
    let message = |i: usize| match i % 5 {
        0 => format!("{i}:{}", "x".repeat(1000 + i)),
        _ => format!("m{i}"),
    };
    for burst in 0..20 {
        if burst == 10 {
            p.switch("chat", "green").await;
        }
        let sent: Vec<usize> = (burst * 20..burst * 20 + 20).collect();
        let frames: Vec<u8> = sent.iter().flat_map(|&i| ws_frame(0x1, message(i).as_bytes())).collect();
        s.write_all(&frames).await.unwrap();
        for &i in &sent {
            let frame = tokio::time::timeout(Duration::from_secs(3), read_ws_frame(&mut s, &mut buf)).await;
            let (first, payload) = frame.expect("no echo within 3 s").unwrap().expect("closed mid-conversation");
            assert_eq!(first, 0x81, "echo {i} is no final text frame");
            assert_eq!(String::from_utf8(payload).unwrap(), format!("blue:{}", message(i)), "echo {i}");
        }
    }
    let (_, site) = p.api("GET", "/v1/sites/chat", None).await;
    assert_eq!(
        (site["targets"]["blue"]["state"].as_str(), site["targets"]["blue"]["inflight"].as_u64()),
        (Some("draining"), Some(1))
    );
    s.write_all(&ws_frame(0x8, &[0x03, 0xe8, b'b', b'y', b'e'])).await.unwrap();
    let close = tokio::time::timeout(Duration::from_secs(3), read_ws_frame(&mut s, &mut buf)).await;
    let (first, payload) = close.expect("no close frame within 3 s").unwrap().expect("closed without a close frame");
    assert_eq!(first, 0x88, "not a close frame: {payload:?}");
    assert_eq!(payload.get(..2), Some(&[0x03, 0xe8][..]), "close code is not 1000: {payload:?}");
    let after = tokio::time::timeout(Duration::from_secs(3), read_ws_frame(&mut s, &mut buf)).await;
    assert!(matches!(after.expect("the connection stayed open after the close handshake"), Ok(None)), "not a FIN");
    s.shutdown().await.unwrap();
    drained(&p, "chat", "blue").await;
    let mut state = String::new();
    for _ in 0..250 {
        let (_, site) = p.api("GET", "/v1/sites/chat", None).await;
        state = site["targets"]["blue"]["state"].as_str().unwrap_or_default().to_string();
        if state != "draining" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, "standby", "blue's drain did not end with its last tunnel");
    assert_eq!(forced_closes(&p, "chat").await, 0);
    let mut new = open_ws(p.addr).await;
    assert_eq!(echo(&mut new, "after").await.as_deref(), Some("green:after"));
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

/// The sum of `cutover_drain_forced_closes_total` over `site`'s series (0 when it has none).
async fn forced_closes(p: &Proxy, site: &str) -> u64 {
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    metrics
        .lines()
        .filter(|l| l.starts_with("cutover_drain_forced_closes_total{") && l.contains(&format!("site=\"{site}\"")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Waits (5 s at most) until `target` of `site` has nothing in flight; its view then.
async fn drained(p: &Proxy, site: &str, target: &str) -> serde_json::Value {
    for _ in 0..250 {
        let (_, s) = p.api("GET", &format!("/v1/sites/{site}"), None).await;
        if s["targets"][target]["inflight"] == 0 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{target} of {site} still has work in flight after 5 s");
}

/// Starts `n` streaming GETs (`/stream?chunks=10&ms=150`, ~1.5 s) and waits until `origin` has them all.
async fn start_streams(p: &Proxy, origin: &Origin, n: usize) -> Vec<tokio::task::JoinHandle<support::Answer>> {
    let addr = p.addr;
    let streams = (0..n)
        .map(|_| tokio::spawn(async move { support::get(addr, "shop.test", "/stream?chunks=10&ms=150").await }))
        .collect();
    assert!(
        support::eventually(Duration::from_secs(5), || origin.count() == n).await,
        "the streams never reached {}",
        origin.name
    );
    streams
}

/// Every stream came whole, byte-exact, from blue.
async fn streams_came_whole_from_blue(streams: Vec<tokio::task::JoinHandle<support::Answer>>) {
    let expected: String = (0..10).map(|i| format!("blue chunk {i}\n")).collect();
    for s in streams {
        let a = tokio::time::timeout(Duration::from_secs(10), s).await.expect("a stream never ended").unwrap();
        assert_eq!((a.status, a.headers["x-origin"].to_str().unwrap()), (200, "blue"));
        assert_eq!(a.body, expected, "a stream started on blue was cut or altered");
    }
}

/// A-9 (b): blue→green→blue→green within a few milliseconds while HTTP
/// streams run on blue. The first switch's short drain (300 ms) is cancelled
/// by the switch back, and does not come back to cut the streams during the
/// second drain: all of them finish whole from blue. After each
/// acknowledgement the next request on a kept-alive connection goes to the
/// new live target; blue then empties with nothing forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flip_flop_while_streams_drain_cuts_nothing() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "30s")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let before = forced_closes(&p, "shop").await;
    let streams = start_streams(&p, &blue, 4).await;

    let mut client = support::Client::connect(p.addr).await;
    for (to, drain) in [("green", "300ms"), ("blue", "30s"), ("green", "30s")] {
        let body = serde_json::json!({ "to": to, "drain_timeout": drain });
        let (status, site) = p.api("POST", "/v1/sites/shop/switch", Some(body)).await;
        assert_eq!((status, &site["live"]), (200, &serde_json::json!(to)), "{site}");
        assert_eq!(client.get("shop.test", "/").await.unwrap().body, to, "right after the switch to {to}");
    }
    let (_, site) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(site["targets"]["blue"]["state"], "draining", "{site}");
    assert_eq!(site["targets"]["blue"]["inflight"], 4, "{site}");

    streams_came_whole_from_blue(streams).await;
    let site = drained(&p, "shop", "blue").await;
    assert_eq!(site["targets"]["blue"]["state"], "standby", "{site}");
    assert_eq!(forced_closes(&p, "shop").await, before, "a drain forced a close");
    assert_eq!(blue.seen().iter().filter(|s| s.path == "/stream").count(), 4);
    assert_eq!(green.seen().iter().filter(|s| s.path == "/stream").count(), 0);
}

/// A-9 (c): a rollback while blue drains (300 ms) with HTTP streams on it
/// cancels the drain: the streams, longer than the drain, finish whole from
/// blue; new requests go to green before the rollback and to blue after it;
/// nothing is forced and nothing is left in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_during_a_drain_keeps_the_streams() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "300ms")).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let before = forced_closes(&p, "shop").await;
    let streams = start_streams(&p, &blue, 4).await;

    let mut client = support::Client::connect(p.addr).await;
    p.switch("shop", "green").await;
    assert_eq!(client.get("shop.test", "/").await.unwrap().body, "green");
    let (_, site) = p.api("GET", "/v1/sites/shop", None).await;
    assert_eq!(site["targets"]["blue"]["state"], "draining", "{site}");
    let (status, site) = p.api("POST", "/v1/sites/shop/rollback", Some(serde_json::json!({ "force": false }))).await;
    assert_eq!((status, &site["live"], &site["previous"]), (200, &"blue".into(), &"green".into()), "{site}");
    assert_eq!(client.get("shop.test", "/").await.unwrap().body, "blue");

    streams_came_whole_from_blue(streams).await;
    let site = drained(&p, "shop", "blue").await;
    assert_eq!(site["targets"]["blue"]["state"], "live", "{site}");
    assert_eq!(site["targets"]["green"]["inflight"], 0, "{site}");
    assert_eq!(forced_closes(&p, "shop").await, before, "a drain forced a close");
    let (_, history) = p.api("GET", "/v1/sites/shop/history", None).await;
    assert_eq!((&history[0]["kind"], &history[0]["result"]), (&"rollback".into(), &"ok".into()), "{history}");
}

/// Reads one HTTP/1.1 response (a `Content-Length` or chunked body) from `s`
/// (3 s at most): its head, lowercased, and its body.
async fn read_response(s: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length: Option<usize> =
                    head.lines().find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok());
                let body = &got[end..];
                match length {
                    Some(n) if body.len() == n => return (head, body.to_vec()),
                    None if body.ends_with(b"0\r\n\r\n") => return (head, body.to_vec()),
                    _ => {}
                }
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a whole response: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(3), read).await.expect("no whole response within 3 s")
}

/// Everything `s` sends until it closes (`within` at most); `None` if it stays open.
async fn until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok().map(|()| out)
}

/// A-11 on HTTP/1.1. At shutdown the listener closes at once, while work is
/// still in flight. A slow request running on a kept-alive connection, on
/// cutover's own server (a `GET`) and on hyper's (a chunked `POST`),
/// completes; its answer says `connection: close` and the connection then
/// closes. Idle kept-alive connections (after either kind of request) are
/// closed at once, not at the shutdown deadline (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_h1_requests_with_connection_close() {
    use tokio::io::AsyncWriteExt;
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "30s")).await;
    p.wait_healthy("shop", &["blue"]).await;
    let addr = p.addr;
    let chunked = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    // Four kept-alive connections, each after a first answer that keeps it open.
    let mut conns = Vec::new();
    for first in [get("/"), chunked("/echo"), get("/"), chunked("/echo")] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(first.as_bytes()).await.unwrap();
        let (head, _) = read_response(&mut s).await;
        assert!(head.starts_with("http/1.1 200") && !head.contains("connection: close"), "{head}");
        conns.push(s);
    }
    let (mut idle_own, mut idle_hyper) = (conns.pop().unwrap(), conns.pop().unwrap());
    // Quiet long enough to be parked (after 20 ms): an idle connection is then a bare socket.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let busy: Vec<_> = [get("/slow?ms=800"), chunked("/slow?ms=800")]
        .into_iter()
        .zip(conns)
        .map(|(req, mut s)| {
            tokio::spawn(async move {
                s.write_all(req.as_bytes()).await.unwrap();
                until_closed(&mut s, Duration::from_secs(4)).await
            })
        })
        .collect();
    let slow_seen = || blue.seen().iter().filter(|s| s.path == "/slow").count() == 2;
    assert!(support::eventually(Duration::from_secs(3), slow_seen).await, "the slow requests never reached blue");

    let stopping = tokio::spawn(p.stop());
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener still accepts connections after the shutdown began");
    assert!(busy.iter().all(|b| !b.is_finished()), "the listener closed only after the requests in flight");
    for (what, s) in [("own", &mut idle_own), ("hyper", &mut idle_hyper)] {
        let left = until_closed(s, Duration::from_secs(2)).await;
        assert_eq!(left.as_deref(), Some(&b""[..]), "idle connection after {what}'s request not closed at once");
    }
    for (what, b) in ["GET (own server)", "chunked POST (hyper)"].into_iter().zip(busy) {
        let got = b.await.unwrap().unwrap_or_else(|| panic!("{what}: the connection stayed open after its answer"));
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "{what}: {text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{what}: no `connection: close`: {text}");
        assert!(text.ends_with("blue slow done"), "{what}: {text}");
        assert_eq!(text.matches("http/1.1 ").count(), 1, "{what}: {text}");
    }
    tokio::time::timeout(Duration::from_secs(4), stopping).await.expect("the proxy never finished stopping").unwrap();
}

/// A-11 on HTTP/2: at shutdown an h2c client with three slow streams in
/// flight gets the two-step GOAWAY: first with the last stream id 2^31-1
/// and a PING; a stream it opens before answering that PING is still served;
/// once the PING is answered, a final GOAWAY names that stream as the last.
/// Every stream up to it completes with its whole answer, a stream opened
/// after the final GOAWAY never reaches the origin nor gets an answer, and
/// the connection then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_h2_clients_a_two_step_goaway() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let p = Proxy::start(&http_sites(blue.addr, green.addr, "30s")).await;
    p.wait_healthy("shop", &["blue"]).await;
    use tokio::io::AsyncWriteExt;
    let (mut frames, mut w) = h2::raw_h2(p.addr).await;
    let get = |id: u32, path: &str| {
        h2::frame(
            h2::HEADERS,
            h2::END_STREAM | h2::END_HEADERS,
            id,
            &h2::request_block("shop.test", "GET", path.as_bytes(), &[]),
        )
    };
    for id in [1, 3, 5] {
        w.write_all(&get(id, "/slow?ms=800")).await.unwrap();
    }
    assert!(support::eventually(Duration::from_secs(3), || blue.count() == 3).await, "the streams never reached blue");

    let stopping = tokio::spawn(p.stop());
    let mut goaways = Vec::new();
    // Per stream: whether its answer began with `:status 200`, its body, whether it ended.
    let mut answers: std::collections::BTreeMap<u32, (bool, Vec<u8>, bool)> = Default::default();
    let read = async {
        while let Some(f) = frames.next().await {
            match f.kind {
                h2::SETTINGS | h2::PING if f.flags & h2::ACK == 0 => {
                    let payload = if f.kind == h2::PING { &f.payload[..] } else { &[] };
                    w.write_all(&h2::frame(f.kind, h2::ACK, 0, payload)).await.unwrap()
                }
                h2::GOAWAY => {
                    goaways.push(f.last_stream() & 0x7fff_ffff);
                    // Before the PING that follows the first is answered; after the final one.
                    let _ = match goaways.len() {
                        1 => w.write_all(&get(7, "/slow?ms=300")).await,
                        _ => w.write_all(&get(9, "/late")).await,
                    };
                }
                h2::HEADERS => {
                    let a = answers.entry(f.stream).or_default();
                    a.0 |= f.status() == 200;
                    a.2 |= f.flags & h2::END_STREAM != 0;
                }
                h2::DATA => {
                    let a = answers.entry(f.stream).or_default();
                    a.1.extend_from_slice(&f.payload);
                    a.2 |= f.flags & h2::END_STREAM != 0;
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(4), read).await.expect("the h2 connection was never closed");
    assert_eq!(goaways, [0x7fff_ffff, 7], "not a two-step GOAWAY naming stream 7 last");
    let whole = (true, b"blue slow done".to_vec(), true);
    for id in [1, 3, 5, 7] {
        assert_eq!(answers.get(&id), Some(&whole), "stream {id}: {:?}", answers.get(&id));
    }
    assert!(!answers.contains_key(&9), "a stream opened after the final GOAWAY was answered");
    let paths: Vec<String> = blue.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths.iter().filter(|p| *p == "/slow").count(), 4, "{paths:?}");
    assert!(!paths.contains(&"/late".to_string()), "a stream opened after the final GOAWAY was served");
    tokio::time::timeout(Duration::from_secs(4), stopping).await.expect("the proxy never finished stopping").unwrap();
}
