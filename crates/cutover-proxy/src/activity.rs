//! Per-connection activity: when bytes last moved and how many requests are
//! open, so an idle client connection can be closed after `idle_timeout`, and
//! whether an idle HTTP/1.1 connection can be parked (its hyper state dropped
//! while the socket waits for the next request).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_core::upstream::BodyProgress;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// Activity of one client connection.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Milliseconds since `opened` when bytes last moved.
    last_ms: AtomicU64,
    /// Requests whose response is not finished.
    open_requests: AtomicUsize,
    /// Requests read so far.
    requests: AtomicU64,
    /// Whether bytes were read since the last request finished (a request
    /// head may be half read: never park then).
    read_since_finish: AtomicBool,
    /// Milliseconds since `opened` when the first of those bytes came.
    head_since_ms: AtomicU64,
    /// Whether the last write could not complete (hyper still has bytes to send).
    write_blocked: AtomicBool,
    /// Whether hyper's server, after a hand-over, has been given every byte of
    /// the request it reads, to the end of its body ([`crate::handover`]).
    message_read: AtomicBool,
    /// Milliseconds since `opened` when the write now blocked first could not complete.
    blocked_since_ms: AtomicU64,
    /// Whether requests came over HTTP/2 (never parked).
    multiplexed: AtomicBool,
    /// Set while the connection is being parked: its next read without data
    /// is an end of stream for hyper, and its shutdown keeps the socket open.
    parking: AtomicBool,
    /// Set when the connection is asked to finish (shutdown, `idle_timeout`):
    /// cutover's own HTTP/1.1 server closes it after the response in flight.
    closing: AtomicBool,
    /// Set when the next request head, read while hyper's HTTP/1.1 server
    /// was idle, is one for cutover's own server ([`crate::handover`]).
    hand_back: AtomicBool,
    /// Set while hyper's HTTP/1.1 server hands the connection back to
    /// cutover's own: hyper's shutdown of the stream is skipped.
    handing_back: AtomicBool,
    /// Set when a request's connection became a tunnel (an upgrade): it is
    /// never handed back.
    upgraded: AtomicBool,
    /// The last request body hyper read from this connection: until it was
    /// read to its end, its rest cannot be told from a next request, so the
    /// connection is never parked (hyper closes it after the response).
    body: Mutex<Option<Arc<BodyProgress>>>,
    /// The upgrade hyper's HTTP/1.1 server prepared for the last request
    /// with an `Upgrade` field that was not upgraded: hyper hands the stream
    /// to it when it finishes, and a hand-back takes the stream from there.
    unused_upgrade: Mutex<Option<hyper::upgrade::OnUpgrade>>,
}

