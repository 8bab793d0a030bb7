//! cutover's own HTTP/1.1 server for the everyday request: `GET` or `HEAD`
//! without a body, or `POST`, `PUT`, `PATCH` or `DELETE` with a
//! `Content-Length` body that came whole with its head (a small form or API
//! call), over HTTP/1.1, without an upgrade or an `Expect`.
//!
//! It parses the head straight into the request that is forwarded, and
//! writes the response head and its first bytes with one system call. It
//! judges nothing else: a request it does not take (a chunked body or one
//! still on its way, an upgrade, HTTP/1.0, any other method, a head that does
//! not parse) hands the
//! connection, with every byte read so far, to hyper's HTTP/1.1 server, so
//! hyper still answers every malformed request and every framing question;
//! the connection comes back for a next request this server takes
//! ([`crate::handover`]). A head larger than `max_header_bytes` gets 431
//! here (hyper's buffer cannot be smaller than 8 KiB), and one with both
//! `Content-Length` and `Transfer-Encoding` 400. Responses follow hyper's rules:
//! `Content-Length` from the head or the body's exact size, else chunked;
//! no body for `HEAD`, `204` and `304`; a `Date` when the response has none;
//! `Connection: close` when the client or the server ends the connection;
//! trailers only when chunked and declared in `Trailer`.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use cutover_core::upstream::h1::{self, Fields};
use cutover_core::upstream::RequestBody;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRAILER, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::activity::{Activity, Tracked};
use crate::body::ProxyBody;
use crate::forward::{ClientConn, Proxy};
use crate::quiet::QuietTimer;

/// Header fields in a request head (hyper's limit too: more goes to hyper, which answers 431).
const MAX_HEADERS: usize = 100;
/// The longest request target (hyper's limit: longer ones get its 414).
const MAX_URI_LEN: usize = u16::MAX as usize - 1;
/// What one read asks for.
const READ_SIZE: usize = 4096;
/// The largest body this server takes (whole, with its head): written
/// upstream before the answer is read, it must fit the sockets' buffers
/// whatever the upstream does. Larger ones stream through hyper.
const MAX_WHOLE_BODY: u64 = 16 * 1024;
/// Body bytes copied behind the head (or a previous frame) to go out in the
/// same write; larger frames are written from their own buffer.
const COALESCE: usize = 16 * 1024;

/// Bodies at least this large, read by cutover's own client from a plain
/// connection, are spliced into a plain client connection (`splice(2)`);
/// smaller ones are cheaper to copy.
#[cfg(target_os = "linux")]
const SPLICE_MIN: u64 = 64 * 1024;

/// A client connection's transport, and its TCP socket when response
/// bodies can be spliced straight into it (plain TCP, not TLS).
pub trait Transport: AsyncWrite + Unpin {
    /// The socket under the stream, when bytes written to it reach the client as they are.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }

    /// The client's first bytes, when they can be read at once (see [`Tracked::read_now`]).
    fn read_now(&self) -> Bytes {
        Bytes::new()
    }
}

impl Transport for Tracked<TcpStream> {
    fn socket(&self) -> Option<&TcpStream> {
        self.get_ref()
    }

