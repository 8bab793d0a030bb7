//! The data-plane server: a function of a bound listener and a shutdown future.
//!
//! Each accepted connection is served over HTTP/1.1 or HTTP/2, whichever its
//! first bytes show ([`crate::sniff`]: h2c with prior knowledge on a plain
//! listener): HTTP/1.1 by cutover's own server (`h1_server`) until a request
//! needs hyper's, HTTP/2 by hyper's. A watchdog closes connections idle for
//! `idle_timeout` (no open request, no bytes moving), and connections whose
//! request head took longer than `header_read_timeout` to arrive (a silent or
//! slow client; the first head is timed from the connection's opening). That
//! watchdog, one timer per connection, replaces hyper's own HTTP/1 header
//! timer, which would cost a timer per request. Beyond
//! `max_connections` new connections are closed at once. A plain HTTP/1.1
//! connection idle for `PARK_AFTER` (20 ms) is parked: its server state is
//! dropped and the socket alone waits for the next request, which gets a fresh
//! server. (hyper's connection, with its two 8 KiB buffers, first hands the
//! connection back to cutover's own server with any bytes of a next head it
//! holds.) On shutdown the
//! listener closes, every connection is asked to finish gracefully (h1 ends
//! after its in-flight response, h2 gets GOAWAY), and the caller's deadline
//! bounds the wait, upgraded tunnels included.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cutover_config::Limits;
use cutover_core::upstream::RequestBody;
use cutover_metrics::{IntCounter, IntGauge, Metrics};
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::{Activity, Tracked};
use crate::forward::{ClientConn, Proxy};
use crate::h1_server;
use crate::handover::{self, HandedOver, HyperH1, Returned};
use crate::sniff::{sniff, Prefixed, Speaks};
use crate::tls::TlsStore;

/// h2 streams one client connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// h2 reset streams a client may leave pending (rapid-reset guard).
const H2_MAX_PENDING_RESETS: usize = 20;
/// h2 resets cutover itself may send for a client's errors before GOAWAY.
const H2_MAX_LOCAL_RESETS: usize = 1024;
/// An HTTP/1.1 connection idle this long is parked (hyper's buffers freed),
/// as nginx frees a kept-alive connection's buffers: long enough that busy
/// connections never are, short enough that a burst of idle ones never holds
/// its peak memory (it costs a new hyper connection, a few µs, on wake-up).
const PARK_AFTER: Duration = Duration::from_millis(20);
/// The longest watchdog interval of a busy plain connection: no longer than
/// the first timer each request arms (`answer_within`), so that this timer is
/// due first and registering the request's is never the runtime's earliest.
/// tokio's timer writes the runtime's eventfd (a system call, and an
/// `epoll_wait` that returns at once) when a new timer is due before the one
/// its worker last slept until.
const BUSY_TICK: Duration = cutover_core::upstream::DRAIN_WATCH_AFTER;
/// How long a connection asked to finish (idle, or shutting down) may take to
/// close once it has no request open: hyper's HTTP/2 server waits for the
/// client's answer to its shutdown PING, a client that stops reading leaves a
/// last write pending. After that it is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How one listener serves its connections.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// `http` or `https` (sets `X-Forwarded-Proto`).
    pub scheme: &'static str,
    /// Timeouts and sizes.
    pub limits: Limits,
    /// Open client connections of this listener (`cutover_client_connections`).
    pub connections: IntGauge,
    /// Connections closed at once beyond `max_connections`.
    pub refused: IntCounter,
    /// TLS termination, for an HTTPS listener.
    pub tls: Option<Arc<TlsStore>>,
    /// `max_connections`, shared by every listener (and worker) cloned from this one.
    pub permits: Arc<Semaphore>,
}

impl ListenerConfig {
    /// A listener of `scheme` with `limits`, counting its connections in `metrics`.
    pub fn new(scheme: &'static str, limits: Limits, metrics: &Metrics, tls: Option<Arc<TlsStore>>) -> Self {
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let connections = metrics.client_connections.with_label_values(&[scheme]);
        let refused = metrics.client_connections_refused.with_label_values(&[scheme]);
        Self { scheme, limits, connections, refused, tls, permits }
    }
}

