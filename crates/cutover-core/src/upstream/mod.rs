//! Connections to upstream endpoints: connect with a timeout, HTTP/1.1
//! handshake, and a small per-endpoint pool of idle keep-alive connections.
//! Requests without a body use cutover's own HTTP/1.1 client ([`h1`]); the
//! rest (uploads, upgrades, `protocol: h2`) use hyper's.
//!
//! The pool is a lock-free bounded queue per data-plane worker (no lock per
//! request, no cross-thread hand-off), each holding at most
//! `max_idle` connections, and drops connections idle longer than
//! `idle_timeout` (keep it shorter than the upstream's own keep-alive; an
//! upstream's `Keep-Alive: timeout=N` shortens it), both
//! at checkout and in [`Pool::sweep`], which the endpoint's health task runs
//! every interval (the pool timer). A connection is returned only after its
//! response body was read to the end. While the endpoint's target drains after
//! a switch the pool is retired: its idle connections are closed at once, and
//! the connections of the requests still finishing there are not kept.

pub mod h1;
mod wait;

pub use wait::{answer_within, drained, response_deadline, Silence, DRAIN_WATCH_AFTER};

use std::io;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// The request body sent upstream: the client's body, streamed, with its progress.
pub type UpstreamBody = RequestBody;

/// How far the client's request body got: when a byte last moved, and whether it ended.
#[derive(Debug)]
pub struct BodyProgress {
    started: Instant,
    last_ms: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicBool,
    /// Whether the last read of the client's body found nothing yet (the
    /// client is slow), rather than the upstream not asking for more.
    waiting_on_client: std::sync::atomic::AtomicBool,
    /// Whether the body is held back for `Expect: 100-continue` ([`ExpectGate`]):
    /// meanwhile the exchange is not silent, however long the upstream takes.
    held: std::sync::atomic::AtomicBool,
}

