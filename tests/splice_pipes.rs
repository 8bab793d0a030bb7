//! Which bodies go through a pipe (`splice(2)`), seen from outside: the
//! pipes this process holds while a body waits on its upstream. One test
//! only, so that no other test's pipes are counted (the proxy runs in this
//! process).
#![cfg(target_os = "linux")]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{site, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An origin that answers `/hold/LEN/SENT` with a `Content-Length: LEN` head
/// and `SENT` bytes, and `/hold-chunked` with one chunk, then keeps the
/// connection open without sending more.
async fn holding_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let path = String::from_utf8_lossy(&head).split(' ').nth(1).unwrap_or("").to_string();
                let answer = if path == "/up" {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
                } else if path == "/hold-chunked" {
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec()
                } else {
                    let mut parts = path.trim_start_matches("/hold/").split('/');
                    let len: usize = parts.next().unwrap().parse().unwrap();
                    let sent: usize = parts.next().unwrap().parse().unwrap();
                    let mut a = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
                    a.resize(a.len() + sent, b'x');
                    a
                };
                let _ = stream.write_all(&answer).await;
                if path == "/up" {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    addr
}

/// Pipes open in this process (standard streams left out).
fn pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            (fd > 2 && target.to_string_lossy().starts_with("pipe:")).then_some(())
        })
        .count()
}

/// Sends `path` on a new connection and waits for the first `want` bytes of
/// the answer (head included); the connection stays open.
async fn start(proxy: SocketAddr, path: &str, want: usize) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: hold.test\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = 0;
    let mut buf = [0u8; 4096];
    while got < want {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "{path}: the connection closed");
        got += n;
    }
    s
}

#[tokio::test]
async fn only_large_plain_bodies_take_a_pipe() {
    let origin = holding_origin().await;
    let p = Proxy::start(&site("hold", "hold.test", "blue", &[("blue", vec![origin])])).await;
    p.wait_healthy("hold", &["blue"]).await;
    let before = pipes();

    let _chunked = start(p.addr, "/hold-chunked", 40).await;
    let _small = start(p.addr, "/hold/65535/1000", 1000).await;
    assert_eq!(pipes(), before, "a chunked body and one under 64 KiB are copied");

    let _large = start(p.addr, "/hold/4194304/1000", 1000).await;
    assert_eq!(pipes(), before + 2, "a large Content-Length body waits on its upstream through one pipe");
    let _another = start(p.addr, "/hold/1048576/70000", 70_000).await;
    assert_eq!(pipes(), before + 4, "each spliced body has its own pipe");
}
