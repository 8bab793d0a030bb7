//! Test harness: real origins, a real proxy and admin API on ephemeral
//! loopback ports, and small HTTP clients. Every test talks over sockets.
#![allow(dead_code)]

pub mod h2_frames;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cutover_admin::Admin;
use cutover_core::state::{FileStore, State, StateError, StateStore};
use cutover_core::Controller;
use cutover_metrics::Metrics;
use cutover_proxy::ListenerConfig;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What an origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: http::Version,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body_len: usize,
    /// The request's trailers, if it had any.
    pub trailers: Option<HeaderMap>,
    /// Which of the origin's connections (numbered from 0 as accepted) carried it.
    pub conn: usize,
}

/// A real HTTP origin on 127.0.0.1 that answers with its name.
///
/// Paths: `/up` → `ok`; `/slow?ms=N` → waits N ms; `/echo` → the request body;
/// `/stream?chunks=N&ms=M` → N chunks M ms apart; `/status/N` → status N;
/// anything else → its name. Every answer carries `x-origin: NAME`.
pub struct Origin {
    pub addr: SocketAddr,
    pub name: String,
    /// Requests seen, health probes excluded.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// The connections open now, by number.
    open: Arc<Mutex<std::collections::HashSet<usize>>>,
    /// How it misbehaves (switchable at any time).
    pub faults: Arc<Faults>,
    stop: CancellationToken,
}

/// Switchable misbehaviour of an [`Origin`].
#[derive(Default)]
pub struct Faults {
    /// Every request (health probes aside) gets 500.
    pub fail: std::sync::atomic::AtomicBool,
    /// Every Nth request gets 500 (0: never).
    pub fail_every: AtomicUsize,
    /// `/up` answers 503.
    pub health_fail: std::sync::atomic::AtomicBool,
    /// `/up` alternates between 200 and 503.
    pub flap: std::sync::atomic::AtomicBool,
    /// `/up` answers without `x-app-version`.
    pub no_version: std::sync::atomic::AtomicBool,
    served: AtomicUsize,
    probes: AtomicUsize,
}

impl Faults {
    fn request_fails(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        let every = self.fail_every.load(Ordering::Relaxed);
        self.fail.load(Ordering::Relaxed) || (every > 0 && n.is_multiple_of(every))
    }

    /// Health probes answered so far.
    pub fn probes(&self) -> usize {
        self.probes.load(Ordering::Relaxed)
    }

    fn probe_fails(&self) -> bool {
        let n = self.probes.fetch_add(1, Ordering::Relaxed);
        self.health_fail.load(Ordering::Relaxed) || (self.flap.load(Ordering::Relaxed) && n % 2 == 1)
    }
}