/// Serves `listener` until `shutdown` resolves, then drains open connections
/// and tunnels for at most `drain_deadline`. Returns when all are closed or the deadline passed.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    config: ListenerConfig,
    shutdown: impl Future<Output = ()>,
    drain_deadline: Duration,
) {
    let builder = Arc::new(Builders::new(&config.limits));
    let permits = config.permits.clone();
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut nodelay_inherited = None;
    let mut last_peer = (None, http::HeaderValue::from_static("-"));
    let mut refusals = Refusals::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            config.refused.inc();
            refusals.note(peer, config.limits.max_connections);
            continue;
        };
        // Linux hands the listener's TCP_NODELAY to accepted sockets (the
        // workers set it there): one system call less per connection.
        if !*nodelay_inherited.get_or_insert_with(|| stream.nodelay().unwrap_or(false)) {
            let _ = stream.set_nodelay(true);
        }
        // Clients often come from a few addresses (a load balancer, a CDN):
        // the last one's header value is reused.
        if last_peer.0 != Some(peer.ip()) {
            last_peer = (Some(peer.ip()), crate::headers::peer_value(peer.ip()));
        }
        let hold = Arc::new(ConnectionHold::new(config.connections.clone(), permit));
        let conn = Connection {
            builder: builder.clone(),
            proxy: proxy.clone(),
            client: ClientConn {
                peer,
                peer_value: last_peer.1.clone(),
                scheme: config.scheme,
                activity: Activity::new(),
                hold,
            },
            idle_timeout: config.limits.idle_timeout,
            header_read_timeout: config.limits.header_read_timeout,
            stop: stop.clone(),
        };
        // Each connection's future is boxed before it is spawned: the runtime
        // then moves a pointer into its task, not the whole future, several times over.
        match &config.tls {
            None => {
                connections.spawn(Box::pin(conn.run_plain(stream)));
            }
            Some(tls) => {
                let tls = tls.config();
                let timeout = config.limits.header_read_timeout;
                connections.spawn(Box::pin(async move {
                    let io = Tracked::new(stream, conn.client.activity.clone());
                    // The client's hello is read before rustls makes a connection
                    // state for it; rustls has no handshake timeout of its own.
                    let handshake = async {
                        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
                        hello.into_stream(tls).await
                    };
                    match tokio::time::timeout(timeout, handshake).await {
                        Ok(Ok(tls_stream)) => {
                            conn.serve(tls_stream, false).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }));
            }
        }
    }
    drop(listener);
    stop.cancel();
    connections.close();
    proxy.tunnels().close();
    let all_done = async {
        connections.wait().await;
        proxy.tunnels().wait().await;
    };
    if tokio::time::timeout(drain_deadline, all_done).await.is_err() {
        tracing::warn!(?drain_deadline, "shutdown deadline reached with work still in flight");
    }
}

/// One client connection and what it needs.
struct Connection {
    builder: Arc<Builders>,
    proxy: Arc<Proxy>,
    client: ClientConn,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    stop: CancellationToken,
}

/// A client connection's place under `max_connections` and in
/// `cutover_client_connections`, held until the connection — or the upgraded
/// tunnel that outlives its HTTP part — is closed.
#[derive(Debug)]
pub struct ConnectionHold {
    gauge: IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl ConnectionHold {
    fn new(gauge: IntGauge, permit: OwnedSemaphorePermit) -> Self {
        gauge.inc();
        Self { gauge, _permit: permit }
    }
}

impl Drop for ConnectionHold {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Connection {
    /// Serves a plain TCP connection. An idle HTTP/1.1 connection is parked:
    /// hyper's connection (its buffers and state) is dropped and the socket
    /// alone waits for the next request, `idle_timeout` or shutdown; then a
    /// fresh hyper connection takes over the same socket.
    async fn run_plain(self, mut stream: TcpStream) {
        let activity = self.client.activity.clone();
        loop {
            let (park, parked) = oneshot::channel();
            let io = Tracked::parkable(stream, activity.clone(), park);
            // Boxed: a parked connection's task keeps none of serve's state.
            if !Box::pin(self.serve(io, true)).await {
                return;
            }
            let Ok(socket) = parked.await else { return };
            let left = self.idle_timeout.saturating_sub(activity.idle_for());
            tokio::select! {
                ready = socket.readable() => if ready.is_err() { return },
                _ = tokio::time::sleep(left) => return,
                _ = self.stop.cancelled() => return,
            }
            activity.set_parking(false);
            stream = socket;
        }
    }

