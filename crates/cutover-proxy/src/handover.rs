//! A client connection's hand-over to hyper's HTTP/1.1 server, and its way
//! back. cutover's own server hands hyper a request it does not take (a
//! chunked body or one still on its way, an upgrade, HTTP/1.0, …) with the
//! bytes it has read. While hyper waits for a next request on that connection,
//! the head that arrives is judged first, as cutover's own server would judge
//! it: one for hyper (another such body) goes to hyper; any other (a plain
//! `GET`, a small `POST` with its body, or one cutover answers itself, such as
//! a request that could be read two ways, which hyper would read as chunked
//! without a word) brings the connection back to cutover's own server, with
//! those bytes, once hyper has let go of it. hyper is given the bytes of one
//! message at a time ([`MessageEnd`]: a head, then its body as its length or
//! its chunks say), so a request pipelined behind another, even in the same
//! packet, is judged before hyper reads it.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1::UpgradeableConnection;
use hyper::service::HttpService;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::activity::Activity;
use crate::h1_server::{self, Judged};
use crate::message_end::MessageEnd;
use crate::sniff::Prefixed;

/// What one read of a next request head asks for.
const READ_SIZE: usize = 4096;

/// The stream hyper's HTTP/1.1 server gets: the bytes cutover's own server
/// read first, then the connection, whose next request heads are judged
/// before hyper sees them. Its shutdown is skipped while the connection is
/// handed back (hyper shuts a stream down when it is done with it; the
/// client is not done).
#[derive(Debug)]
pub struct HandedOver<T> {
    /// The stream, after bytes for hyper that are to be read first.
    inner: Prefixed<T>,
    /// The start of a next request head, not judged yet (the prefix is
    /// empty while it holds bytes).
    judging: BytesMut,
    /// Where the message hyper is being given ends.
    message: MessageEnd,
    activity: Arc<Activity>,
    /// The largest request head cutover's own server reads.
    limit: usize,
}

impl<T> HandedOver<T> {
    /// `inner`, to be read after `prefix` (which starts with the head cutover's
    /// own server handed over), on the connection with `activity`.
    pub fn new(prefix: Bytes, inner: T, activity: Arc<Activity>, limit: usize) -> Self {
        let message = MessageEnd::of_head(&prefix);
        activity.set_message_read(false);
        Self { inner: Prefixed::new(prefix, inner), judging: BytesMut::new(), message, activity, limit }
    }
}