impl Origin {
    pub async fn start(name: &str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, name)
    }

    /// Serves on an already-bound listener (to restart an origin on the same port).
    pub fn serve(listener: TcpListener, name: &str) -> Origin {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let faults = Arc::new(Faults::default());
        let stop = CancellationToken::new();
        let open = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let origin = Origin {
            addr,
            name: name.to_string(),
            seen: seen.clone(),
            connections: connections.clone(),
            open: open.clone(),
            faults: faults.clone(),
            stop: stop.clone(),
        };
        let name: Arc<str> = name.into();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                let conn = connections.fetch_add(1, Ordering::Relaxed);
                open.lock().unwrap().insert(conn);
                let (name, seen, stop, faults, open) =
                    (name.clone(), seen.clone(), stop.clone(), faults.clone(), open.clone());
                tokio::spawn(async move {
                    let service =
                        service_fn(move |req| origin_answer(req, conn, name.clone(), seen.clone(), faults.clone()));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = served => {}
                        _ = stop.cancelled() => {}
                    }
                    open.lock().unwrap().remove(&conn);
                });
            }
        });
        origin
    }

    /// Stops accepting and drops every open connection (a killed upstream).
    pub fn kill(&self) {
        self.stop.cancel();
    }

    /// Requests seen so far (health probes excluded).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// How many connections that carried requests (health probes excluded) are open now.
    pub fn open_data_connections(&self) -> usize {
        let open = self.open.lock().unwrap();
        let mut conns: Vec<usize> =
            self.seen.lock().unwrap().iter().map(|s| s.conn).filter(|c| open.contains(c)).collect();
        conns.sort_unstable();
        conns.dedup();
        conns.len()
    }

    /// How many connections are open now (health probes' included).
    pub fn open_connections(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    /// How many connections that carried a request for `path` are open now.
    pub fn open_connections_for(&self, path: &str) -> usize {
        let open = self.open.lock().unwrap();
        let mut conns: Vec<usize> = self
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path && open.contains(&s.conn))
            .map(|s| s.conn)
            .collect();
        conns.sort_unstable();
        conns.dedup();
        conns.len()
    }

    /// How many connections carried requests (health probes excluded).
    pub fn data_connections(&self) -> usize {
        let mut conns: Vec<usize> = self.seen.lock().unwrap().iter().map(|s| s.conn).collect();
        conns.sort_unstable();
        conns.dedup();
        conns.len()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn query(req: &Request<Incoming>) -> HashMap<String, u64> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

async fn origin_answer(
    req: Request<Incoming>,
    conn: usize,
    name: Arc<str>,
    seen: Arc<Mutex<Vec<Seen>>>,
    faults: Arc<Faults>,
) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_string();
    let q = query(&req);
    let probe = path == "/up";
    let method = req.method().clone();
    let version = req.version();
    let headers = req.headers().clone();
    let (body, trailers) = match req.into_body().collect().await {
        Ok(c) => {
            let trailers = c.trailers().cloned();
            (c.to_bytes(), trailers)
        }
        Err(_) => Default::default(),
    };
    if !probe {
        let body_len = body.len();
        seen.lock().unwrap().push(Seen { version, method, path: path.clone(), headers, body_len, trailers, conn });
    }
    let full = |b: Bytes| Full::new(b).boxed();
    let resp = if probe {
        let mut r = Response::new(full(Bytes::from_static(b"ok\n")));
        if faults.probe_fails() {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        if !faults.no_version.load(Ordering::Relaxed) {
            r.headers_mut().insert("x-app-version", name.parse().unwrap());
        }
        r
    } else if faults.request_fails() {
        let mut r = Response::new(full(Bytes::from(format!("{name} failed"))));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    } else if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(q.get("ms").copied().unwrap_or(1000))).await;
        Response::new(full(Bytes::from(format!("{name} slow done"))))
    } else if path == "/echo" {
        Response::new(full(body))
    } else if path == "/stream" {
        let chunks = q.get("chunks").copied().unwrap_or(5);
        let ms = q.get("ms").copied().unwrap_or(100);
        let name = name.clone();
        let stream = futures_stream(chunks, ms, name);
        Response::new(StreamBody::new(stream).boxed())
    } else if path == "/trailers" {
        // A gRPC-style answer: data, then trailers.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-origin-trailer", name.parse().unwrap());
        let frames = vec![Ok(Frame::data(Bytes::from(format!("{name} with trailers")))), Ok(Frame::trailers(trailers))];
        let mut r = Response::new(StreamBody::new(tokio_stream::iter(frames)).boxed());
        r.headers_mut().insert("trailer", "grpc-status, x-origin-trailer".parse().unwrap());
        r
    } else if path == "/forge" {
        // Fields cutover sets itself, as an upstream might send them.
        let mut r = Response::new(full(Bytes::from(name.to_string())));
        r.headers_mut().insert("x-cutover-served-by", "forged".parse().unwrap());
        r.headers_mut().insert("set-cookie", "app=1".parse().unwrap());
        r
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(Bytes::from(format!("{name} status"))));
        *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        r
    } else {
        Response::new(full(Bytes::from(name.to_string())))
    };
    let mut resp = resp;
    resp.headers_mut().insert("x-origin", name.parse().unwrap());
    resp.headers_mut().insert("connection", "keep-alive, x-origin-hop".parse().unwrap());
    resp.headers_mut().insert("x-origin-hop", "secret".parse().unwrap());
    // Declares no trailers a body of known length could carry: hop-by-hop noise.
    if !resp.headers().contains_key("trailer") {
        resp.headers_mut().insert("trailer", "x-none".parse().unwrap());
    }
    Ok(resp)
}

