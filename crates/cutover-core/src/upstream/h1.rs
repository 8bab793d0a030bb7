//! cutover's own HTTP/1.1 client for requests without a body: the common case
//! (GET, HEAD, …) of the hot path.
//!
//! hyper's client drives each connection in a task of its own and hands the
//! request, the response head and every body chunk across channels. Here the
//! request task itself writes the head and reads the response, and the
//! response body reads the socket when the client-side server polls it: no second task,
//! no channel, no wake-up between them. A connection goes back to its
//! endpoint's pool the moment its response was read to the end.
//!
//! Framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and 304;
//! `Transfer-Encoding: chunked`, else `Content-Length`; otherwise the body
//! ends when the upstream closes. Any other transfer coding (`gzip, chunked`)
//! is refused: cutover does not undo it, and the client would get coded bytes
//! with nothing saying so. 1xx interim answers are skipped. A response that
//! could be read two ways (`Content-Length` with `Transfer-Encoding`, or
//! conflicting lengths) is refused (`502`); `Transfer-Encoding` in HTTP/1.0
//! is read, and its connection never reused.
//! Requests with a body and upgrades go through hyper's client instead.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::Stream;
use crate::hop_by_hop;
use crate::Endpoint;

/// The largest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields a response head may have.
const MAX_HEADERS: usize = 128;
/// The largest trailer section accepted.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// The longest chunk-size line accepted (size and extensions).
const MAX_CHUNK_LINE: usize = 1024;
/// What one read asks for at least.
const READ_SIZE: usize = 16 * 1024;
/// What one read of a large body asks for at most.
const MAX_READ_SIZE: usize = 256 * 1024;

#[cfg(target_os = "linux")]
mod splice;

/// An open HTTP/1.1 connection to an upstream, between exchanges.
#[derive(Debug)]
pub struct Conn {
    io: Stream,
    buf: BytesMut,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection ended or broke before any byte of an answer came back:
    /// on a reused connection, the upstream most likely closed it meanwhile.
    #[error("the upstream closed the connection before answering{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Stale(Option<io::Error>),
    /// Reading or writing failed during the answer.
    #[error("upstream connection failed: {0}")]
    Io(#[source] io::Error),
    /// The upstream's answer is not valid HTTP/1.1, or too large.
    #[error("invalid response from the upstream: {0}")]
    Invalid(&'static str),
    /// Writing a spliced body to the client failed: the client's doing.
    #[error("writing to the client failed: {0}")]
    Client(#[source] io::Error),
}

impl Error {
    /// Whether nothing came back at all (a retry on a fresh connection is safe
    /// for an idempotent request).
    pub fn is_stale(&self) -> bool {
        matches!(self, Error::Stale(_))
    }

    /// Whether the upstream failed (not the client it was relayed to).
    pub fn is_upstreams(&self) -> bool {
        !matches!(self, Error::Client(_))
    }
}

impl Conn {
    /// A connection over `io`, with nothing read yet.
    pub fn new(io: Stream) -> Self {
        Self { io, buf: BytesMut::new() }
    }

    /// Whether an idle connection still looks usable: nothing buffered, and no
    /// data or end of stream waiting on the socket. Costs no system call unless
    /// the socket became readable since its last read.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io).poll_read(&mut cx, &mut probe).is_pending()
    }
}

/// Encodes a request (`parts.uri` in origin form) with a body already read
/// whole (`body`, often empty): the map's fields, then the `added` ones (fields
/// the proxy sets, which need not go through the map), then the body. A body
/// without a `Content-Length` in the map gets one; so do `POST`, `PUT` and
/// `PATCH` without a body (`content-length: 0`).
pub fn encode_request<'a>(
    parts: &'a http::request::Parts,
    added: impl Iterator<Item = (&'a HeaderName, &'a [u8])> + Clone,
    body: &[u8],
) -> Vec<u8> {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let map = || parts.headers.iter().map(|(k, v)| (k, v.as_bytes()));
    let fields: usize = map().chain(added.clone()).map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(parts.method.as_str().len() + target.len() + fields + 64 + body.len());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in map().chain(added) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let wants_length = !body.is_empty() || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    if wants_length && !parts.headers.contains_key(CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// An upstream's answer to a request without a body.
#[derive(Debug)]
pub struct Answer {
    /// Its status (never 1xx).
    pub status: StatusCode,
    /// The version it answered in.
    pub version: Version,
    /// Its fields, as they go on to the client.
    pub fields: Fields,
    /// Its body, read from the connection as it is polled.
    pub body: ResponseBody,
}

/// The fields of an upstream's response head as they go on to the client:
/// `name: value` lines, hop-by-hop fields (and the fields `Connection`
/// names) left out (`Trailer` stays on a chunked body: it declares the
/// trailers the client gets), `Content-Length` kept apart as a number. Written once as the head
/// is parsed, so that the client-side server copies them in one piece and no
/// `HeaderMap` is built unless a server needs one ([`Fields::append_to`]).
#[derive(Debug, Clone, Default)]
pub struct Fields {
    lines: Bytes,
    length: Option<u64>,
    date: bool,
    trailer: bool,
}

impl Fields {
    /// The fields, each as `name: value\r\n`, as the upstream wrote them
    /// (its case, its spaces after the colon; never obs-fold, which httparse refuses).
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// The `Content-Length` the client gets (none when the upstream's body was
    /// chunked or delimited by its close).
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    /// Whether there is a `Date` field.
    pub fn has_date(&self) -> bool {
        self.date
    }

    /// Whether there is a `Trailer` field.
    pub fn declares_trailers(&self) -> bool {
        self.trailer
    }

    /// Each field's name and value, in order (`Content-Length` is not among them).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans().map(|(name, value)| (&self.lines[name], &self.lines[value]))
    }

    /// Appends the fields, `Content-Length` included, to `map` (their values
    /// share this head's bytes). A field `http` would not take is left out:
    /// httparse checked every name and value already, so there is none.
    pub fn append_to(&self, map: &mut HeaderMap) {
        map.reserve(self.lines.len() / 24 + 1);
        for (name, value) in self.spans() {
            if let (Ok(n), Ok(v)) =
                (HeaderName::from_bytes(&self.lines[name]), HeaderValue::from_maybe_shared(self.lines.slice(value)))
            {
                map.append(n, v);
            }
        }
        if let Some(n) = self.length {
            map.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
    }

    /// Where each name and value is in `lines`.
    fn spans(&self) -> impl Iterator<Item = (std::ops::Range<usize>, std::ops::Range<usize>)> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let line = self.lines.get(at..)?;
            let end = line.windows(2).position(|w| w == b"\r\n")?;
            let colon = line[..end].iter().position(|&b| b == b':')?;
            // The value starts after the colon and any spaces or tabs.
            let gap = line[colon + 1..end].iter().take_while(|&&b| b == b' ' || b == b'\t').count();
            let field = (at..at + colon, at + colon + 1 + gap..at + end);
            at += end + 2;
            Some(field)
        })
    }
}