    /// Whether a request head (the first one timed from the connection's
    /// opening) has taken longer than `header_read_timeout`.
    fn head_late(&self) -> bool {
        let a = &self.client.activity;
        a.waiting_for_first_request() >= self.header_read_timeout || a.reading_head_for() >= self.header_read_timeout
    }

    /// Serves `io` with hyper until the connection ends; `true` when it ended
    /// because it was parked (only when `parkable`), and the socket is to be kept.
    async fn serve<IO>(&self, io: IO, parkable: bool) -> bool
    where
        IO: tokio::io::AsyncRead + h1_server::Transport + Send + 'static,
    {
        let peer = self.client.peer;
        let activity = self.client.activity.clone();
        let service = || {
            let (proxy, client) = (self.proxy.clone(), self.client.clone());
            service_fn(move |req: Request<Incoming>| {
                let (proxy, client) = (proxy.clone(), client.clone());
                // Open from the moment hyper has the head, before the future first
                // runs: hyper goes on reading the body meanwhile, and those bytes
                // are the request's (`handover` judges only between requests).
                let req = req.map(RequestBody::new);
                if let Some(progress) = req.body().progress() {
                    client.activity.body_started(progress);
                }
                let open = client.activity.hold_open();
                async move {
                    let Ok(resp) = proxy.handle(req, &client).await;
                    drop(open);
                    Ok::<_, std::convert::Infallible>(crate::body::fields_into_map(resp))
                }
            })
        };
        // One watchdog timer for the connection's whole life, reset at each
        // tick: every PARK_AFTER while it is quiet (so an idle one is parked
        // soon), at most every second while it is busy (more than one request
        // since the last tick: parking can wait, and so can the timer).
        let check_every = (self.idle_timeout.min(self.header_read_timeout) / 4).max(Duration::from_millis(50));
        let (quiet_tick, busy_tick) = match parkable {
            true => (check_every.min(PARK_AFTER), check_every.min(BUSY_TICK)),
            false => (check_every, check_every),
        };
        let mut seen = activity.requests();
        let mut next_tick = move |activity: &Activity| {
            let now = activity.requests();
            let busy = now - std::mem::replace(&mut seen, now) > 1;
            tokio::time::Instant::now() + if busy { busy_tick } else { quiet_tick }
        };
        let tick = tokio::time::sleep(quiet_tick);
        tokio::pin!(tick);
        // The first request head is due within header_read_timeout, and a
        // silent connection counts as idle.
        let mut io = io;
        let early = io.read_now();
        let first = {
            let sniffing = sniff(&mut io, early);
            tokio::pin!(sniffing);
            loop {
                tokio::select! {
                    biased;
                    r = &mut sniffing => break r,
                    _ = self.stop.cancelled() => return false,
                    _ = &mut tick => {
                        if self.head_late() || activity.idle_for() >= self.idle_timeout {
                            tracing::debug!(%peer, "no request in time (header_read_timeout or idle_timeout); closing");
                            return false;
                        }
                        tick.as_mut().reset(next_tick(&activity));
                    }
                }
            }
        };
        let (speaks, prefix) = match first {
            // HTTP/2 with prior knowledge starts a connection: one that spoke
            // HTTP/1.1 before it was parked goes on with it.
            Ok(Some((Speaks::Http2, prefix))) if activity.requests() > 0 => (Speaks::Http1, prefix),
            Ok(Some(x)) => x,
            Ok(None) => return false,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "client connection failed before its first request");
                return false;
            }
        };
        // Boxed, so that a parked connection's task keeps none of the server's state.
        let mut conn = match speaks {
            Speaks::Http1 => {
                let limit = self.builder.max_head;
                Served::Own(Box::pin(h1_server::serve(io, prefix, &self.proxy, &self.client, limit, self.idle_timeout)))
            }
            Speaks::Http2 => {
                activity.mark_multiplexed();
                let io = TokioIo::new(Prefixed::new(prefix, io));
                Served::H2(Box::pin(self.builder.h2.serve_connection(io, service())))
            }
        };
        let mut closing = false;
        loop {
            // Under cutover's own server the watchdog is polled only while no
            // request is open: an open request is neither idle nor a late head
            // (and the server bounds its own writes), so a connection that
            // closes after its request never arms a timer. (After the
            // connection's own poll, which may just have ended one.) hyper's
            // servers are watched throughout: HTTP/2 requests end in tasks of
            // their own, and their writes to a client that takes no bytes are
            // bounded here.
            let own = matches!(conn, Served::Own(_));
            let watch = std::future::poll_fn(|cx| {
                if own && activity.open() {
                    return Poll::Pending;
                }
                tick.as_mut().poll(cx)
            });
            tokio::select! {
                biased;
                r = &mut conn => match r {
                    Outcome::Ended(Ok(())) => break,
                    Outcome::Ended(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                        activity.set_parking(false);
                        break;
                    }
                    // A request cutover's own server does not take: hyper serves it.
                    Outcome::Handoff(io, rest) => {
                        let io = TokioIo::new(HandedOver::new(rest, io, activity.clone(), self.builder.max_head));
                        let hyper = self.builder.h1.serve_connection(io, service()).with_upgrades();
                        conn = Served::H1(Some(Box::new(hyper)), activity.clone());
                        if closing {
                            graceful_shutdown!(conn, activity);
                        }
                    }
                    // The next request is one for cutover's own server again.
                    Outcome::Handback(io, rest) => {
                        if !rest.is_empty() {
                            activity.head_buffered();
                        }
                        let limit = self.builder.max_head;
                        let own = h1_server::serve(io, rest, &self.proxy, &self.client, limit, self.idle_timeout);
                        conn = Served::Own(Box::pin(own));
                    }
                },
                _ = self.stop.cancelled(), if !closing => {
                    closing = true;
                    activity.set_parking(false);
                    graceful_shutdown!(conn, activity);
                    tick.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                }
                _ = watch => {
                    if closing {
                        // Asked to finish and still open: cut it unless a request is in flight.
                        if !activity.open() {
                            tracing::debug!(%peer, "connection did not finish within its close grace; closing");
                            break;
                        }
                        tick.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                        continue;
                    }
                    tick.as_mut().reset(next_tick(&activity));
                    if activity.write_stalled_for() >= self.idle_timeout {
                        tracing::debug!(%peer, "the client read nothing for idle_timeout; closing");
                        break;
                    }
                    // No whole request head in time (a silent client, a slow one, a
                    // stalled h2 preface): nothing is in flight, close at once.
                    if self.head_late() {
                        tracing::debug!(%peer, "request head not received within header_read_timeout; closing");
                        activity.set_parking(false);
                        break;
                    }
                    if activity.idle_for() >= self.idle_timeout {
                        closing = true;
                        activity.set_parking(false);
                        graceful_shutdown!(conn, activity);
                        tick.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                    } else if parkable && activity.parkable(PARK_AFTER) {
                        if matches!(conn, Served::H1(..)) {
                            // hyper may hold the start of a next head, read with the
                            // request before it: the connection goes back to cutover's
                            // own server first, with those bytes, which parks it once
                            // it is idle (or times the head).
                            activity.ask_hand_back(true);
                        } else {
                            // The server's next read gets an end of stream and lets go.
                            activity.set_parking(true);
                        }
                    }
                }
            }
        }
        // Dropping hyper's connection drops the stream, which goes back to
        // `run_plain` if it is parking.
        drop(conn);
        parkable && activity.parking()
    }
}