fn futures_stream(
    chunks: u64,
    ms: u64,
    name: Arc<str>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..chunks {
            if tx.send(Ok(Frame::data(Bytes::from(format!("{name} chunk {i}\n"))))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A running proxy (data plane + admin API) in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The HTTPS listener, when [`Options::https`] was set.
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub controller: Arc<Controller>,
    pub dir: tempfile::TempDir,
    pub token: Option<String>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Options of [`Proxy::start_with`].
#[derive(Default)]
pub struct Options {
    pub token: Option<String>,
    /// Extra top-level YAML (limits, trusted_proxies, ...).
    pub extra: String,
    /// Reuse this directory (and its state file).
    pub dir: Option<tempfile::TempDir>,
    /// Also serve HTTPS (the `extra` YAML must then hold a `tls:` section).
    pub https: bool,
    /// While set, the next state save writes its file and then fails, as a
    /// directory fsync failing after the rename would ([`FailAfterWrite`]).
    pub fail_after_write: Option<Arc<AtomicBool>>,
}

/// The state file, whose save, while `fail` is set, puts the new file in
/// place and then reports an error (once).
pub struct FailAfterWrite {
    pub inner: FileStore,
    pub fail: Arc<AtomicBool>,
}

impl StateStore for FailAfterWrite {
    fn load(&self) -> Result<Option<State>, StateError> {
        self.inner.load()
    }

    fn save(&self, state: &State) -> Result<(), StateError> {
        self.inner.save(state)?;
        match self.fail.swap(false, Ordering::SeqCst) {
            true => Err(StateError::Io {
                path: "state.json".into(),
                source: std::io::Error::other("injected fsync failure"),
            }),
            false => Ok(()),
        }
    }
}

impl Proxy {
    /// Starts a proxy whose `sites:` section is `sites_yaml` (indented as a list).
    pub async fn start(sites_yaml: &str) -> Proxy {
        Self::start_with(sites_yaml, Options::default()).await
    }

    pub async fn start_with(sites_yaml: &str, opts: Options) -> Proxy {
        watch_for_proxy_panics();
        let dir = opts.dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
        let admin_cfg = match &opts.token {
            Some(t) => {
                std::fs::write(dir.path().join("token"), t).unwrap();
                "admin: { listen: 127.0.0.1:0, token_file: token }".to_string()
            }
            None => "admin: { listen: 127.0.0.1:0 }".to_string(),
        };
        let listen = if opts.https { "{ http: 127.0.0.1:0, https: 127.0.0.1:0 }" } else { "{ http: 127.0.0.1:0 }" };
        let yaml = format!(
            "listen: {listen}\n{admin_cfg}\nstate: {{ path: state.json }}\nshutdown_timeout: 5s\n{}\nsites:\n{sites_yaml}",
            opts.extra
        );
        let mut config =
            cutover_config::parse(&yaml, dir.path()).unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{yaml}"));
        let https_listener = match opts.https {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        // The real port, for redirects to HTTPS.
        config.listen.https = https_listener.as_ref().map(|l| l.local_addr().unwrap());
        let metrics = Metrics::new();
        let file = FileStore::new(&config.state_path);
        let store: Arc<dyn StateStore> = match opts.fail_after_write {
            Some(fail) => Arc::new(FailAfterWrite { inner: file, fail }),
            None => Arc::new(file),
        };
        std::fs::write(dir.path().join("cutover.yaml"), &yaml).unwrap();
        let path = Some(dir.path().join("cutover.yaml"));
        let controller = Controller::start(config.clone(), path, store, metrics.clone()).expect("controller starts");
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin) = (http.local_addr().unwrap(), admin_listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let proxy = Arc::new(cutover_proxy::Proxy::new(controller.table()));
        let lc = |scheme: &'static str, tls| ListenerConfig::new(scheme, config.limits, &metrics, tls);
        let mut tasks = Vec::new();
        let mut https = None;
        if let Some(listener) = https_listener {
            let store = Arc::new(cutover_proxy::tls::TlsStore::new(&config.tls).expect("test certificates load"));
            https = Some(listener.local_addr().unwrap());
            let reload_store = store.clone();
            controller.on_reload(Box::new(move |new| reload_store.reload(&new.tls)));
            let lc = lc("https", Some(store));
            let stopped = stop.clone().cancelled_owned();
            tasks.push(tokio::spawn(cutover_proxy::serve(
                listener,
                proxy.clone(),
                lc,
                stopped,
                Duration::from_secs(5),
            )));
        }
        let stopped = stop.clone().cancelled_owned();
        tasks.push(tokio::spawn(cutover_proxy::serve(http, proxy, lc("http", None), stopped, Duration::from_secs(5))));
        let api = Arc::new(Admin::new(controller.clone(), config.admin.token.clone()));
        tasks.push(tokio::spawn(cutover_admin::serve(admin_listener, api, stop.clone().cancelled_owned())));
        Proxy { addr, https, admin, controller, dir, token: opts.token, stop, tasks }
    }

    /// Calls the admin API with this proxy's token.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        admin_call(self.admin, method, path, body, self.token.as_deref()).await
    }

    /// Switches `site` to `to` and asserts the switch was accepted.
    pub async fn switch(&self, site: &str, to: &str) {
        let (status, body) =
            self.api("POST", &format!("/v1/sites/{site}/switch"), Some(serde_json::json!({ "to": to }))).await;
        assert_eq!(status, 200, "switch {site} → {to} refused: {body}");
    }

    /// Waits until every endpoint of `site`'s `targets` is healthy.
    pub async fn wait_healthy(&self, site: &str, targets: &[&str]) {
        for _ in 0..200 {
            let (_, s) = self.api("GET", &format!("/v1/sites/{site}"), None).await;
            let all = targets.iter().all(|t| {
                s["targets"][t]["endpoints"]
                    .as_array()
                    .is_some_and(|eps| eps.iter().all(|e| e["healthy"] == Value::Bool(true)))
            });
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("targets {targets:?} of {site} never became healthy");
    }

    /// Stops the proxy and waits for its servers to finish.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.controller.shutdown();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.controller.shutdown();
        // A panic in a connection or control task ends only that task (tokio
        // catches it), so it would go unnoticed: every proxy's end checks.
        let panics = PROXY_PANICS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !panics.is_empty() && !std::thread::panicking() {
            panic!("the proxy panicked in this test process: {panics:?}");
        }
    }
}

/// Panics raised outside the tests' own code (in cutover or a dependency),
/// as "file:line: message".
static PROXY_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs, once per test process, a panic hook that records in
/// [`PROXY_PANICS`] every panic whose location is not under `tests/` (a
/// test's own failed assertion is), then reports it as before.
fn watch_for_proxy_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(at) = info.location().filter(|l| !l.file().starts_with("tests/")) {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let entry = format!("{}:{}: {message}", at.file(), at.line());
                PROXY_PANICS.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
            }
            report(info);
        }));
    });
}

