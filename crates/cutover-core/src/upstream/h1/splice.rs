//! Moving the rest of a response body from the upstream's socket to the
//! client's with `splice(2)` through a pipe (Linux): the kernel passes the
//! pages on, so the bytes are never copied into user space and back out,
//! which is most of what relaying a large body costs.
//!
//! Pipes count against a per-user kernel quota (`pipe-user-pages-soft`) and
//! take two file descriptors each, so the process holds at most
//! [`MAX_PIPES`] at once (kept and in use); each thread keeps a few empty
//! ones for the next body, and one that still holds bytes is closed.
//!
//! A `splice` into a socket whose peer is gone raises `SIGPIPE` (there is no
//! `MSG_NOSIGNAL` for it): harmless, since Rust's runtime ignores `SIGPIPE`
//! before `main`, and the call fails with `EPIPE`.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};

use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Error, Framing, ResponseBody, Stream};

/// The capacity asked for each pipe.
const PIPE_SIZE: usize = 256 * 1024;
/// The least capacity worth splicing through (an unprivileged process past
/// its pipe quota gets two pages): with less, copying is cheaper.
const MIN_CAPACITY: usize = 64 * 1024;
/// Pipes the process holds at most: 32 MiB of capacity, half the default
/// per-user quota (64 MiB), which other processes of the user share.
const MAX_PIPES: usize = 128;
/// Empty pipes each thread keeps.
const KEPT_PER_THREAD: usize = 8;

/// Pipes open now, kept or in use.
static OPEN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static KEPT: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Whether a body goes by `splice(2)`.
#[derive(Debug)]
pub(super) enum State {
    /// Not tried yet.
    Untried,
    /// Through this pipe.
    Through(Pipe),
    /// No pipe could be had for it: it is copied.
    Unavailable,
}

impl State {
    /// Whether bytes of the body wait in the pipe.
    pub(super) fn holds_bytes(&self) -> bool {
        matches!(self, State::Through(pipe) if !pipe.is_empty())
    }
}

impl ResponseBody {
    /// Readies the rest of the body to be spliced ([`ResponseBody::poll_splice`]):
    /// how much is left, for a `Content-Length` body on a plain connection
    /// with none of it buffered (what is buffered goes out as frames first),
    /// once a pipe is in hand. None otherwise (no pipe is tried twice for a
    /// body): the body is read as frames.
    pub fn prepare_splice(&mut self) -> Option<u64> {
        let conn = self.conn.as_ref()?;
        let (Framing::Length(left), Stream::Plain(_), true) = (&self.framing, &conn.io, conn.buf.is_empty()) else {
            return None;
        };
        match self.splice {
            State::Through(_) => {}
            State::Unavailable => return None,
            State::Untried => match Pipe::take() {
                Some(pipe) => self.splice = State::Through(pipe),
                None => {
                    self.splice = State::Unavailable;
                    return None;
                }
            },
        }
        Some(*left)
    }