    fn read_now(&self) -> Bytes {
        Tracked::read_now(self)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Transport for tokio_rustls::server::TlsStream<IO> {}

/// How a connection left this server.
pub enum Ended<IO> {
    /// It is done: closed by either side, asked to finish, or parked.
    Closed,
    /// A request this server does not take: hyper serves the connection from
    /// here, reading these bytes first.
    Handoff(IO, Bytes),
}

/// Serves `io`, whose first bytes (`first`) were already read, until the
/// connection ends or a request needs hyper. `limit`: the largest request head;
/// `stall`: how long a response write may wait on a client that reads nothing
/// (`idle_timeout`: then the connection is cut, and the upstream's with it).
pub async fn serve<IO>(
    mut io: IO,
    first: Bytes,
    proxy: &Proxy,
    client: &ClientConn,
    limit: usize,
    stall: Duration,
) -> io::Result<Ended<IO>>
where
    IO: AsyncRead + Transport,
{
    let activity = &*client.activity;
    let mut buf = first;
    let mut out = Vec::new();
    loop {
        let (req, close, te_trailers) = loop {
            if !buf.is_empty() {
                match parse(&mut buf, limit) {
                    Ok(Some(request)) => break request,
                    Ok(None) => {}
                    Err(NotMine::Hyper) => return Ok(Ended::Handoff(io, buf)),
                    Err(refused @ (NotMine::TooLarge | NotMine::Ambiguous)) => {
                        let answer = if matches!(refused, NotMine::TooLarge) { TOO_LARGE } else { AMBIGUOUS };
                        write_all(&mut io, answer, &[], stall).await?;
                        let _ = io.shutdown().await;
                        return Ok(Ended::Closed);
                    }
                }
            }
            if !poll_fn(|cx| read(Pin::new(&mut io), cx, &mut buf, activity)).await? {
                return Ok(Ended::Closed);
            }
        };
        let is_head = req.method() == Method::HEAD;
        let Ok(resp) = proxy.handle(req, client).await;
        let close = close || activity.closing();
        if !respond(&mut io, resp, is_head, close, te_trailers, stall, &mut out).await? {
            let _ = io.shutdown().await;
            return Ok(Ended::Closed);
        }
        if !buf.is_empty() {
            activity.head_buffered();
        }
    }
}

/// Reads more of a request head into `buf`; `false` at the end of the stream
/// or when the connection is asked to finish.
fn read<IO: AsyncRead>(
    mut io: Pin<&mut IO>,
    cx: &mut Context<'_>,
    buf: &mut Bytes,
    activity: &Activity,
) -> Poll<io::Result<bool>> {
    if activity.closing() {
        return Poll::Ready(Ok(false));
    }
    if buf.is_empty() {
        // Into the stack, then into an allocation of the size read: usually
        // a whole head, and nothing held while the connection waits.
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut rb = ReadBuf::uninit(&mut stack);
        std::task::ready!(io.poll_read(cx, &mut rb))?;
        *buf = Bytes::copy_from_slice(rb.filled());
        return Poll::Ready(Ok(!buf.is_empty()));
    }
    // Part of a head: the rest goes behind it (rare; no copy when the buffer is not shared).
    let mut more = std::mem::take(buf).try_into_mut().unwrap_or_else(|b| BytesMut::from(&b[..]));
    more.reserve(READ_SIZE);
    let mut polled = tokio_util::io::poll_read_buf(io.as_mut(), cx, &mut more);
    if matches!(polled, Poll::Ready(Ok(0))) && activity.parking() {
        // Parking, with part of a pipelined head waiting: not idle after all.
        activity.set_parking(false);
        polled = tokio_util::io::poll_read_buf(io, cx, &mut more);
    }
    *buf = more.freeze();
    let n = std::task::ready!(polled)?;
    Poll::Ready(Ok(n > 0))
}

/// A request this server does not take.
enum NotMine {
    /// For hyper (which answers every malformed request as it always has).
    Hyper,
    /// A head larger than the limit: answered here with 431, since hyper's own
    /// limit is at least 8 KiB, more than the smallest `max_header_bytes`.
    TooLarge,
    /// Both `Content-Length` and `Transfer-Encoding`: answered here with 400
    /// (SPEC §3), since hyper would read the body as chunked without a word.
    Ambiguous,
}

/// The answer to a request head larger than `max_header_bytes`.
const TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The answer when the upstream's body failed before any of the response went out.
const BROKEN_UPSTREAM: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\n\r\nthe upstream connection failed\n";

/// The answer to a request that has both `Content-Length` and `Transfer-Encoding`.
const AMBIGUOUS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 54\r\n\r\nContent-Length and Transfer-Encoding must not be both\n";

/// How cutover's own server takes a request head ([`crate::handover`]).
pub enum Judged {
    /// Not all there yet.
    Incomplete,
    /// A request for hyper's server.
    Hyper,
    /// One cutover's own server serves or answers.
    Own,
}

/// Judges the request head at the start of `head` as [`serve`] would
/// (empty lines before it are skipped, as both servers skip them). hyper is
/// given one message at a time ([`crate::handover`]), so it never holds the
/// start of this head: an incomplete one waits for the rest.
pub fn judge(head: &Bytes, limit: usize) -> Judged {
    match parse(&mut head.clone(), limit) {
        Ok(None) => Judged::Incomplete,
        Err(NotMine::Hyper) => Judged::Hyper,
        Ok(Some(_)) | Err(NotMine::TooLarge | NotMine::Ambiguous) => Judged::Own,
    }
}

/// Parses the request head at the start of `buf`: the request, whether the
/// client asked to close and whether it takes trailers (`TE: trailers`) (the
/// head consumed), `None` when the head is not all there yet. The request's
/// fields share `buf`'s bytes.
fn parse(buf: &mut Bytes, limit: usize) -> Result<Option<(Request<RequestBody>, bool, bool)>, NotMine> {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= limit => len,
        Ok(httparse::Status::Partial) if buf.len() < limit => return Ok(None),
        Ok(_) => return Err(NotMine::TooLarge),
        Err(_) => return Err(NotMine::Hyper),
    };
    // Whether the method may carry a body (a `GET` or `HEAD` with one is hyper's).
    let (method, may_have_body) = match req.method {
        Some("GET") => (Method::GET, false),
        Some("HEAD") => (Method::HEAD, false),
        Some("POST") => (Method::POST, true),
        Some("PUT") => (Method::PUT, true),
        Some("PATCH") => (Method::PATCH, true),
        Some("DELETE") => (Method::DELETE, true),
        _ => return Err(for_hyper(&req)),
    };
    let (Some(path), Some(1)) = (req.path, req.version) else { return Err(for_hyper(&req)) };
    if path.len() > MAX_URI_LEN {
        return Err(NotMine::Hyper);
    }
    let uri = Uri::from_maybe_shared(shared(buf, path.as_bytes())?).map_err(|_| NotMine::Hyper)?;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let (mut close, mut te_trailers, mut length) = (false, false, None);
    for f in req.headers.iter() {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"te") {
            te_trailers |= f.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // One plain length of a small body, on a method that may have
            // one; anything else (a list, a second field) is for hyper to judge.
            match (may_have_body, length, h1::parse_length(f.value)) {
                (true, None, Some(n)) if n <= MAX_WHOLE_BODY => length = Some(n),
                _ => return Err(for_hyper(&req)),
            }
        }
        // A chunked body, an upgrade or an expectation: hyper's business, unless
        // the body could be read two ways (hyper would silently drop the length).
        let framing = [&b"transfer-encoding"[..], b"upgrade", b"expect"];
        if framing.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(for_hyper(&req));
        }
        if name.eq_ignore_ascii_case(b"connection") {
            let mut names_fields = false;
            for token in f.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                names_fields |= !token.is_empty()
                    && !token.eq_ignore_ascii_case(b"close")
                    && !token.eq_ignore_ascii_case(b"keep-alive");
            }
            if !names_fields {
                // Hop-by-hop, and it names no field the proxy must remove: it ends here.
                continue;
            }
        }
        let name = HeaderName::from_bytes(name).map_err(|_| NotMine::Hyper)?;
        let value = HeaderValue::from_maybe_shared(shared(buf, f.value)?).map_err(|_| NotMine::Hyper)?;
        headers.append(name, value);
    }
    // A body is taken only when it came whole with its head: one still on its
    // way streams through hyper, which also answers a client that stops sending it.
    let length = length.unwrap_or(0);
    let end = usize::try_from(length).ok().and_then(|n| len.checked_add(n)).filter(|&end| end <= buf.len());
    let Some(end) = end else { return Err(NotMine::Hyper) };
    let body = buf.slice(len..end);
    buf.advance(end);
    if buf.is_empty() {
        // Nothing pipelined: the connection keeps nothing of this read while it waits.
        *buf = Bytes::new();
    }
    let mut request = Request::new(RequestBody::whole(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(Some((request, close, te_trailers)))
}

/// A request for hyper, unless its body could be read two ways (both
/// `Content-Length` and `Transfer-Encoding`, or two `Content-Length` fields,
/// even equal, as nginx refuses them), which hyper would accept.
fn for_hyper(req: &httparse::Request<'_, '_>) -> NotMine {
    let count = |n: &[u8]| req.headers.iter().filter(|f| f.name.as_bytes().eq_ignore_ascii_case(n)).count();
    let lengths = count(b"content-length");
    if lengths > 1 || lengths == 1 && count(b"transfer-encoding") > 0 {
        NotMine::Ambiguous
    } else {
        NotMine::Hyper
    }
}

/// `part` (a slice of `buf` from httparse) as a `Bytes` sharing `buf`'s allocation.
fn shared(buf: &Bytes, part: &[u8]) -> Result<Bytes, NotMine> {
    if part.is_empty() {
        return Ok(Bytes::new());
    }
    let at = (part.as_ptr() as usize).checked_sub(buf.as_ptr() as usize).ok_or(NotMine::Hyper)?;
    if at + part.len() > buf.len() {
        return Err(NotMine::Hyper);
    }
    Ok(buf.slice(at..at + part.len()))
}

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, `204`, `304`, or a response cutover replaced).
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Writes `resp` to the client (its trailers only when `te_trailers`: the
/// client said `TE: trailers`); `true` when the connection can carry another request.
async fn respond<IO: Transport>(
    io: &mut IO,
    resp: Response<ProxyBody>,
    is_head: bool,
    close: bool,
    te_trailers: bool,
    stall: Duration,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    out.clear();
    let fields = body.take_fields();
    let mut head = encode_head(&parts, fields.as_ref(), &body, is_head, close, out);
    if !te_trailers {
        head.trailers = None;
    }
    drop(fields);
    drop(parts);
    let mut sent = 0u64;
    let mut trailers = None;
    // Whether any byte went out: until then a failed body can still be a 502.
    let mut wrote = false;
    if head.framing != Framing::None && !body.is_end_stream() {
        loop {
            #[cfg(target_os = "linux")]
            if let Framing::Length(n) = head.framing {
                if n - sent >= SPLICE_MIN {
                    sent += splice_rest(io, out, &mut body, n - sent, stall).await?;
                    // The head went out unless splicing was not possible at all.
                    wrote |= out.is_empty();
                }
            }
            // What is ready now goes out with what is already waiting; the rest after a write.
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    wrote = true;
                    write_all(io, out, &[], stall).await?;
                    flush(io, stall).await?;
                    out.clear();
                    poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                }
            };
            let Some(frame) = frame else { break };
            let frame = match frame {
                Ok(f) => f,
                Err(e) if !wrote => {
                    // The upstream failed before the client got anything: say so.
                    body.failed_before_sending();
                    drop(body);
                    write_all(io, BROKEN_UPSTREAM, &[], stall).await?;
                    return Err(io::Error::other(e));
                }
                Err(e) => return Err(io::Error::other(e)),
            };
            match frame.into_data() {
                Ok(data) => {
                    sent += data.len() as u64;
                    if matches!(head.framing, Framing::Length(n) if sent > n) {
                        // Never more than the length said: the excess would read as another response.
                        return Err(io::Error::other("response body longer than its Content-Length"));
                    }
                    if head.framing == Framing::Chunked {
                        if data.is_empty() {
                            continue;
                        }
                        // Writing into a Vec cannot fail.
                        let _ = write!(out, "{:x}\r\n", data.len());
                    }
                    if data.len() <= COALESCE {
                        out.extend_from_slice(&data);
                    } else {
                        wrote = true;
                        write_all(io, out, &data, stall).await?;
                        out.clear();
                    }
                    if head.framing == Framing::Chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                    if out.len() > COALESCE {
                        wrote = true;
                        write_all(io, out, &[], stall).await?;
                        out.clear();
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
    }
    // The request is done with its last byte read: its guard counts and logs
    // it before that byte goes out (as with hyper), not after the client has it.
    drop(body);
    let complete = match head.framing {
        Framing::Length(n) => sent == n,
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let (Some(fields), Some(allowed)) = (trailers, head.trailers) {
                for (name, value) in fields.iter().filter(|(n, _)| allowed.contains(n)) {
                    push_field(out, name.as_str().as_bytes(), value.as_bytes());
                }
            }
            out.extend_from_slice(b"\r\n");
            true
        }
        Framing::None => true,
    };
    if !complete {
        // The body ended short of its length: the client must see the connection break.
        return Err(io::Error::other("response body shorter than its Content-Length"));
    }
    write_all(io, out, &[], stall).await?;
    flush(io, stall).await?;
    Ok(!head.close)
}

/// Splices the rest of `body` into the client's socket, after what waits in
/// `out`, when it is `left` bytes long and both sides are plain TCP: the
/// bytes moved (none when it did not splice).
#[cfg(target_os = "linux")]
async fn splice_rest<IO: Transport>(
    io: &mut IO,
    out: &mut Vec<u8>,
    body: &mut ProxyBody,
    left: u64,
    stall: Duration,
) -> io::Result<u64> {
    if io.socket().is_none() || body.prepare_splice() != Some(left) {
        return Ok(0);
    }
    write_all(io, out, &[], stall).await?;
    flush(io, stall).await?;
    out.clear();
    let Some(socket) = io.socket() else { return Ok(0) };
    let mut moved = 0;
    let mut quiet = QuietTimer::new(stall);
    loop {
        // A wait on the client (not on the upstream) has `stall` to end.
        let step = poll_fn(|cx| match body.poll_splice(cx, socket) {
            Poll::Ready(r) => Poll::Ready(r.map_err(io::Error::other)),
            Poll::Pending if body.splice_waits_on_client() => stalled(&mut quiet, cx),
            Poll::Pending => {
                quiet.progress();
                Poll::Pending
            }
        });
        match step.await? {
            0 => return Ok(moved),
            n => moved += n,
        }
        quiet.progress();
    }
}

/// The response head as encoded, and what it decided.
struct Head {
    framing: Framing,
    /// Whether the connection closes after this response.
    close: bool,
    /// The trailer fields `Trailer` declares (sent only when chunked).
    trailers: Option<Vec<HeaderName>>,
}

/// Encodes the status line and fields of a response into `out`: the
/// upstream's `fields` when cutover's own client read it (they are not in the
/// map), then the map's.
fn encode_head(
    parts: &http::response::Parts,
    fields: Option<&Fields>,
    body: &ProxyBody,
    is_head: bool,
    mut close: bool,
    out: &mut Vec<u8>,
) -> Head {
    let status = parts.status;
    // Room for a typical head (the Vec is reused on a kept-alive connection).
    out.reserve(64 + fields.map_or(0, |f| f.lines().len()) + parts.headers.len() * 48);
    if status.is_informational() {
        // Only an upgrade answers 101, and upgrades go to hyper: never sent as a final answer.
        out.extend_from_slice(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return Head { framing: Framing::None, close: true, trailers: None };
    }
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(r) => out.extend_from_slice(r.as_bytes()),
            // An unregistered code gets an empty reason (RFC 9112 §4 allows it).
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    let no_body = is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let (mut length, mut wrote_length, mut wrote_date, mut says_close) = (None, false, false, false);
    let mut trailers: Option<Vec<HeaderName>> = None;
    if let Some(f) = fields {
        // Hop-by-hop fields are gone already. A field the map has too is
        // cutover's to set (but `Set-Cookie` may come many times).
        let replaced = |name: &[u8]| {
            !parts.headers.is_empty()
                && !name.eq_ignore_ascii_case(b"set-cookie")
                && std::str::from_utf8(name).is_ok_and(|n| parts.headers.contains_key(n))
        };
        if f.declares_trailers() || !parts.headers.is_empty() {
            for (name, value) in f.iter() {
                let trailer = name.eq_ignore_ascii_case(TRAILER.as_str().as_bytes());
                if replaced(name) || (trailer && no_body) {
                    continue;
                }
                if trailer {
                    declared_trailers(value, &mut trailers);
                }
                push_field(out, name, value);
            }
        } else {
            out.extend_from_slice(f.lines());
        }
        if let Some(n) = f.length().filter(|_| status != StatusCode::NO_CONTENT) {
            push_field(out, b"content-length", itoa::Buffer::new().format(n).as_bytes());
            (length, wrote_length) = (Some(n), true);
        }
        wrote_date = f.has_date();
    }
    for (name, value) in &parts.headers {
        if *name == TRANSFER_ENCODING {
            // The framing is this server's choice.
            continue;
        } else if *name == CONTENT_LENGTH {
            // Never on a 204 (RFC 9110 §8.6).
            if wrote_length || status == StatusCode::NO_CONTENT {
                continue;
            }
            wrote_length = true;
            length = std::str::from_utf8(value.as_bytes()).ok().and_then(|s| s.parse::<u64>().ok());
        } else if *name == CONNECTION {
            says_close |= value.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if *name == DATE {
            wrote_date = true;
        } else if *name == TRAILER {
            if no_body {
                continue;
            }
            declared_trailers(value.as_bytes(), &mut trailers);
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        push_field(out, b"content-length", itoa::Buffer::new().format(n).as_bytes());
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if wrote_length && length.is_none() && !no_body {
        // A length nobody can read: the connection cannot be trusted after it.
        close = true;
    }
    if close && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        date(out);
    }
    out.extend_from_slice(b"\r\n");
    Head { framing, close: close || says_close, trailers }
}

/// Adds the names a `Trailer` value declares.
fn declared_trailers(value: &[u8], trailers: &mut Option<Vec<HeaderName>>) {
    let names = value.split(|&b| b == b',').filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok());
    trailers.get_or_insert_with(Vec::new).extend(names);
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a `Date` field for now, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, value)| {
        if *at != secs {
            *value = httpdate::fmt_http_date(now);
            *at = secs;
        }
        push_field(out, b"date", value.as_bytes());
    });
}

/// Writes `a` then `b`, in one system call when the stream takes both; fails
/// with `TimedOut` when the client reads nothing for `stall`.
async fn write_all<IO: AsyncWrite + Unpin>(io: &mut IO, a: &[u8], b: &[u8], stall: Duration) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    let mut quiet = QuietTimer::new(stall);
    poll_fn(|cx| {
        while !a.is_empty() || !b.is_empty() {
            let io = Pin::new(&mut *io);
            let n = match if a.is_empty() {
                io.poll_write(cx, b)
            } else if b.is_empty() {
                io.poll_write(cx, a)
            } else {
                io.poll_write_vectored(cx, &[IoSlice::new(a), IoSlice::new(b)])
            } {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return stalled(&mut quiet, cx),
            };
            quiet.progress();
            let from_a = n.min(a.len());
            a = &a[from_a..];
            // (A stream never reports more than it was given; `min` keeps a broken one from panicking.)
            b = &b[(n - from_a).min(b.len())..];
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// Flushes `io`, as [`write_all`] writes.
async fn flush<IO: AsyncWrite + Unpin>(io: &mut IO, stall: Duration) -> io::Result<()> {
    let mut quiet = QuietTimer::new(stall);
    poll_fn(|cx| match Pin::new(&mut *io).poll_flush(cx) {
        Poll::Pending => stalled(&mut quiet, cx),
        done => done,
    })
    .await
}

/// The error of a response given up on a client that read nothing of it for `idle_timeout`.
fn client_stalled() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the client read nothing of its response for idle_timeout")
}

/// Pending while a wait on the client is shorter than its limit, then the error.
fn stalled<T>(quiet: &mut QuietTimer, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
    if quiet.expired(cx) {
        Poll::Ready(Err(client_stalled()))
    } else {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Transport for Vec<u8> {}

    fn local(status: u16, body: &'static str, fields: &[(&'static str, &'static str)]) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes()), None));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in fields {
            resp.headers_mut().append(*k, HeaderValue::from_static(v));
        }
        resp
    }

    async fn wire(resp: Response<ProxyBody>, is_head: bool, close: bool) -> (io::Result<bool>, String) {
        let (mut written, mut out) = (Vec::new(), Vec::new());
        let r = respond(&mut written, resp, is_head, close, true, Duration::from_secs(60), &mut out).await;
        (r, String::from_utf8(written).unwrap())
    }

    #[tokio::test]
    async fn lengths_dates_and_close() {
        let (r, w) = wire(local(200, "hello", &[("x-a", "1")]), false, false).await;
        assert!(r.unwrap(), "kept alive");
        assert!(w.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "), "{w}");
        assert!(w.ends_with(" GMT\r\n\r\nhello"), "{w}");

        let (r, w) = wire(local(404, "no", &[("date", "then")]), false, true).await;
        assert!(!r.unwrap(), "closes");
        assert_eq!(w, "HTTP/1.1 404 Not Found\r\ndate: then\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno");

        // The response says close: the connection closes, and it is not said twice.
        let (r, w) = wire(local(400, "", &[("connection", "close"), ("date", "d")]), false, false).await;
        assert!(!r.unwrap());
        assert_eq!(w, "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ndate: d\r\ncontent-length: 0\r\n\r\n");
    }

    #[tokio::test]
    async fn no_body_for_head_204_and_304() {
        let (_, w) = wire(local(200, "", &[("content-length", "42"), ("date", "d")]), true, false).await;
        assert_eq!(
            w, "HTTP/1.1 200 OK\r\ncontent-length: 42\r\ndate: d\r\n\r\n",
            "HEAD keeps the length, sends nothing"
        );
        for status in [204, 304] {
            let (r, w) = wire(local(status, "body", &[("date", "d")]), false, false).await;
            assert!(r.unwrap());
            assert!(w.ends_with("date: d\r\n\r\n") && !w.contains("content-length"), "{w}");
        }
    }

    #[tokio::test]
    async fn a_body_that_disagrees_with_its_length_breaks_the_connection() {
        let (r, w) = wire(local(200, "hello", &[("content-length", "3"), ("date", "d")]), false, false).await;
        assert!(r.is_err());
        assert!(!w.contains("hel"), "no byte beyond the length is written: {w:?}");
        let (r, _) = wire(local(200, "hi", &[("content-length", "3"), ("date", "d")]), false, false).await;
        assert!(r.is_err(), "shorter than its length");
        // Transfer-Encoding is this server's choice, never copied.
        let (r, w) = wire(local(200, "hi", &[("transfer-encoding", "chunked"), ("date", "d")]), false, false).await;
        assert!(r.unwrap());
        assert_eq!(w, "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 2\r\n\r\nhi");
    }
}
