//! Raw HTTP/2 frames, for clients no library would be (RFC 9113 §4, RFC 7541):
//! floods, malformed requests, and reading exactly which frames the proxy sends.

use std::time::Duration;

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const CONTINUATION: u8 = 9;
pub const END_STREAM: u8 = 1;
pub const END_HEADERS: u8 = 4;
pub const ACK: u8 = 1;
pub const CANCEL: u32 = 8;
pub const ENHANCE_YOUR_CALM: u32 = 11;

/// One frame: the 9-byte header (length, type, flags, stream id), then the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    [&len[1..], &[kind, flags], &stream.to_be_bytes(), payload].concat()
}

/// An HPACK integer with an `n`-bit prefix after the `flags` bits (RFC 7541 §5.1).
pub fn hpack_int(flags: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![flags | v as u8];
    }
    let mut out = vec![flags | max as u8];
    v -= max;
    while v >= 128 {
        out.push(0x80 | (v % 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
    out
}

/// An HPACK field with a new name, not Huffman-coded: without indexing (`flags`
/// 0x00, 4-bit prefix) or with incremental indexing (0x40, 6-bit prefix).
pub fn field(flags: u8, name: &[u8], value: &[u8]) -> Vec<u8> {
    let n = if flags == 0x40 { 6 } else { 4 };
    [hpack_int(flags, n, 0), hpack_int(0, 7, name.len()), name.to_vec(), hpack_int(0, 7, value.len()), value.to_vec()]
        .concat()
}

/// Header fields as raw bytes: `(name, value)`.
pub type Fields<'a> = &'a [(&'a [u8], &'a [u8])];

/// A request's header block: the four pseudo-fields, then `extra` fields.
pub fn request_block(authority: &str, method: &str, path: &[u8], extra: Fields) -> Vec<u8> {
    let mut block = [
        field(0, b":method", method.as_bytes()),
        field(0, b":scheme", b"http"),
        field(0, b":path", path),
        field(0, b":authority", authority.as_bytes()),
    ]
    .concat();
    for (name, value) in extra {
        block.extend(field(0, name, value));
    }
    block
}

#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    pub fn code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }

    /// The last stream id a GOAWAY names.
    pub fn last_stream(&self) -> u32 {
        u32::from_be_bytes(self.payload[..4].try_into().unwrap())
    }

    /// The `:status` of a response HEADERS frame, as h2 encodes it first: a
    /// static index, or static name 8 with a (Huffman-coded) value.
    pub fn status(&self) -> u16 {
        let b = &self.payload;
        match b[0] {
            0x88..=0x8e => [200, 204, 206, 304, 400, 404, 500][(b[0] - 0x88) as usize],
            0x48 | 0x08 | 0x18 if b[1] & 0x80 == 0 => String::from_utf8_lossy(&b[2..5]).parse().unwrap(),
            0x48 | 0x08 | 0x18 => huffman_digits(&b[2..2 + (b[1] & 0x7f) as usize]),
            _ => panic!("unexpected response header block {b:02x?}"),
        }
    }
}

/// Three Huffman-coded digits (RFC 7541 Appendix B: 0-2 take 5 bits, 3-9 take 6).
pub fn huffman_digits(bytes: &[u8]) -> u16 {
    let bit = |i: usize| (bytes[i / 8] >> (7 - i % 8)) as u16 & 1;
    let (mut at, mut n) = (0, 0);
    for _ in 0..3 {
        let five = (0..5).fold(0, |acc, i| acc << 1 | bit(at + i));
        let digit = match five {
            0..=2 => five,
            _ => ((five << 1 | bit(at + 5)) - 0x19) + 3,
        };
        at += if five <= 2 { 5 } else { 6 };
        n = n * 10 + digit;
    }
    n
}

/// The reading half of a raw h2c connection.
pub struct Frames {
    r: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
}

impl Frames {
    /// Reads frames from `r`.
    pub fn new(r: tokio::net::tcp::OwnedReadHalf) -> Frames {
        Frames { r, buf: Vec::new() }
    }

    /// The next frame, or `None` once the connection has ended (EOF or an
    /// error). Panics when the proxy neither sends nor closes for 10 s.
    pub async fn next(&mut self) -> Option<Frame> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let b: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes(b[5..9].try_into().unwrap()) & 0x7fff_ffff;
                    return Some(Frame { kind: b[3], flags: b[4], stream, payload: b[9..].to_vec() });
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout(Duration::from_secs(10), self.r.read(&mut chunk)).await {
                Err(_) => panic!("the proxy neither answered nor closed for 10 s"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Frames up to and including the first for which `stop` holds; `None`
    /// when the connection ended first.
    pub async fn until(&mut self, stop: impl Fn(&Frame) -> bool) -> Option<Frame> {
        while let Some(f) = self.next().await {
            if stop(&f) {
                return Some(f);
            }
        }
        None
    }

    /// How each of `streams` ends: its `:status` (0 if none came), DATA bytes,
    /// and whether it ended with END_STREAM (else RST_STREAM).
    pub async fn ends(&mut self, streams: &[u32]) -> std::collections::HashMap<u32, (u16, usize, bool)> {
        let mut ends = std::collections::HashMap::new();
        let mut open: Vec<u32> = streams.to_vec();
        while !open.is_empty() {
            let f = self.next().await.expect("the connection closed");
            let Some(at) = open.iter().position(|&id| id == f.stream) else { continue };
            let end = ends.entry(f.stream).or_insert((0, 0, false));
            match f.kind {
                HEADERS => end.0 = f.status(),
                DATA => end.1 += f.payload.len(),
                RST_STREAM => {
                    open.remove(at);
                    continue;
                }
                _ => continue,
            }
            if f.flags & END_STREAM != 0 {
                end.2 = true;
                open.remove(at);
            }
        }
        ends
    }

    /// Reads until the connection ends (no frame for which `forbidden` holds on the way).
    pub async fn until_closed(&mut self, forbidden: impl Fn(&Frame) -> bool) {
        while let Some(f) = self.next().await {
            assert!(!forbidden(&f), "unexpected {f:?}");
        }
    }
}

/// A raw h2c connection past its preface and SETTINGS exchange.
pub async fn raw_h2(addr: std::net::SocketAddr) -> (Frames, tokio::net::tcp::OwnedWriteHalf) {
    use tokio::io::AsyncWriteExt;
    let (r, mut w) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
    w.write_all(&[&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &frame(SETTINGS, 0, 0, &[])].concat()).await.unwrap();
    let mut frames = Frames::new(r);
    frames.until(|f| f.kind == SETTINGS && f.flags & 1 == 0).await.expect("no SETTINGS from the proxy");
    w.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
    (frames, w)
}