/// YAML for one site with the given targets (`name → endpoints`), health on `/up` every 50 ms.
pub fn site(name: &str, hosts: &str, live: &str, targets: &[(&str, Vec<SocketAddr>)]) -> String {
    let mut s = format!("  - name: {name}\n    hosts: [{hosts}]\n    live: {live}\n    targets:\n");
    for (t, eps) in targets {
        let eps: Vec<String> = eps.iter().map(|a| format!("\"{a}\"")).collect();
        s.push_str(&format!("      {t}: {{ endpoints: [{}], version: {t}-v1 }}\n", eps.join(", ")));
    }
    s.push_str(
        "    health: { path: /up, interval: 50ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1 }\n",
    );
    s
}

/// An answer as a test sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    pub bytes: Bytes,
}

/// A single kept-alive HTTP/1.1 client connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    /// Sends `req`; `Err` on a transport error.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Answer, hyper::Error> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer { status, headers, body: String::from_utf8_lossy(&body).into(), bytes: body })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Answer, hyper::Error> {
        self.send(Request::get(path).header("host", host).body(Full::default()).unwrap()).await
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// One GET on a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Answer {
    Client::connect(addr).await.get(host, path).await.expect("request failed")
}

/// Calls an admin API at `addr`.
pub async fn admin_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let raw = body.map(|b| b.to_string()).unwrap_or_default();
    admin_raw(addr, method, path, &raw, token).await
}