/// Sends `request` (encoded whole, body included: [`encode_request`]) on
/// `conn` and reads the response head. The body reads the rest and returns the
/// connection to `endpoint`'s pool when it ended cleanly. `is_head`: the request
/// was `HEAD` (no body follows).
pub async fn exchange(mut conn: Conn, request: &[u8], is_head: bool, endpoint: Arc<Endpoint>) -> Result<Answer, Error> {
    conn.io.write_all(request).await.map_err(|e| Error::Stale(Some(e)))?;
    conn.io.flush().await.map_err(|e| Error::Stale(Some(e)))?;
    let mut received = false;
    let parsed = loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, is_head)? {
                Some(Parsed::Interim) => continue,
                Some(Parsed::Final(p)) => break p,
                None if conn.buf.len() >= MAX_HEAD_BYTES => return Err(Error::Invalid("response head too large")),
                None => {}
            }
        }
        conn.buf.reserve(READ_SIZE);
        let n = match conn.io.read_buf(&mut conn.buf).await {
            Ok(n) => n,
            Err(e) if !received => return Err(Error::Stale(Some(e))),
            Err(e) => return Err(Error::Io(e)),
        };
        if n == 0 {
            return Err(if received {
                Error::Invalid("connection closed inside the response head")
            } else {
                Error::Stale(None)
            });
        }
        received = true;
    };
    let Head { status, version, fields, framing, reusable, keep_alive } = parsed;
    if let Some(idle) = keep_alive {
        endpoint.pool.learn_keep_alive(idle);
    }
    let mut body = ResponseBody {
        conn: Some(conn),
        framing,
        reusable,
        endpoint,
        #[cfg(target_os = "linux")]
        splice: splice::State::Untried,
    };
    if matches!(body.framing, Framing::Done) {
        body.finish(true);
    }
    Ok(Answer { status, version, fields, body })
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    fields: Fields,
    framing: Framing,
    /// Whether the connection may carry another exchange after this body.
    reusable: bool,
    /// How long the upstream keeps an idle connection (its `Keep-Alive: timeout=N`).
    keep_alive: Option<std::time::Duration>,
}

