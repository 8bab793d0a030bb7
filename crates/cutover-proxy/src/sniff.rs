//! Which HTTP version a client connection speaks, from its first bytes.
//!
//! HTTP/2 with prior knowledge opens with a fixed preface; anything else is
//! HTTP/1.x. hyper-util's auto builder finds out by reading 24 bytes, which
//! costs a second read system call for the rest of the request head and makes
//! hyper grow (copy) its read buffer on every new connection. Here the first
//! read takes whatever the client sent, up to 4 KiB (one system call for a
//! whole request head, usually), and [`Prefixed`] hands those bytes to hyper
//! before the socket.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What the first read asks for: a typical request head in one go.
pub(crate) const FIRST_READ: usize = 4096;

/// What a client connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// Reads the first bytes of `io`, after `early` (read already, perhaps
/// none), until the version is known. `None` when the client closed first.
pub async fn sniff<T: AsyncRead + Unpin>(io: &mut T, early: Bytes) -> io::Result<Option<(Speaks, Bytes)>> {
    let mut head = Bytes::new();
    let mut early = Some(early).filter(|e| !e.is_empty());
    loop {
        let chunk = match early.take() {
            Some(e) => e,
            None => std::future::poll_fn(|cx| read_some(Pin::new(&mut *io), cx)).await?,
        };
        if chunk.is_empty() {
            return Ok(None);
        }
        // Only a preface that comes in pieces gets here with bytes already read.
        head = if head.is_empty() { chunk } else { [&head[..], &chunk[..]].concat().into() };
        let k = head.len().min(H2_PREFACE.len());
        if head[..k] != H2_PREFACE[..k] {
            return Ok(Some((Speaks::Http1, head)));
        }
        if k == H2_PREFACE.len() {
            return Ok(Some((Speaks::Http2, head)));
        }
    }
}

/// One read, into a buffer on the stack that lives only for this poll: a
/// connection waiting for its first bytes holds no buffer, and what was read
/// is copied into an allocation of its own size (small and cheap for a
/// typical request head).
fn read_some<T: AsyncRead>(io: Pin<&mut T>, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut buf = ReadBuf::uninit(&mut stack);
    ready!(io.poll_read(cx, &mut buf))?;
    Poll::Ready(Ok(Bytes::copy_from_slice(buf.filled())))
}

/// An IO stream that first yields `prefix` (bytes already read from it).
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    /// `inner`, with `prefix` to be read first.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// Whether the prefix was all read.
    pub fn prefix_read(&self) -> bool {
        self.prefix.is_empty()
    }

    /// `bytes` to be read next, once the prefix was all read.
    pub fn set_prefix(&mut self, bytes: Bytes) {
        debug_assert!(self.prefix.is_empty());
        self.prefix = bytes;
    }

    /// Takes what is left of the prefix.
    pub fn take_prefix(&mut self) -> Bytes {
        std::mem::take(&mut self.prefix)
    }

    /// What is left of the prefix, and the stream.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Let go of the first read's buffer.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
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
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn sniffed(chunks: &[&[u8]]) -> Option<(Speaks, Bytes)> {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        for c in chunks {
            client.write_all(c).await.unwrap();
            tokio::task::yield_now().await;
        }
        drop(client);
        sniff(&mut server, Bytes::new()).await.unwrap()
    }

    #[tokio::test]
    async fn tells_versions_apart_and_keeps_every_byte() {
        let (v, b) = sniffed(&[b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"]).await.unwrap();
        assert_eq!((v, &b[..]), (Speaks::Http1, &b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"[..]));
        // The preface in pieces: still undecided after "PRI * HT".
        let (v, b) = sniffed(&[b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\nframes"]).await.unwrap();
        assert_eq!(v, Speaks::Http2);
        assert!(b.starts_with(H2_PREFACE));
        // Starts like the preface, then is not it.
        let (v, b) = sniffed(&[b"PRI", b" / HTTP/1.1\r\n"]).await.unwrap();
        assert_eq!((v, &b[..]), (Speaks::Http1, &b"PRI / HTTP/1.1\r\n"[..]));
        assert!(sniffed(&[]).await.is_none());
    }

    #[tokio::test]
    async fn prefixed_reads_the_prefix_first() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = Prefixed::new(Bytes::from_static(b"hello"), server);
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
}