    /// Moves the rest of a body readied by [`prepare_splice`](ResponseBody::prepare_splice)
    /// into `to`, never more than its length: ready with the bytes `to` took
    /// (zero once the body is done, or when it was not readied); pending
    /// while the socket it waits on, the upstream's or (when the pipe holds
    /// bytes) the client's, is not ready. The connection goes back to the
    /// pool once the last byte is in the pipe. Once this was called, poll it
    /// to the end or drop the body: reading it as frames is an error.
    pub fn poll_splice(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<Result<u64, Error>> {
        let mut pipe = match std::mem::replace(&mut self.splice, State::Unavailable) {
            State::Through(pipe) => pipe,
            other => {
                self.splice = other;
                return Poll::Ready(Ok(0));
            }
        };
        let polled = self.splice_through(&mut pipe, cx, to);
        if matches!(polled, Poll::Ready(Err(_))) || matches!(self.framing, Framing::Done) {
            pipe.recycle();
        } else {
            self.splice = State::Through(pipe);
        }
        polled
    }

    /// Whether the body waits on the client (the pipe holds bytes) rather than on the upstream.
    pub fn splice_waits_on_client(&self) -> bool {
        self.splice.holds_bytes()
    }

    fn splice_through(&mut self, pipe: &mut Pipe, cx: &mut Context<'_>, to: &TcpStream) -> Poll<Result<u64, Error>> {
        let mut moved = 0u64;
        loop {
            // Each step spends from the task's budget, as tokio's own reads and
            // writes do, so that one fast transfer cannot hold the thread.
            let coop = match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(coop) => coop,
                Poll::Pending if moved > 0 => return Poll::Ready(Ok(moved)),
                Poll::Pending => return Poll::Pending,
            };
            let Framing::Length(left) = self.framing else { return Poll::Ready(Ok(moved)) };
            let step = if !pipe.is_empty() {
                match pipe.poll_drain(cx, to) {
                    Poll::Ready(Err(e)) => {
                        self.finish(false);
                        return Poll::Ready(Err(Error::Client(e)));
                    }
                    other => other.map_ok(|n| moved += n as u64),
                }
            } else if left > 0 {
                let Some(Stream::Plain(from)) = self.conn.as_ref().map(|c| &c.io) else {
                    return Poll::Ready(Ok(moved));
                };
                let want = left.min(pipe.capacity() as u64) as usize;
                match pipe.poll_fill(cx, from, want) {
                    Poll::Ready(Ok(0)) => {
                        self.finish(false);
                        return Poll::Ready(Err(Error::Invalid("connection closed before the end of the body")));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.framing = Framing::Length(left - n as u64);
                        if left == n as u64 {
                            // All of it is in the pipe: the connection can serve another request.
                            self.release(true);
                        }
                        Poll::Ready(Ok(()))
                    }
                    other => other.map_ok(|_| ()),
                }
            } else {
                self.finish(true);
                return Poll::Ready(Ok(moved));
            };
            match step {
                Poll::Ready(Ok(())) => coop.made_progress(),
                Poll::Ready(Err(e)) => {
                    self.finish(false);
                    return Poll::Ready(Err(Error::Io(e)));
                }
                Poll::Pending if moved > 0 => return Poll::Ready(Ok(moved)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A pipe, and how many bytes are in it.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    held: usize,
}

impl Pipe {
    /// An empty pipe: one this thread kept, or a new one; none when the
    /// process holds [`MAX_PIPES`] already or no pipe of at least 64 KiB
    /// can be had (out of descriptors, past the pipe quota).
    pub fn take() -> Option<Pipe> {
        if let Some(pipe) = KEPT.with_borrow_mut(Vec::pop) {
            return Some(pipe);
        }
        if OPEN.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let Ok((read, write)) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC) else {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return None;
        };
        // From here the pipe's own drop counts it out.
        let mut pipe = Pipe { read, write, capacity: 0, held: 0 };
        pipe.capacity = fcntl_setpipe_size(&pipe.write, PIPE_SIZE).or_else(|_| fcntl_getpipe_size(&pipe.write)).ok()?;
        (pipe.capacity >= MIN_CAPACITY).then_some(pipe)
    }

    /// Gives an empty pipe back to this thread's pipes; one still holding bytes is closed.
    pub fn recycle(self) {
        if self.held == 0 {
            KEPT.with_borrow_mut(|kept| {
                if kept.len() < KEPT_PER_THREAD {
                    kept.push(self);
                }
            });
        }
    }

    /// Whether the pipe holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// How many bytes the pipe takes at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `want` bytes from `from` into the pipe, which must be
    /// empty: ready with the bytes moved (zero at `from`'s end of stream).
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, from: &TcpStream, want: usize) -> Poll<io::Result<usize>> {
        debug_assert!(self.held == 0, "a pipe is filled only when empty");
        loop {
            let filled = from.try_io(Interest::READABLE, || {
                splice(from, None, &self.write, None, want, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)
                    .map_err(io::Error::from)
            });
            match filled {
                Ok(n) => {
                    self.held += n;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(from.poll_read_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Moves what the pipe holds (some of it, at least) into `to`: ready
    /// with the bytes moved.
    pub fn poll_drain(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<usize>> {
        loop {
            let drained = to.try_io(Interest::WRITABLE, || {
                splice(&self.read, None, to, None, self.held, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)
                    .map_err(io::Error::from)
            });
            match drained {
                Ok(n) => {
                    self.held -= n;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(to.poll_write_ready(cx))?,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}