enum Parsed {
    /// A 1xx interim response, skipped.
    Interim,
    Final(Head),
}

/// What a response field is to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Goes on to the client as it is.
    Kept,
    /// `Date` (kept).
    Date,
    /// `Trailer` (kept on a chunked body: it declares the trailers the client gets).
    Trailer,
    /// `Content-Length`.
    Length,
    /// `Connection`.
    Connection,
    /// `Keep-Alive` (read for its `timeout`, not forwarded).
    KeepAlive,
    /// `Transfer-Encoding`.
    Encoding,
    /// Any other hop-by-hop field.
    HopByHop,
}

impl Kind {
    /// The kind of a field named `name` (in any case): one comparison at most,
    /// since the names are told apart by their lengths first.
    fn of(name: &[u8]) -> Kind {
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"date") => Kind::Date,
            14 if name.eq_ignore_ascii_case(b"content-length") => Kind::Length,
            _ => match hop_by_hop::index_of(name) {
                None => Kind::Kept,
                Some(hop_by_hop::TRAILER_INDEX) => Kind::Trailer,
                Some(hop_by_hop::CONNECTION_INDEX) => Kind::Connection,
                Some(hop_by_hop::KEEP_ALIVE_INDEX) => Kind::KeepAlive,
                Some(hop_by_hop::TRANSFER_ENCODING_INDEX) => Kind::Encoding,
                Some(_) => Kind::HopByHop,
            },
        }
    }
}