/// Calls an admin API with a raw body.
pub async fn admin_raw(addr: SocketAddr, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let a =
        Client::connect(addr).await.send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.unwrap();
    let value = serde_json::from_str(&a.body).unwrap_or(Value::String(a.body));
    (a.status, value)
}

/// Reads a raw HTTP/1.1 answer to `raw` sent on a fresh connection (for malformed requests).
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into()
}

/// A loopback port nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Reads the next request head from `stream`, and its body when it has a
/// `Content-Length` or is chunked (without trailers; bytes after them stay in
/// `buf`): its method and target, or `None` once the connection ends.
pub async fn next_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let field = |wanted: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
    };
    let body = if field("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            if let Some(i) = buf[end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                break i + 5;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    } else {
        field("content-length").and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    while buf.len() < end + body {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    buf.drain(..end + body);
    let mut words = head.split(' ');
    Some((words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string()))
}

/// Reads a response body to its end: `"cut"` when it ends with an error,
/// `"completed"` otherwise; `None` when neither happened `within`.
pub async fn cut_or_completed(body: &mut Incoming, within: Duration) -> Option<&'static str> {
    let outcome = async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(_)) => return "cut",
                None => return "completed",
            }
        }
    };
    tokio::time::timeout(within, outcome).await.ok()
}

/// Whether `done` holds within `within` (checked every 10 ms).
pub async fn eventually(within: Duration, done: impl Fn() -> bool) -> bool {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// One switch of a [`switch_storm`]: when it was sent and acknowledged (since
/// the storm's `t0`), and the target it named.
#[derive(Debug, Clone, Copy)]
pub struct Switch {
    pub sent: Duration,
    pub acked: Duration,
    pub to: &'static str,
}

/// Switches `site` back and forth between `targets` (the first named first)
/// until `run_for` after `t0`, waiting `pause(i)` after the i-th switch.
pub async fn switch_storm(
    p: &Proxy,
    site: &str,
    targets: [&'static str; 2],
    t0: std::time::Instant,
    run_for: Duration,
    pause: impl Fn(usize) -> Duration,
) -> Vec<Switch> {
    let mut log = Vec::new();
    while t0.elapsed() < run_for {
        let (sent, to) = (t0.elapsed(), targets[log.len() % 2]);
        p.switch(site, to).await;
        log.push(Switch { sent, acked: t0.elapsed(), to });
        tokio::time::sleep(pause(log.len() - 1)).await;
    }
    log
}

/// Checks answers `(started, ended, served by)` against a switch log: each
/// request started more than `margin` after a switch was acknowledged went to
/// that switch's target, unless the next switch was sent before its answer
/// came back (then either target is right). Returns how many were checked and
/// a description of each misrouted one.
pub fn routed_after_acks(
    switches: &[Switch],
    answers: &[(Duration, Duration, String)],
    margin: Duration,
) -> (usize, Vec<String>) {
    let (mut checked, mut wrong) = (0, Vec::new());
    for (start, end, by) in answers {
        let Some(last) = switches.iter().rposition(|s| s.acked + margin < *start) else { continue };
        if switches.get(last + 1).is_some_and(|next| next.sent <= *end) {
            continue;
        }
        checked += 1;
        if by != switches[last].to {
            wrong.push(format!("request at {start:?} served by {by} after {:?}", switches[last]));
        }
    }
    (checked, wrong)
}