impl<T: AsyncRead + Unpin> HandedOver<T> {
    /// Reads a next request head until it can be judged: `Ready` once it
    /// is to be read by hyper (or the stream ended), `Pending` while it
    /// is incomplete or is to go back to cutover's own server.
    fn judge(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.judging.is_empty() {
                let head = self.judging.split().freeze();
                let judged = h1_server::judge(&head, self.limit);
                if let Judged::Hyper = judged {
                    self.message = MessageEnd::of_head(&head);
                    self.activity.set_message_read(false);
                    self.inner.set_prefix(head);
                    return Poll::Ready(Ok(()));
                }
                // (No copy: the judge kept no part of it.)
                self.judging = head.try_into_mut().unwrap_or_else(|b| BytesMut::from(&b[..]));
                if let Judged::Own = judged {
                    self.activity.ask_hand_back(true);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut rb = ReadBuf::uninit(&mut stack);
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The end of the stream: hyper closes on it (after a part of a
                // head, cutover's own server does, as it would have).
                if self.judging.is_empty() {
                    self.message = MessageEnd::Unknown;
                    return Poll::Ready(Ok(()));
                }
                self.activity.ask_hand_back(true);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.judging.extend_from_slice(rb.filled());
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HandedOver<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.message == MessageEnd::Reached {
            if this.activity.closing() || this.activity.upgraded() {
                // hyper finishes the connection (it was not let go of), or it is a
                // tunnel now: the bytes are its after all.
                this.message = MessageEnd::Unknown;
                this.inner.set_prefix(this.judging.split().freeze());
            } else if this.activity.hand_back_asked() {
                // Going back: hyper waits meanwhile. Judged while hyper was still
                // busy with the request before, it goes once hyper is done.
                if this.activity.can_hand_back() {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            } else {
                std::task::ready!(this.judge(cx))?;
            }
        }
        let before = buf.filled().len();
        if this.message != MessageEnd::Ambiguous {
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        }
        // Bytes past the message's end are not hyper's yet: judged first, with
        // what is left of the prefix after them.
        let end = this.message.follow(&buf.filled()[before..]);
        if this.message == MessageEnd::Ambiguous {
            // hyper's read of the body fails, and it closes the connection.
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a line of the chunked trailer section ends with a bare LF",
            )));
        }
        if let Some(n) = end {
            this.activity.set_message_read(true);
            this.judging.extend_from_slice(&buf.filled()[before + n..]);
            this.judging.extend_from_slice(&this.inner.take_prefix());
            buf.set_filled(before + n);
            if n == 0 {
                // Nothing of it was hyper's (an empty read is the end of the
                // stream to hyper): judge it first.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HandedOver<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.handing_back() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's HTTP/1.1 connection after a hand-over, as the connection's
/// server loop drives it.
pub trait HyperH1<IO>: Future<Output = hyper::Result<()>> + Unpin {
    /// Asks it to finish: after its response in flight, or at once when idle.
    fn graceful_shutdown(self: Pin<&mut Self>);

    /// The stream, and the bytes read from it that hyper did not parse, when
    /// it finished without an upgrade, or when it handed them to `unused`,
    /// the upgrade it prepared for a request that was not upgraded.
    fn into_io(self, unused: Option<OnUpgrade>) -> Option<(IO, Bytes)>;
}

impl<IO, S, B> HyperH1<IO> for UpgradeableConnection<TokioIo<HandedOver<IO>>, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        UpgradeableConnection::graceful_shutdown(self);
    }

    fn into_io(self, unused: Option<OnUpgrade>) -> Option<(IO, Bytes)> {
        let (io, read_buf) = match self.into_parts() {
            Some(parts) => (parts.io, parts.read_buf),
            None => {
                // hyper fulfils a pending upgrade as it finishes, at once.
                let mut unused = unused?;
                let Poll::Ready(Ok(upgraded)) = Pin::new(&mut unused).poll(&mut Context::from_waker(Waker::noop()))
                else {
                    return None;
                };
                let parts = upgraded.downcast::<TokioIo<HandedOver<IO>>>().ok()?;
                (parts.io, parts.read_buf)
            }
        };
        let over = io.into_inner();
        let (unread, io) = over.inner.into_parts();
        // In the order they came: what hyper read, then what it was not given yet.
        let mut rest = BytesMut::from(&read_buf[..]);
        rest.extend_from_slice(&unread);
        rest.extend_from_slice(&over.judging);
        Some((io, rest.freeze()))
    }
}

/// Polls hyper's connection `conn` (taken when it is done) and, once the
/// next request is one for cutover's own server and hyper waits with nothing
/// else to do, hands the connection back: [`Returned::Back`] with the stream
/// and the bytes of that request.
pub fn poll_back<IO, C: HyperH1<IO>>(
    conn: &mut Option<Box<C>>,
    activity: &Activity,
    cx: &mut Context<'_>,
) -> Poll<Returned<IO>> {
    // An unused upgrade hyper fulfilled holds the stream, which holds the
    // connection's activity: dropped when hyper is done, or they would keep
    // each other (and the socket) forever.
    let done = |r| {
        drop(activity.take_unused_upgrade());
        Poll::Ready(Returned::Done(r))
    };
    let Some(c) = conn.as_mut() else { return done(Ok(())) };
    if let Poll::Ready(r) = Pin::new(&mut **c).poll(cx) {
        return done(r);
    }
    if !activity.hand_back_asked() || !activity.can_hand_back() {
        return Poll::Pending;
    }
    // Idle: hyper's shutdown closes it at once, without a byte written (and
    // the stream's shutdown is skipped meanwhile).
    activity.set_handing_back(true);
    Pin::new(&mut **c).graceful_shutdown();
    let r = Pin::new(&mut **c).poll(cx);
    activity.set_handing_back(false);
    activity.ask_hand_back(false);
    match r {
        Poll::Ready(Ok(())) => match conn.take().and_then(|c| c.into_io(activity.take_unused_upgrade())) {
            Some((io, rest)) => Poll::Ready(Returned::Back(io, rest)),
            None => done(Ok(())),
        },
        Poll::Ready(Err(e)) => done(Err(e)),
        // Not idle after all: hyper ends the connection after its response,
        // as any shutdown does, and gets the judged head meanwhile.
        Poll::Pending => {
            activity.set_closing();
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// How hyper's part of a connection ended.
pub enum Returned<IO> {
    /// hyper is done with the connection: it is closed (or upgraded).
    Done(hyper::Result<()>),
    /// The connection is back, these bytes first.
    Back(IO, Bytes),
}
