//! Data-plane workers: one current-thread tokio runtime per CPU, each accepting
//! on its own `SO_REUSEPORT` socket of every listener. A request and the
//! upstream connection it uses live on the same thread (each worker has its own
//! idle queue in every pool), so a request costs no cross-thread wake-up. The
//! control plane (admin API, health checks, controller) runs on the main runtime.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cutover_proxy::{ListenerConfig, Proxy};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// Worker threads to run: one per CPU.
pub fn count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Binds `addr` once per worker with `SO_REUSEPORT` (the first bind picks the
/// port when `addr` says 0). Must run inside a tokio runtime.
pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 {
        // `SO_REUSEPORT` would let a second cutover share the port without a
        // word: a plain bind first finds anyone already listening there.
        let probe = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
    }
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    for _ in 0..workers {
        let at = out.first().map_or(Ok(addr), std::net::TcpListener::local_addr)?;
        let socket = if at.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        // Accepted sockets inherit it (Linux): no set_nodelay per connection.
        socket.set_nodelay(true)?;
        socket.bind(at)?;
        out.push(socket.listen(1024)?.into_std()?);
    }
    Ok(out)
}

/// One listener's sockets (one per worker) and how it serves.
pub struct Listener {
    /// A socket per worker, from [`bind`].
    pub sockets: Vec<std::net::TcpListener>,
    /// Shared by all of its sockets (`max_connections` counts across workers).
    pub config: ListenerConfig,
}

/// Starts the workers; each serves its socket of every listener until `stop`,
/// then drains for at most `deadline`.
pub fn spawn(
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
    deadline: Duration,
) -> io::Result<Vec<JoinHandle<()>>> {
    let workers = listeners.first().map_or(0, |l| l.sockets.len());
    let mut per_worker: Vec<Vec<(std::net::TcpListener, ListenerConfig)>> = (0..workers).map(|_| Vec::new()).collect();
    for listener in listeners {
        for (worker, socket) in per_worker.iter_mut().zip(listener.sockets) {
            worker.push((socket, listener.config.clone()));
        }
    }
    let mut threads = Vec::with_capacity(workers);
    for (i, sockets) in per_worker.into_iter().enumerate() {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name(format!("cutover-worker-{i}")).spawn(move || {
            cutover_core::upstream::set_worker(i);
            runtime.block_on(async move {
                let mut serving = Vec::new();
                for (socket, config) in sockets {
                    match TcpListener::from_std(socket) {
                        Ok(l) => serving.push(tokio::spawn(cutover_proxy::serve(
                            l,
                            proxy.clone(),
                            config,
                            stop.clone().cancelled_owned(),
                            deadline,
                        ))),
                        Err(e) => tracing::error!(worker = i, error = %e, "cannot serve a listener socket"),
                    }
                }
                for s in serving {
                    let _ = s.await;
                }
            });
        })?;
        threads.push(thread);
    }
    Ok(threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted sockets inherit the listener's TCP_NODELAY, which is why the
    /// data plane sets it once per listening socket, not per connection.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let sockets = bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let listener = TcpListener::from_std(sockets.into_iter().next().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