/// Parses a response head at the start of `buf` and consumes it; `None` when
/// it is not all there yet.
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<Parsed>, Error> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many header fields")),
        Err(_) => return Err(Error::Invalid("malformed response head")),
    };
    let (Some(code), Some(minor)) = (parsed.code, parsed.version) else {
        return Err(Error::Invalid("malformed response head"));
    };
    match code {
        101 => return Err(Error::Invalid("101 Switching Protocols to a request that asked for no upgrade")),
        100..=199 => {
            buf.advance(len);
            return Ok(Some(Parsed::Interim));
        }
        // RFC 9110 §15: status codes are 100 to 599.
        600.. => return Err(Error::Invalid("status code above 599")),
        _ => {}
    }
    let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("invalid status code"))?;
    // First what each field is, the framing, and what `Connection` says.
    let mut kinds = [Kind::Kept; MAX_HEADERS];
    let mut length: Option<u64> = None;
    let (mut encoded, mut close, mut keep_alive, mut names_fields) = (false, false, false, false);
    let mut idle_for = None;
    // The transfer codings named, and how many of them are `chunked` (the only one cutover decodes).
    let (mut codings, mut chunked) = (0usize, 0usize);
    let mut size = 0;
    for (f, kind) in parsed.headers.iter().zip(kinds.iter_mut()) {
        let (name, value) = (f.name.as_bytes(), f.value);
        size += name.len() + value.len() + 4;
        *kind = Kind::of(name);
        match kind {
            Kind::Length => {
                for part in value.split(|&b| b == b',') {
                    let n = parse_length(part).ok_or(Error::Invalid("invalid Content-Length"))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(Error::Invalid("conflicting Content-Length values"));
                    }
                    length = Some(n);
                }
            }
            Kind::Encoding => {
                encoded = true;
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                    codings += 1;
                    chunked += usize::from(token.eq_ignore_ascii_case(b"chunked"));
                }
            }
            Kind::Connection => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    let (c, k) = (token.eq_ignore_ascii_case(b"close"), token.eq_ignore_ascii_case(b"keep-alive"));
                    (close, keep_alive, names_fields) = (close || c, keep_alive || k, names_fields || !(c || k));
                }
            }
            Kind::KeepAlive => idle_for = idle_for.or(hop_by_hop::keep_alive_timeout(value)),
            _ => {}
        }
    }
    let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut reusable = if minor == 0 { keep_alive && !close } else { !close };
    let framing = if is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Done
    } else if encoded {
        // A coding cutover cannot undo (`gzip, chunked`, `gzip`) would reach the
        // client as it is, with nothing left to say how it is coded: refused.
        if codings != 1 || chunked != 1 {
            return Err(Error::Invalid("a transfer coding other than chunked"));
        }
        // Could be read two ways: RFC 9112 §6.3 says it "ought to be handled
        // as an error" (a smuggling or splitting attempt), and so it is.
        if length.is_some() {
            return Err(Error::Invalid("both Content-Length and Transfer-Encoding"));
        }
        // HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1): read, but the
        // connection is not trusted again.
        if minor == 0 {
            reusable = false;
        }
        Framing::Chunked(Chunk::Size)
    } else {
        match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => {
                reusable = false;
                Framing::UntilClose
            }
        }
    };
    // Then the fields the client gets.
    let chunked_body = matches!(framing, Framing::Chunked(_));
    let named_by_connection = |name: &[u8]| {
        parsed
            .headers
            .iter()
            .zip(kinds)
            .filter(|(_, kind)| *kind == Kind::Connection)
            .any(|(f, _)| hop_by_hop::named_by_connection(f.value).any(|n| n.eq_ignore_ascii_case(name)))
    };
    let mut out =
        Fields { lines: Bytes::new(), length: if encoded { None } else { length }, date: false, trailer: false };
    let mut lines = BytesMut::with_capacity(size);
    for (f, kind) in parsed.headers.iter().zip(kinds) {
        let name = f.name.as_bytes();
        match kind {
            // Hop-by-hop (SPEC §3), but it declares the trailers a chunked body
            // ends with, which pass through: kept there only.
            Kind::Trailer if !chunked_body => continue,
            Kind::Trailer => out.trailer = true,
            Kind::Date => out.date = true,
            Kind::Kept if names_fields && named_by_connection(name) => continue,
            Kind::Kept => {}
            // Written from `length`.
            Kind::Length => continue,
            Kind::Connection | Kind::KeepAlive | Kind::Encoding | Kind::HopByHop => continue,
        }
        // The field as it came, in one piece (an empty value may point anywhere: not then).
        let whole = (name.as_ptr() as usize).checked_sub(buf.as_ptr() as usize).and_then(|at| {
            let end = (f.value.as_ptr() as usize + f.value.len()).checked_sub(buf.as_ptr() as usize)?;
            (!f.value.is_empty() && at < end && end <= len).then_some(at..end)
        });
        match whole {
            Some(range) => lines.extend_from_slice(&buf[range]),
            None => {
                lines.extend_from_slice(name);
                lines.extend_from_slice(b": ");
                lines.extend_from_slice(f.value);
            }
        }
        lines.extend_from_slice(b"\r\n");
    }
    out.lines = lines.freeze();
    buf.advance(len);
    Ok(Some(Parsed::Final(Head { status, version, fields: out, framing, reusable, keep_alive: idle_for })))
}

/// A `Content-Length` value: decimal digits only (RFC 9110 §8.6), blanks
/// around them aside; `None` for anything else (a list, a sign, overflow).
pub fn parse_length(s: &[u8]) -> Option<u64> {
    let s = s.trim_ascii();
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// How the rest of the body is delimited.
#[derive(Debug)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    /// Chunked transfer coding, at this point of it.
    Chunked(Chunk),
    /// Everything until the upstream closes.
    UntilClose,
    /// The body is complete.
    Done,
}

/// Where a chunked body is.
#[derive(Debug)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// A response body read straight from the upstream connection.
#[derive(Debug)]
pub struct ResponseBody {
    /// The connection, until the body ended.
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    endpoint: Arc<Endpoint>,
    /// Whether the rest goes by `splice(2)` ([`ResponseBody::poll_splice`]).
    #[cfg(target_os = "linux")]
    splice: splice::State,
}

/// One step of decoding what is buffered.
enum Step {
    Frame(Frame<Bytes>),
    /// Decoded more, nothing to hand out yet.
    Again,
    /// More bytes are needed.
    Read,
    End,
}

impl ResponseBody {
    /// The endpoint that answered.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Ends the body; the connection goes back to the pool when the exchange
    /// ended cleanly and the upstream left nothing extra behind.
    fn finish(&mut self, clean: bool) {
        self.framing = Framing::Done;
        self.release(clean);
    }

    /// Lets go of the connection: back to the pool when the exchange ended
    /// cleanly and the upstream left nothing extra behind.
    fn release(&mut self, clean: bool) {
        if let Some(conn) = self.conn.take() {
            if clean && self.reusable && conn.buf.is_empty() {
                self.endpoint.pool.checkin_h1(conn);
            }
        }
    }