impl BodyProgress {
    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the body is stuck on the client: its last read found nothing.
    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the body is still held back for `Expect: 100-continue`.
    pub fn held_back(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the whole body was sent upstream.
    pub fn done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Time since a body byte last moved (or since the request started, or
    /// since the body was let go after an `Expect: 100-continue`); zero while
    /// it is held back for one.
    pub fn idle_for(&self) -> Duration {
        if self.held.load(std::sync::atomic::Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// The client's request body on its way upstream. A body with content records
/// its progress, so the response timeout counts from its last byte (an upload
/// is not a slow upstream) and the connection is reused only once it was sent.
#[derive(Debug)]
pub struct RequestBody {
    source: Source,
    progress: Option<std::sync::Arc<BodyProgress>>,
    /// For `Expect: 100-continue`: the body is not read until this opens.
    expect: Option<ExpectGate>,
}

/// Where a request body's bytes come from.
#[derive(Debug)]
enum Source {
    /// No body, or a whole one already taken ([`RequestBody::take_whole`]).
    Empty,
    /// A body cutover's own HTTP/1.1 server read whole with its head.
    Whole(bytes::Bytes),
    /// The client's body as hyper's server reads it.
    Streamed(Incoming),
}

/// Holds back a body sent with `Expect: 100-continue` until the upstream
/// answers `100 Continue` (or for [`EXPECT_WAIT`] at most, for an upstream
/// that ignores the expectation). hyper's server sends the client its own
/// `100 Continue` only when the body is first read: an upstream that answers
/// from the head alone (`401`, `417`) spares the client the upload.
#[derive(Debug)]
struct ExpectGate {
    continued: std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>,
    fallback: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// How long a body with `Expect: 100-continue` waits for the upstream's
/// `100 Continue` before it goes anyway (curl waits as long).
pub const EXPECT_WAIT: Duration = Duration::from_secs(1);

impl RequestBody {
    /// Wraps `inner`; a body that is already complete needs no tracking.
    pub fn new(inner: Incoming) -> Self {
        use http_body::Body as _;
        let progress = (!inner.is_end_stream()).then(|| {
            std::sync::Arc::new(BodyProgress {
                started: Instant::now(),
                last_ms: std::sync::atomic::AtomicU64::new(0),
                done: std::sync::atomic::AtomicBool::new(false),
                waiting_on_client: std::sync::atomic::AtomicBool::new(false),
                held: std::sync::atomic::AtomicBool::new(false),
            })
        });
        Self { source: Source::Streamed(inner), progress, expect: None }
    }

    /// The body of a request that has none.
    pub fn empty() -> Self {
        Self { source: Source::Empty, progress: None, expect: None }
    }

    /// A body read whole with the request's head (nothing to track: it is
    /// sent upstream at once, or not at all).
    pub fn whole(bytes: bytes::Bytes) -> Self {
        let source = if bytes.is_empty() { Source::Empty } else { Source::Whole(bytes) };
        Self { source, progress: None, expect: None }
    }

    /// The bytes of a body read whole (empty for a request without a body),
    /// leaving it empty; `None` for a body that is still streaming in.
    pub fn take_whole(&mut self) -> Option<bytes::Bytes> {
        if self.unread() {
            return None;
        }
        match std::mem::replace(&mut self.source, Source::Empty) {
            Source::Whole(bytes) => Some(bytes),
            _ => Some(bytes::Bytes::new()),
        }
    }

    /// Holds the body back until `req` gets `100 Continue` from an HTTP/1.1
    /// upstream, or [`EXPECT_WAIT`] passed (see [`ExpectGate`]).
    pub fn expect_continue(req: &mut http::Request<RequestBody>) {
        use http_body::Body as _;
        if req.body().is_end_stream() {
            return;
        }
        let notify = std::sync::Arc::new(tokio::sync::Notify::new());
        let continued = Box::pin(notify.clone().notified_owned());
        hyper::ext::on_informational(req, move |res| {
            if res.status() == http::StatusCode::CONTINUE {
                notify.notify_one();
            }
        });
        let fallback = Box::pin(tokio::time::sleep(EXPECT_WAIT));
        let body = req.body_mut();
        if let Some(p) = &body.progress {
            p.held.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        body.expect = Some(ExpectGate { continued, fallback });
    }

    /// Whether some of the body is still to be read from the client's
    /// connection (a body hyper's server streams; not one read whole).
    pub fn unread(&self) -> bool {
        use http_body::Body as _;
        matches!(&self.source, Source::Streamed(b) if !b.is_end_stream())
    }

    /// Its progress, when it has content.
    pub fn progress(&self) -> Option<std::sync::Arc<BodyProgress>> {
        self.progress.clone()
    }
}

impl http_body::Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(gate) = &mut this.expect {
            use std::future::Future as _;
            if gate.continued.as_mut().poll(cx).is_pending() && gate.fallback.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            this.expect = None;
            // The response timeout counts from here: the wait was cutover's.
            if let Some(p) = &this.progress {
                p.touch();
                p.held.store(false, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let inner = match &mut this.source {
            Source::Empty => return std::task::Poll::Ready(None),
            Source::Whole(bytes) => {
                let bytes = std::mem::take(bytes);
                this.source = Source::Empty;
                return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes))));
            }
            Source::Streamed(inner) => inner,
        };
        let polled = std::pin::Pin::new(&mut *inner).poll_frame(cx);
        if let Some(p) = &this.progress {
            p.waiting_on_client.store(polled.is_pending(), std::sync::atomic::Ordering::Relaxed);
            if let std::task::Poll::Ready(frame) = &polled {
                p.touch();
                // Trailers are a body's last frame.
                let last = frame.as_ref().is_none_or(|f| f.as_ref().is_ok_and(http_body::Frame::is_trailers));
                if last || inner.is_end_stream() {
                    p.done.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Empty => true,
            Source::Whole(_) => false,
            Source::Streamed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.source {
            Source::Empty => http_body::SizeHint::with_exact(0),
            Source::Whole(bytes) => http_body::SizeHint::with_exact(bytes.len() as u64),
            Source::Streamed(b) => b.size_hint(),
        }
    }
}

/// A ready-to-use HTTP/1.1 connection to one endpoint.
pub type Sender = http1::SendRequest<UpstreamBody>;

/// A multiplexed HTTP/2 connection to one endpoint (`protocol: h2`).
pub type H2Sender = http2::SendRequest<UpstreamBody>;

thread_local! {
    /// The data-plane worker this thread is (0 for any other thread).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as data-plane worker `index`: it gets its own idle
/// queue in every pool, so a pooled connection is reused by the worker whose
/// runtime drives it (no cross-thread wake-up per request).
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// Idle queues per pool: one per CPU (each data-plane worker uses its own).
fn queues() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// How long a pooled connection may have been idle to carry a request that
/// is not retried when it meets a connection the upstream closed (a `POST`, a
/// streamed body): well under any upstream's keep-alive, so that such a request
/// does not race the upstream's keep-alive timer closing it.
pub const UNRETRIED_MAX_IDLE: Duration = Duration::from_millis(500);

/// Idle keep-alive connections to one endpoint.
#[derive(Debug)]
pub struct Pool {
    /// One lock-free queue per data-plane worker (hyper's connections).
    idle: Box<[ArrayQueue<Idle>]>,
    /// The same for cutover's own HTTP/1.1 connections.
    direct: Box<[ArrayQueue<IdleConn>]>,
    idle_timeout: Duration,
    /// The shared HTTP/2 connection, for `protocol: h2` targets.
    h2: ArcSwapOption<H2Sender>,
    /// Set while the target drains: returned connections are closed.
    retired: std::sync::atomic::AtomicBool,
    /// How long the upstream says it keeps idle connections, less a margin
    /// ([`Pool::learn_keep_alive`]), in ms; `u64::MAX` until it says.
    upstream_keeps_ms: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl Idle {
    fn usable(&self, idle_timeout: Duration) -> bool {
        !self.sender.is_closed() && self.since.elapsed() <= idle_timeout
    }
}

#[derive(Debug)]
struct IdleConn {
    conn: h1::Conn,
    since: Instant,
}

impl Pool {
    /// An empty pool keeping at most `max_idle` connections for `idle_timeout`.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        let idle = (0..queues()).map(|_| ArrayQueue::new(max_idle.max(1))).collect();
        let direct = (0..queues()).map(|_| ArrayQueue::new(max_idle.max(1))).collect();
        Self {
            idle,
            direct,
            idle_timeout,
            h2: ArcSwapOption::empty(),
            retired: Default::default(),
            upstream_keeps_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// How long an idle connection is kept: the pool's `idle_timeout`, or
    /// less when the upstream said it closes them sooner.
    fn idle_limit(&self) -> Duration {
        let upstream = self.upstream_keeps_ms.load(std::sync::atomic::Ordering::Relaxed);
        if upstream == u64::MAX {
            self.idle_timeout
        } else {
            self.idle_timeout.min(Duration::from_millis(upstream))
        }
    }

    /// Takes in an upstream's `Keep-Alive: timeout=N`: its idle connections
    /// are kept `N` less a margin (1 s, or half of `N` when that is shorter),
    /// so one is not reused just as the upstream closes it.
    pub fn learn_keep_alive(&self, upstream: Duration) {
        let keep = upstream.saturating_sub(Duration::from_secs(1).min(upstream / 2));
        let ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX - 1);
        if self.upstream_keeps_ms.load(std::sync::atomic::Ordering::Relaxed) != ms {
            self.upstream_keeps_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// This worker's queue of hyper's connections.
    fn local(&self) -> &ArrayQueue<Idle> {
        &self.idle[worker() % self.idle.len()]
    }

    /// This worker's queue of cutover's own connections.
    fn local_direct(&self) -> &ArrayQueue<IdleConn> {
        &self.direct[worker() % self.direct.len()]
    }

    /// The shared HTTP/2 connection, when open and usable.
    pub fn h2(&self) -> Option<H2Sender> {
        let guard = self.h2.load();
        guard.as_deref().filter(|s| !s.is_closed()).cloned()
    }

    /// Shares `sender` as this endpoint's HTTP/2 connection.
    pub fn set_h2(&self, sender: H2Sender) {
        if !self.is_retired() {
            self.h2.store(Some(std::sync::Arc::new(sender)));
        }
    }

    /// Takes a live idle connection, if any; expired or closed ones are
    /// dropped. For a request that is not `retried` on a connection the
    /// upstream turns out to have closed, only one idle for at most
    /// [`UNRETRIED_MAX_IDLE`] is taken (older ones stay for other requests).
    pub fn checkout(&self, retried: bool) -> Option<Sender> {
        take(self.local(), self.idle_limit(), retried, |c| c.since, |c| !c.sender.is_closed()).map(|c| c.sender)
    }

    /// Returns a connection whose exchange is complete; dropped when the pool
    /// is full or retired.
    pub fn checkin(&self, sender: Sender) {
        if !sender.is_closed() && !self.is_retired() {
            let _ = self.local().push(Idle { sender, since: Instant::now() });
            // Retired meanwhile: what was just pushed must not outlive the switch.
            if self.is_retired() {
                self.close_idle();
            }
        }
    }

    /// Takes a live idle connection of cutover's own client, if any (for a
    /// request not `retried`, as [`Pool::checkout`]).
    pub fn checkout_h1(&self, retried: bool) -> Option<h1::Conn> {
        take(self.local_direct(), self.idle_limit(), retried, |c| c.since, |c| c.conn.is_usable()).map(|c| c.conn)
    }

    /// Returns a connection of cutover's own client whose exchange is complete
    /// (closed instead when the pool is full or retired).
    pub fn checkin_h1(&self, conn: h1::Conn) {
        if !self.is_retired() {
            let _ = self.local_direct().push(IdleConn { conn, since: Instant::now() });
            if self.is_retired() {
                self.close_idle();
            }
        }
    }

    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Retires the pool (its target no longer takes new traffic: idle
    /// connections are closed now, finished ones from then on) or puts it back
    /// in use.
    pub fn set_retired(&self, retired: bool) {
        let was = self.retired.swap(retired, std::sync::atomic::Ordering::Relaxed);
        if retired && !was {
            self.close_idle();
        }
    }

    /// Closes every idle connection, the shared HTTP/2 one included (it ends
    /// once the streams still open on it finish).
    pub fn close_idle(&self) {
        for queue in self.direct.iter() {
            while queue.pop().is_some() {}
        }
        for queue in self.idle.iter() {
            while queue.pop().is_some() {}
        }
        self.h2.store(None);
    }

    /// Closes idle connections that expired or that the upstream closed.
    pub fn sweep(&self) {
        let limit = self.idle_limit();
        for queue in self.direct.iter() {
            retain(queue, |c| c.since.elapsed() <= limit);
        }
        for queue in self.idle.iter() {
            retain(queue, |c| c.usable(limit));
        }
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(ArrayQueue::len).sum::<usize>() + self.direct.iter().map(ArrayQueue::len).sum::<usize>()
    }
}

/// Pops the first idle connection of `queue` that has been idle at most
/// `limit` and that `usable` accepts (expired or unusable ones are closed).
/// For a request not `retried`, one idle longer than [`UNRETRIED_MAX_IDLE`]
/// is put back for other requests: the queue is oldest first, so such a
/// request looks past older ones, once round at most.
fn take<T>(
    queue: &ArrayQueue<T>,
    limit: Duration,
    retried: bool,
    since: impl Fn(&T) -> Instant,
    mut usable: impl FnMut(&mut T) -> bool,
) -> Option<T> {
    let (mut put_back, mut round) = (0, None);
    while let Some(mut c) = queue.pop() {
        let idle = since(&c).elapsed();
        if idle > limit {
            continue;
        }
        if !retried && idle > UNRETRIED_MAX_IDLE {
            let _ = queue.push(c);
            put_back += 1;
            if put_back >= *round.get_or_insert_with(|| queue.len()) {
                return None;
            }
            continue;
        }
        if usable(&mut c) {
            return Some(c);
        }
    }
    None
}

/// Keeps the entries of `queue` for which `keep` holds (one pass; entries
/// pushed meanwhile by a worker may be looked at again next time).
fn retain<T>(queue: &ArrayQueue<T>, keep: impl Fn(&T) -> bool) {
    for _ in 0..queue.len() {
        match queue.pop() {
            Some(c) if keep(&c) => {
                let _ = queue.push(c);
            }
            Some(_) => {}
            None => break,
        }
    }
}

/// Why a new upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect or the HTTP handshake failed.
    #[error("connect to {0} failed: {1}")]
    Io(String, io::Error),
    /// TCP connect took longer than the connect timeout.
    #[error("connect to {0} timed out")]
    Timeout(String),
    /// The HTTP handshake failed.
    #[error("handshake with {0} failed: {1}")]
    Handshake(String, hyper::Error),
    /// The TLS handshake failed (untrusted certificate, wrong name, …).
    #[error("TLS with {0} failed: {1}")]
    Tls(String, io::Error),
}

impl ConnectError {
    /// Whether the connect timed out (as opposed to being refused or failing).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectError::Timeout(_))
    }
}

/// TLS to an upstream (`tls: true` on a target): the client configuration
/// (CA roots and ALPN) and the name the certificate must be valid for.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Connector with the roots (the target's `ca`, or the public web roots) and
    /// ALPN; `None` when they could not be loaded: every connection fails (closed).
    connector: Option<tokio_rustls::TlsConnector>,
    /// `server_name`, or `None` to use the endpoint's host.
    pub server_name: Option<rustls_pki_types::ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).finish()
    }
}

impl UpstreamTls {
    /// A connector trusting `ca` (PEM; the public web roots when `None`),
    /// offering `h2` or `http/1.1` by ALPN.
    pub fn new(ca: Option<&std::path::Path>, server_name: Option<&str>, h2: bool) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(path) => {
                for cert in cutover_config::tls::load_certs(path)? {
                    roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        let server_name = server_name
            .map(|n| {
                rustls_pki_types::ServerName::try_from(n.to_string()).map_err(|e| format!("server_name {n:?}: {e}"))
            })
            .transpose()?;
        Ok(Self { connector: Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))), server_name })
    }

    /// TLS that fails closed: no connection to the target succeeds.
    pub fn closed() -> Self {
        Self { connector: None, server_name: None }
    }
}

/// A connection to an upstream, plain or TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens a connection to `address` within `timeout`, with TLS when `tls` is given.
pub async fn connect_stream(
    address: &str,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<Stream, ConnectError> {
    let Some(tls) = tls else { return Ok(Stream::Plain(connect_tcp(address, timeout).await?)) };
    let Some(connector) = &tls.connector else {
        let e = io::Error::other("the target's TLS roots could not be loaded (see the log)");
        return Err(ConnectError::Tls(address.to_string(), e));
    };
    let tcp = connect_tcp(address, timeout).await?;
    let name = match &tls.server_name {
        Some(n) => n.clone(),
        None => {
            let host = address.rsplit_once(':').map_or(address, |(h, _)| h).trim_matches(['[', ']']);
            rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| ConnectError::Tls(address.to_string(), io::Error::new(io::ErrorKind::InvalidInput, e)))?
        }
    };
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
        Ok(Err(e)) => Err(ConnectError::Tls(address.to_string(), e)),
        Err(_) => Err(ConnectError::Timeout(address.to_string())),
    }
}

/// Opens a TCP connection (`TCP_NODELAY`) within `timeout`.
pub async fn connect_tcp(address: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(address.to_string(), e)),
        Err(_) => return Err(ConnectError::Timeout(address.to_string())),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a new connection to `address` for cutover's own HTTP/1.1 client.
pub async fn connect_h1(address: &str, tls: Option<&UpstreamTls>, timeout: Duration) -> Result<h1::Conn, ConnectError> {
    Ok(h1::Conn::new(connect_stream(address, tls, timeout).await?))
}

/// Opens a new HTTP/1.1 connection to `address` and spawns its driver task.
pub async fn connect(address: &str, tls: Option<&UpstreamTls>, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = connect_stream(address, tls, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Handshake(address.to_string(), e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection closed with an error");
        }
    });
    Ok(sender)
}

/// Opens a new HTTP/2 connection to `address` (ALPN over TLS, else prior
/// knowledge) and spawns its driver task.
pub async fn connect_h2(address: &str, tls: Option<&UpstreamTls>, timeout: Duration) -> Result<H2Sender, ConnectError> {
    let stream = connect_stream(address, tls, timeout).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Handshake(address.to_string(), e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream h2 connection closed with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose TLS roots could not be loaded is never connected to, not
    /// even over TCP: it fails closed, never falls back to plain HTTP.
    #[tokio::test]
    async fn closed_tls_never_connects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let r = connect_stream(&address, Some(&UpstreamTls::closed()), Duration::from_secs(1)).await;
        assert!(matches!(r, Err(ConnectError::Tls(..))), "{r:?}");
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "a TCP connection was opened");
    }
}