impl Activity {
    /// A connection opened now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            open_requests: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            read_since_finish: AtomicBool::new(false),
            head_since_ms: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            message_read: AtomicBool::new(false),
            blocked_since_ms: AtomicU64::new(0),
            multiplexed: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            hand_back: AtomicBool::new(false),
            handing_back: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            body: Mutex::new(None),
            unused_upgrade: Mutex::new(None),
        })
    }

    fn touch(&self) {
        self.last_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A request was read from this connection.
    pub fn request_started(&self) {
        self.open_requests.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests read so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// How long the connection has been open without sending a whole request
    /// head (zero once one arrived): bounded by `header_read_timeout`.
    pub fn waiting_for_first_request(&self) -> Duration {
        if self.requests() > 0 || self.open_requests.load(Ordering::Relaxed) > 0 {
            Duration::ZERO
        } else {
            self.opened.elapsed()
        }
    }

    /// How long an HTTP/1 request head has been arriving without being complete
    /// (zero when none is): bounded by `header_read_timeout`, a total-time limit
    /// that progress does not reset. (An HTTP/2 connection reads frames between
    /// requests; its idle time is what counts.)
    pub fn reading_head_for(&self) -> Duration {
        if self.open_requests.load(Ordering::Relaxed) > 0
            || !self.read_since_finish.load(Ordering::Relaxed)
            || self.multiplexed.load(Ordering::Relaxed)
        {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.head_since_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(since)
    }

    /// A request's response finished (or it left the connection).
    pub fn request_finished(&self) {
        self.open_requests.fetch_sub(1, Ordering::Relaxed);
        self.read_since_finish.store(false, Ordering::Relaxed);
        self.touch();
    }

    /// Counts a request that is read but not yet routed (held by a paused
    /// site) as open until the returned guard is dropped: it is neither idle
    /// nor a late head, so neither timeout closes its connection meanwhile.
    pub fn hold_open(self: &Arc<Self>) -> OpenWhileHeld {
        self.open_requests.fetch_add(1, Ordering::Relaxed);
        OpenWhileHeld(self.clone())
    }

    /// Part of the next request head is already buffered (it came with the
    /// previous request): it is being read from now on, so `header_read_timeout`
    /// bounds it, and the connection is not parked under it.
    pub fn head_buffered(&self) {
        self.head_started(self.opened.elapsed().as_millis() as u64);
    }

    /// Bytes of a request head arrived at `now_ms`: its time runs from the first of them.
    fn head_started(&self, now_ms: u64) {
        if !self.read_since_finish.swap(true, Ordering::Relaxed) {
            self.head_since_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Whether a request's response is not finished.
    pub fn open(&self) -> bool {
        self.open_requests.load(Ordering::Relaxed) > 0
    }

    /// Whether the connection carries HTTP/2.
    pub fn multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    /// The connection carries HTTP/2: it is never parked.
    pub fn mark_multiplexed(&self) {
        if !self.multiplexed.load(Ordering::Relaxed) {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
    }

    /// A request with a body was read: see [`Activity::parkable`].
    pub fn body_started(&self, progress: Arc<BodyProgress>) {
        *self.body.lock().unwrap_or_else(|e| e.into_inner()) = Some(progress);
    }

    /// Whether an HTTP/1.1 connection can be parked now: it served a request,
    /// has none open, read nothing since, has nothing left to write, read
    /// every request body to its end (an upstream may answer before it read
    /// the body: its late bytes are no new request), and has been idle for
    /// at least `after`.
    pub fn parkable(&self, after: Duration) -> bool {
        self.requests() > 0
            && !self.multiplexed.load(Ordering::Relaxed)
            && !self.read_since_finish.load(Ordering::Relaxed)
            && self.idle_for() >= after
            && self.all_read_all_written()
    }

    /// Nothing left to write, and the last request body read to its end
    /// (sent upstream, or read off the connection whole by hyper's server).
    fn all_read_all_written(&self) -> bool {
        !self.write_blocked.load(Ordering::Relaxed)
            && (self.message_read.load(Ordering::Relaxed)
                || self.body.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_none_or(|b| b.done()))
    }

    /// Whether (`true`) hyper's server has been given the whole request it
    /// reads, to the end of its body, or (`false`) is given a new one.
    pub fn set_message_read(&self, read: bool) {
        self.message_read.store(read, Ordering::Relaxed);
    }

    /// Whether hyper's HTTP/1.1 server, serving this connection after a
    /// hand-over, can give it back now: no request open, every request body
    /// read to its end, nothing left to write, no upgrade, not finishing.
    pub fn can_hand_back(&self) -> bool {
        !self.open() && !self.closing() && !self.upgraded() && self.all_read_all_written()
    }

    /// Asks (`true`) for the connection to go back to cutover's own server, or no more.
    pub fn ask_hand_back(&self, on: bool) {
        self.hand_back.store(on, Ordering::Relaxed);
    }

    /// Whether the connection is to go back to cutover's own server.
    pub fn hand_back_asked(&self) -> bool {
        self.hand_back.load(Ordering::Relaxed)
    }

    /// Starts (`true`) or ends (`false`) a hand-back to cutover's own server.
    pub fn set_handing_back(&self, on: bool) {
        self.handing_back.store(on, Ordering::Relaxed);
    }

    /// Whether the connection is being handed back to cutover's own server.
    pub fn handing_back(&self) -> bool {
        self.handing_back.load(Ordering::Relaxed)
    }

    /// Whether a request on this connection was upgraded (it is a tunnel).
    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// A request on this connection was upgraded: the connection is a tunnel
    /// from now on, and the request no longer counts as open on it.
    pub fn request_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
        self.request_finished();
    }

    /// Keeps the upgrade hyper prepared for a request that was not upgraded.
    pub fn keep_unused_upgrade(&self, upgrade: hyper::upgrade::OnUpgrade) {
        *self.unused_upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(upgrade);
    }

    /// The upgrade kept by [`Activity::keep_unused_upgrade`], if any.
    pub fn take_unused_upgrade(&self) -> Option<hyper::upgrade::OnUpgrade> {
        self.unused_upgrade.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Starts (`true`) or ends (`false`) parking.
    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Ordering::Relaxed);
    }

    /// Whether the connection is being parked.
    pub fn parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
    }

    /// Asks the connection to finish after the response in flight (none: at once).
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Whether the connection was asked to finish.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// How long a write has waited on a client that takes no bytes (zero when
    /// none waits): bounded by `idle_timeout`, open request or not.
    pub fn write_stalled_for(&self) -> Duration {
        if !self.write_blocked.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.blocked_since_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(since)
    }

    /// How long the connection has been idle: no open request, no bytes moving.
    pub fn idle_for(&self) -> Duration {
        if self.open_requests.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }
}

/// A held request's place among a connection's open requests ([`Activity::hold_open`]).
#[derive(Debug)]
pub struct OpenWhileHeld(Arc<Activity>);

impl Drop for OpenWhileHeld {
    fn drop(&mut self) {
        self.0.open_requests.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// An IO stream that records its activity. A parkable one hands its stream
/// back through `park` when hyper drops it while the connection is parking.
#[derive(Debug)]
pub struct Tracked<T> {
    inner: Option<T>,
    activity: Arc<Activity>,
    park: Option<oneshot::Sender<T>>,
}

impl<T> Tracked<T> {
    /// Wraps `inner`, recording into `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner: Some(inner), activity, park: None }
    }

    /// The same, and when dropped while parking, sends `inner` to `park`.
    pub fn parkable(inner: T, activity: Arc<Activity>, park: oneshot::Sender<T>) -> Self {
        Self { inner: Some(inner), activity, park: Some(park) }
    }

    /// The stream inside (none only while it is dropped).
    pub fn get_ref(&self) -> Option<&T> {
        self.inner.as_ref()
    }

    /// Records that bytes were read: the connection is not idle, and a
    /// request head has started if none was being read.
    fn read_some(&self) {
        let a = &self.activity;
        let now = a.opened.elapsed().as_millis() as u64;
        a.last_ms.store(now, Ordering::Relaxed);
        a.head_started(now);
    }

    fn io(&mut self) -> Pin<&mut T>
    where
        T: Unpin,
    {
        Pin::new(self.inner.as_mut().expect("the stream is only taken on drop"))
    }

    /// Records whether a write could not complete. (A write needs no time stamp:
    /// cutover writes only while a request is open, which is not idle, and the
    /// request's end stamps the connection.)
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        let blocked = r.is_pending();
        let a = &self.activity;
        if a.write_blocked.load(Ordering::Relaxed) != blocked {
            if blocked {
                a.blocked_since_ms.store(a.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            a.write_blocked.store(blocked, Ordering::Relaxed);
        }
    }
}

impl Tracked<tokio::net::TcpStream> {
    /// The client's first bytes when they are there already (most clients
    /// send a request as soon as they are connected), read at once and
    /// recorded as any read: the runtime learns that a new socket is readable
    /// only at its next look at the sockets, so a first read through it waits
    /// for that, and the connection arms its watchdog timer meanwhile. Empty
    /// when nothing came yet (or the read failed: the next read says how).
    pub fn read_now(&self) -> Bytes {
        let Some(socket) = self.get_ref() else { return Bytes::new() };
        let mut stack = [MaybeUninit::<u8>::uninit(); crate::sniff::FIRST_READ];
        match rustix::net::recv(socket, &mut stack, rustix::net::RecvFlags::empty()) {
            Ok(((filled, _), _)) if !filled.is_empty() => {
                self.read_some();
                Bytes::copy_from_slice(filled)
            }
            _ => Bytes::new(),
        }
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        if self.activity.parking() {
            if let (Some(park), Some(inner)) = (self.park.take(), self.inner.take()) {
                let _ = park.send(inner);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = self.io().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.read_some();
        }
        if self.park.is_some() && self.activity.parking() {
            match r {
                // Nothing to read: an end of stream for hyper, which then lets
                // go of the connection; the socket itself stays open.
                Poll::Pending => return Poll::Ready(Ok(())),
                // Data (or the client's own end): not parking after all.
                _ => self.activity.set_parking(false),
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = self.io().poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = self.io().poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.park.is_some() && self.activity.parking() {
            // Parking: hyper is done with the connection, the client is not.
            return Poll::Ready(Ok(()));
        }
        self.io().poll_shutdown(cx)
    }
}
