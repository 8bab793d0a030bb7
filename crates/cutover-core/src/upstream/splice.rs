//! Moving a response body from the upstream's socket to the client's with
//! `splice(2)` through a pipe (Linux): the kernel passes the pages on, so the
//! bytes are never copied into user space and back out, which is most of what
//! relaying a large body costs.
//!
//! Each thread keeps a few empty pipes for the next body; a pipe that still
//! holds bytes when a transfer fails is closed instead.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{ready, Context, Poll};

use rustix::pipe::{fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The pipe capacity asked for. An unprivileged process past its pipe quota
/// (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default) gets less.
const PIPE_SIZE: usize = 256 * 1024;
/// The least capacity worth splicing through: with less, copying is cheaper.
const MIN_CAPACITY: usize = 64 * 1024;
/// Empty pipes each thread keeps.
const KEPT_PER_THREAD: usize = 16;

thread_local! {
    static KEPT: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe, and how many bytes are in it.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    held: usize,
}

impl Pipe {
    /// An empty pipe: one this thread kept, or a new one; none when no pipe
    /// of at least 64 KiB can be had (out of descriptors, past the pipe quota).
    pub fn take() -> Option<Pipe> {
        if let Some(pipe) = KEPT.with_borrow_mut(Vec::pop) {
            return Some(pipe);
        }
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).ok()?;
        let capacity = fcntl_setpipe_size(&write, PIPE_SIZE).or_else(|_| fcntl_getpipe_size(&write)).ok()?;
        (capacity >= MIN_CAPACITY).then_some(Pipe { read, write, capacity, held: 0 })
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

    /// Moves bytes from `from` through the pipe to `to` until `left` (the
    /// bytes still to take from `from`) is zero and the pipe is empty, or
    /// until neither socket is ready. Ready with the bytes `to` took in this
    /// call (zero only when all is done); pending when it took none yet. An end of
    /// stream on `from` before `left` bytes came is an `UnexpectedEof` error.
    pub fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        left: &mut u64,
    ) -> Poll<io::Result<u64>> {
        let mut moved = 0u64;
        loop {
            // Each step spends from the task's budget, as tokio's own reads and
            // writes do, so that one fast transfer cannot keep the thread from
            // every other connection.
            let coop = match tokio::task::coop::poll_proceed(cx) {
                Poll::Ready(coop) => coop,
                Poll::Pending if moved > 0 => return Poll::Ready(Ok(moved)),
                Poll::Pending => return Poll::Pending,
            };
            if self.held > 0 {
                let out = to.try_io(Interest::WRITABLE, || {
                    splice(&self.read, None, to, None, self.held, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)
                        .map_err(io::Error::from)
                });
                match out {
                    Ok(n) => {
                        coop.made_progress();
                        self.held -= n;
                        moved += n as u64;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if moved > 0 {
                            return Poll::Ready(Ok(moved));
                        }
                        ready!(to.poll_write_ready(cx))?;
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if *left == 0 {
                return Poll::Ready(Ok(moved));
            }
            let want = (*left).min(self.capacity as u64) as usize;
            let into = from.try_io(Interest::READABLE, || {
                splice(from, None, &self.write, None, want, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)
                    .map_err(io::Error::from)
            });
            match into {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the end of the body",
                    )))
                }
                Ok(n) => {
                    coop.made_progress();
                    self.held = n;
                    *left -= n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if moved > 0 {
                        return Poll::Ready(Ok(moved));
                    }
                    ready!(from.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}
