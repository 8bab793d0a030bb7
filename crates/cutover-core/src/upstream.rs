//! Connections to upstream endpoints: connect with a timeout, HTTP/1.1
//! handshake, and a small per-endpoint pool of idle keep-alive connections.
//!
//! The pool is LIFO (the warmest connection first), bounded by `max_idle`,
//! and drops connections idle longer than `idle_timeout` (keep it shorter
//! than the upstream's own keep-alive). A connection is returned only after
//! its response body was read to the end.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The request body type sent upstream: the client's body, streamed.
pub type UpstreamBody = Incoming;

/// A ready-to-use HTTP/1.1 connection to one endpoint.
pub type Sender = http1::SendRequest<UpstreamBody>;

/// Idle keep-alive connections to one endpoint.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

impl Pool {
    /// An empty pool keeping at most `max_idle` connections for `idle_timeout`.
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self { idle: Mutex::new(Vec::new()), max_idle, idle_timeout }
    }

    /// Takes the most recently used live idle connection, if any.
    pub fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        if idle.first().is_some_and(|c| c.since.elapsed() > self.idle_timeout) {
            idle.remove(0);
        }
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed() && c.since.elapsed() <= self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    /// Returns a connection whose exchange is complete.
    pub fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() >= self.max_idle {
                idle.remove(0);
            }
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
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
    /// The HTTP/1.1 handshake failed.
    #[error("handshake with {0} failed: {1}")]
    Handshake(String, hyper::Error),
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

/// Opens a new HTTP/1.1 connection to `address` and spawns its driver task.
pub async fn connect(address: &str, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = connect_tcp(address, timeout).await?;
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