    /// Decodes the next step from the buffered bytes.
    fn step(&mut self) -> Result<Step, Error> {
        let Some(conn) = self.conn.as_mut() else { return Ok(Step::End) };
        let buf = &mut conn.buf;
        match &mut self.framing {
            Framing::Done => Ok(Step::End),
            Framing::Length(left) => {
                let Some(data) = take(buf, left) else { return Ok(Step::Read) };
                if *left == 0 {
                    self.finish(true);
                }
                Ok(Step::Frame(Frame::data(data)))
            }
            Framing::UntilClose => {
                if buf.is_empty() {
                    return Ok(Step::Read);
                }
                Ok(Step::Frame(Frame::data(buf.split().freeze())))
            }
            Framing::Chunked(chunk) => match chunk {
                Chunk::Size => {
                    let Some(end) = find_crlf(buf) else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err(Error::Invalid("chunk-size line too long"))
                        } else {
                            Ok(Step::Read)
                        };
                    };
                    let size = parse_chunk_size(&buf[..end]).ok_or(Error::Invalid("invalid chunk size"))?;
                    buf.advance(end + 2);
                    *chunk = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                    Ok(Step::Again)
                }
                Chunk::Data(left) => {
                    let Some(data) = take(buf, left) else { return Ok(Step::Read) };
                    if *left == 0 {
                        *chunk = Chunk::DataEnd;
                    }
                    Ok(Step::Frame(Frame::data(data)))
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::Read);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *chunk = Chunk::Size;
                    Ok(Step::Again)
                }
                Chunk::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.finish(true);
                        return Ok(Step::End);
                    }
                    let Some(end) = find_blank_line(buf) else {
                        return if buf.len() > MAX_TRAILER_BYTES {
                            Err(Error::Invalid("trailer section too large"))
                        } else {
                            Ok(Step::Read)
                        };
                    };
                    let trailers = parse_trailers(&buf[..end])?;
                    buf.advance(end);
                    self.finish(true);
                    Ok(Step::Frame(Frame::trailers(trailers)))
                }
            },
        }
    }

    /// Reads more from the upstream into the buffer; `Ok(false)` at its end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        let Some(conn) = self.conn.as_mut() else { return Poll::Ready(Ok(false)) };
        let want = match self.framing {
            Framing::Length(left) => (left as usize).clamp(READ_SIZE, MAX_READ_SIZE),
            _ => READ_SIZE,
        };
        conn.buf.reserve(want);
        match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(true)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(Error::Io(e))),
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        #[cfg(target_os = "linux")]
        if this.splice.holds_bytes() {
            // Frames read now would overtake the bytes in the pipe.
            this.finish(false);
            return Poll::Ready(Some(Err(Error::Invalid("body read as frames in the middle of a splice"))));
        }
        loop {
            let step = match this.step() {
                Ok(s) => s,
                Err(e) => {
                    this.finish(false);
                    return Poll::Ready(Some(Err(e)));
                }
            };
            match step {
                Step::Frame(f) => return Poll::Ready(Some(Ok(f))),
                Step::Again => {}
                Step::End => return Poll::Ready(None),
                Step::Read => match this.poll_fill(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(true)) => {}
                    Poll::Ready(Ok(false)) => {
                        let complete = matches!(this.framing, Framing::UntilClose);
                        this.finish(false);
                        return Poll::Ready(
                            (!complete).then_some(Err(Error::Invalid("connection closed before the end of the body"))),
                        );
                    }
                    Poll::Ready(Err(e)) => {
                        this.finish(false);
                        return Poll::Ready(Some(Err(e)));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Up to `left` buffered body bytes (`None` when nothing is buffered), counted off `left`.
fn take(buf: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = (*left).min(buf.len() as u64) as usize;
    *left -= n as u64;
    Some(buf.split_to(n).freeze())
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The end of a trailer section (just past its empty line).
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// `chunk-size [ chunk-ext ]`: hex digits, then optional `;`-extensions (ignored).
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// The fields of a trailer section (it ends with an empty line).
fn parse_trailers(section: &[u8]) -> Result<HeaderMap, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for f in fields {
                let name =
                    HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Error::Invalid("invalid trailer name"))?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| Error::Invalid("invalid trailer value"))?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(Error::Invalid("malformed trailer section")),
    }
}