/// hyper's HTTP/1.1 and HTTP/2 servers, configured from the limits.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// The largest request head cutover's own HTTP/1.1 server reads (larger: hyper's).
    max_head: usize,
}

impl Builders {
    fn new(limits: &Limits) -> Self {
        let mut h1 = http1::Builder::new();
        // The connection's watchdog enforces `header_read_timeout`.
        h1.header_read_timeout(None).max_buf_size(limits.max_header_bytes.max(8192)).keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(limits.max_header_bytes as u32)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024);
        Self { h1, h2, max_head: limits.max_header_bytes }
    }
}

/// One client connection's server: cutover's own HTTP/1.1 server, hyper's
/// HTTP/1.1 server for requests it does not take (the connection comes back
/// for one it takes: [`crate::handover`]), or hyper's HTTP/2 server.
enum Served<A, B, C> {
    /// hyper's, until it is done or hands the connection back (then `None`).
    H1(Option<Box<A>>, Arc<Activity>),
    H2(Pin<Box<B>>),
    Own(Pin<Box<C>>),
}

/// How a [`Served`] connection's server finished.
enum Outcome<IO> {
    /// The connection is done (an error: it broke).
    Ended(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    /// cutover's own server hands the connection to hyper's, these bytes first.
    Handoff(IO, bytes::Bytes),
    /// hyper's server hands the connection back, these bytes first.
    Handback(IO, bytes::Bytes),
}

impl<A, B, C, IO> Future for Served<A, B, C>
where
    A: HyperH1<IO>,
    B: Future<Output = hyper::Result<()>>,
    C: Future<Output = std::io::Result<h1_server::Ended<IO>>>,
{
    type Output = Outcome<IO>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let ended = |r: hyper::Result<()>| Outcome::Ended(r.map_err(Into::into));
        match self.get_mut() {
            Served::H1(c, activity) => handover::poll_back(c, activity, cx).map(|r| match r {
                Returned::Done(r) => ended(r),
                Returned::Back(io, rest) => Outcome::Handback(io, rest),
            }),
            Served::H2(c) => c.as_mut().poll(cx).map(ended),
            Served::Own(c) => c.as_mut().poll(cx).map(|r| match r {
                Ok(h1_server::Ended::Closed) => Outcome::Ended(Ok(())),
                Ok(h1_server::Ended::Handoff(io, rest)) => Outcome::Handoff(io, rest),
                Err(e) => Outcome::Ended(Err(e.into())),
            }),
        }
    }
}

/// Asks a [`Served`] connection to finish: h1 after its in-flight response,
/// h2 with GOAWAY. (A macro: hyper's connections have no common trait for it.)
macro_rules! graceful_shutdown {
    ($conn:expr, $activity:expr) => {
        match &mut $conn {
            Served::H1(c, _) => {
                $activity.set_closing();
                if let Some(c) = c {
                    std::pin::Pin::new(&mut **c).graceful_shutdown();
                }
            }
            Served::H2(c) => c.as_mut().graceful_shutdown(),
            Served::Own(_) => $activity.set_closing(),
        }
    };
}
use graceful_shutdown;

/// Connections refused beyond `max_connections`, logged at most once a second
/// (a flood of them must not flood the log too).
#[derive(Debug, Default)]
struct Refusals {
    since_last: u64,
    last: Option<std::time::Instant>,
}

impl Refusals {
    fn note(&mut self, peer: SocketAddr, limit: usize) {
        self.since_last += 1;
        if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(%peer, limit, refused = self.since_last, "connection limit reached; closing new connections");
            (self.since_last, self.last) = (0, Some(std::time::Instant::now()));
        }
    }
}
