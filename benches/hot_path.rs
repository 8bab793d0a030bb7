//! Request hot-path benchmarks: header rewriting, and one request through a
//! real in-process proxy compared with the same request sent straight to the
//! origin.
//!
//! Hypotheses:
//! * `headers/rewrite`: the four header rules a forwarded request goes
//!   through (`remove_hop_by_hop`, `drop_underscore_names`, `set_forwarded`,
//!   `ensure_request_id`) take well under 1 µs on a realistic browser request
//!   of about eight fields.
//! * `headers/encode_added` vs `headers/encode_inserted`: for a request
//!   without a body, cutover's own upstream client writes the forwarded
//!   fields and the request id after the map's fields instead of inserting
//!   them into the map (`headers::Added`), then encodes the upstream head.
//!   Writing them saves the map's hash probes, inserts and growth: the
//!   `added` form is cheaper, by a few hundred ns.
//! * `proxy/round_trip` vs `proxy/direct`: the proxy adds tens of µs per
//!   request on loopback (one more HTTP/1.1 parse and serialise on each side,
//!   a routing lookup, a pooled upstream connection, and two more loopback
//!   hops), so `round_trip - direct` is tens of µs.
//!
//! Groups:
//! * `headers/rewrite`     the four rules on a fresh copy of the request's
//!   `HeaderMap`, allocated the way hyper allocates a parsed request's map
//!   (`iter_batched` in batches of 32, so making the copy is not timed and
//!   the inputs stay in cache).
//! * `headers/rewrite_cloned_map` the same on a `HeaderMap::clone()`, which
//!   has no spare capacity (the first insert reallocates).
//! * `headers/step/*`      each rule alone; `step/none` is the harness alone.
//! * `headers/encode_inserted`, `headers/encode_added` the four rules and
//!   `h1::encode_head`, with the added fields inserted into the map or
//!   written after it.
//! * `proxy/direct`        one GET on a kept-alive HTTP/1.1 connection straight
//!   to the origin (a minimal hyper server answering `ok`).
//! * `proxy/round_trip`    the same GET on a kept-alive connection to a real
//!   cutover proxy (`Controller::start` + `cutover_proxy::serve`) in front of
//!   that origin.
//!
//! Everything (origin, proxy, client) runs on one current-thread tokio
//! runtime on 127.0.0.1, so the figures are latency on one core, not
//! throughput. No tracing subscriber is installed, so the access log costs
//! nothing here. Criterion has no async support with `default-features =
//! false`; each iteration is `rt.block_on(one request)`.
//!
//! Run with `cargo bench --bench hot_path`.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use cutover_core::state::FileStore;
use cutover_core::upstream::h1;
use cutover_core::Controller;
use cutover_metrics::Metrics;
use cutover_proxy::headers::{
    add_forwarded, add_request_id, drop_underscore_names, ensure_request_id, peer_value, remove_hop_by_hop,
    set_forwarded, Added, Present, RequestId,
};
use cutover_proxy::ListenerConfig;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// What a browser sends, as the proxy sees it after hyper parsed it.
fn browser_request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "shop.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("accept-language", "en-GB,en;q=0.5"),
        ("cookie", "session=3f2a9c1e77b04d5e9a1c; theme=dark; _ga=GA1.2.1234567890.1700000000"),
        ("connection", "keep-alive"),
        ("x-forwarded-for", "203.0.113.7"),
    ] {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn rewrite(headers: &mut HeaderMap, peer: IpAddr) -> RequestId {
    remove_hop_by_hop(headers);
    drop_underscore_names(headers);
    let host = headers.get(http::header::HOST).cloned();
    set_forwarded(headers, peer, false, "http", host.as_ref());
    ensure_request_id(headers)
}

/// The request's parts around `headers`, as the proxy has them (origin form).
fn parts_with(headers: HeaderMap) -> http::request::Parts {
    let (mut parts, ()) = Request::get("/products?page=2").body(()).expect("request").into_parts();
    parts.headers = headers;
    parts
}

/// The rules with the added fields inserted into the map, then the upstream head.
fn encode_inserted(parts: &mut http::request::Parts, peer: IpAddr) -> Vec<u8> {
    rewrite(&mut parts.headers, peer);
    h1::encode_request(parts, std::iter::empty(), &[])
}

/// The rules with the added fields written after the map's (what the proxy does).
fn encode_added(parts: &mut http::request::Parts, peer: &HeaderValue) -> Vec<u8> {
    remove_hop_by_hop(&mut parts.headers);
    drop_underscore_names(&mut parts.headers);
    let incoming = Present::of(&parts.headers);
    let host = parts.headers.get(http::header::HOST).cloned();
    let mut added = Added::default();
    add_forwarded(&mut parts.headers, incoming, peer, false, "http", host.as_ref(), &mut added);
    add_request_id(&mut parts.headers, incoming, &mut added);
    h1::encode_request(parts, added.iter(), &[])
}

/// A copy of `base` allocated the way hyper's HTTP/1 parser allocates a
/// request's map (`HeaderMap::default()` + `reserve(n)` + `append`), so it has
/// the same spare room for the fields the proxy adds. A plain `clone()` has
/// none: its entry vector is full, and the first insert reallocates it.
fn as_parsed(base: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::default();
    h.reserve(base.len());
    for (k, v) in base {
        h.append(k.clone(), v.clone());
    }
    h
}

/// Inputs per timed batch. Small, so the maps stay in cache as they are when
/// hyper has just parsed them; criterion's `SmallInput` would prepare ~10% of
/// all iterations at once (hundreds of MB), and the timed code would then
/// mostly measure cache misses on cold inputs.
const BATCH: BatchSize = BatchSize::NumIterations(32);

fn headers(c: &mut Criterion) {
    let base = browser_request_headers();
    let peer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 23));
    // The rules do what a forwarded request needs.
    let mut check = as_parsed(&base);
    let id = rewrite(&mut check, peer);
    assert!(!check.contains_key("connection"));
    assert_eq!(check["x-forwarded-for"], "198.51.100.23", "an untrusted peer's XFF is replaced");
    assert_eq!(check["x-forwarded-host"], "shop.example.com");
    assert_eq!(check["x-request-id"], id.as_str());

    let mut g = c.benchmark_group("headers");
    g.bench_function("rewrite", |b| {
        b.iter_batched(
            || as_parsed(&base),
            |mut h| {
                let id = rewrite(black_box(&mut h), black_box(peer));
                (h, id)
            },
            BATCH,
        )
    });
    // The same on a `clone()` of the map (no spare room).
    g.bench_function("rewrite_cloned_map", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                let id = rewrite(black_box(&mut h), black_box(peer));
                (h, id)
            },
            BATCH,
        )
    });
    // Where the time goes: each rule alone, on the same input.
    g.bench_function("step/remove_hop_by_hop", |b| {
        b.iter_batched(
            || as_parsed(&base),
            |mut h| {
                remove_hop_by_hop(black_box(&mut h));
                h
            },
            BATCH,
        )
    });
    g.bench_function("step/drop_underscore_names", |b| {
        b.iter_batched(
            || as_parsed(&base),
            |mut h| {
                drop_underscore_names(black_box(&mut h));
                h
            },
            BATCH,
        )
    });
    g.bench_function("step/set_forwarded", |b| {
        b.iter_batched(
            || as_parsed(&base),
            |mut h| {
                let host = h.get(http::header::HOST).cloned();
                set_forwarded(black_box(&mut h), black_box(peer), false, "http", host.as_ref());
                h
            },
            BATCH,
        )
    });
    g.bench_function("step/ensure_request_id", |b| {
        b.iter_batched(
            || as_parsed(&base),
            |mut h| {
                let id = ensure_request_id(black_box(&mut h));
                (h, id)
            },
            BATCH,
        )
    });
    // The whole rewrite plus the upstream head, both ways; same fields either way
    // (up to the request id, which is new each time).
    let peer_header = peer_value(peer);
    let strip_id = |head: Vec<u8>| -> Vec<String> {
        let text = String::from_utf8(head).expect("ascii head");
        let mut lines: Vec<String> =
            text.lines().filter(|l| !l.starts_with("x-request-id")).map(str::to_string).collect();
        lines.sort();
        lines
    };
    assert_eq!(
        strip_id(encode_inserted(&mut parts_with(as_parsed(&base)), peer)),
        strip_id(encode_added(&mut parts_with(as_parsed(&base)), &peer_header)),
    );
    g.bench_function("encode_inserted", |b| {
        b.iter_batched(
            || parts_with(as_parsed(&base)),
            |mut p| {
                let head = encode_inserted(black_box(&mut p), black_box(peer));
                (p, head)
            },
            BATCH,
        )
    });
    g.bench_function("encode_added", |b| {
        b.iter_batched(
            || parts_with(as_parsed(&base)),
            |mut p| {
                let head = encode_added(black_box(&mut p), black_box(&peer_header));
                (p, head)
            },
            BATCH,
        )
    });
    // The harness alone: batch timing and moving the input out.
    g.bench_function("step/none", |b| b.iter_batched(|| as_parsed(&base), |h| h, BATCH));
    g.finish();
}

/// Connections accepted and requests answered by the origin.
#[derive(Default)]
struct OriginCounts {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

/// A minimal origin: every request gets `200 ok`.
async fn start_origin(stop: CancellationToken, counts: Arc<OriginCounts>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = stop.cancelled() => return,
            };
            counts.connections.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            let counts = counts.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n")))) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

/// A real cutover data plane in front of `origin`; returns its address, the
/// controller and the temp dir holding its state file (keep both alive).
async fn start_proxy(origin: SocketAddr, stop: CancellationToken) -> (SocketAddr, Arc<Controller>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "listen: {{ http: 127.0.0.1:0 }}\n\
         state: {{ path: state.json }}\n\
         sites:\n  \
           - name: bench\n    \
             hosts: [\"*\"]\n    \
             live: blue\n    \
             targets:\n      \
               blue: {{ endpoints: [\"{origin}\"], version: v1 }}\n    \
             health: {{ interval: 1s, healthy_threshold: 1 }}\n"
    );
    let config =
        cutover_config::parse(&yaml, dir.path()).unwrap_or_else(|e| panic!("bench config invalid:\n{e}\n{yaml}"));
    let metrics = Metrics::new();
    let store = Arc::new(FileStore::new(&config.state_path));
    let controller = Controller::start(config.clone(), None, store, metrics.clone()).expect("controller starts");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let proxy = Arc::new(cutover_proxy::Proxy::new(controller.table()));
    let lc = ListenerConfig::new("http", config.limits, &metrics, None);
    tokio::spawn(cutover_proxy::serve(listener, proxy, lc, stop.cancelled_owned(), Duration::from_secs(1)));
    (addr, controller, dir)
}

/// One kept-alive HTTP/1.1 client connection.
async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    sender
}

/// One GET, body read to the end; returns the status and body length.
async fn one_request(sender: &mut SendRequest<Empty<Bytes>>) -> (u16, usize) {
    sender.ready().await.expect("connection ready");
    let req = Request::get("/").header("host", "shop.example.com").body(Empty::new()).expect("request");
    let resp = sender.send_request(req).await.expect("request sent");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body.len())
}

fn proxy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let stop = CancellationToken::new();
    let counts = Arc::new(OriginCounts::default());
    let (origin, proxy_addr, controller, _dir) = rt.block_on(async {
        let origin = start_origin(stop.clone(), counts.clone()).await;
        let (addr, controller, dir) = start_proxy(origin, stop.clone()).await;
        (origin, addr, controller, dir)
    });
    let (mut direct, mut proxied) = rt.block_on(async { (connect(origin).await, connect(proxy_addr).await) });
    // The proxy answers 200 with the origin's body once the endpoint is usable.
    wait_ok(&rt, &mut proxied);
    assert_eq!(rt.block_on(one_request(&mut direct)), (200, 3));

    let mut g = c.benchmark_group("proxy");
    g.bench_function("direct", |b| b.iter(|| black_box(rt.block_on(one_request(&mut direct)))));
    let (c0, r0) = (counts.connections.load(Ordering::Relaxed), counts.requests.load(Ordering::Relaxed));
    g.bench_function("round_trip", |b| b.iter(|| black_box(rt.block_on(one_request(&mut proxied)))));
    g.finish();
    // The proxy must reuse its pooled upstream connection: new origin
    // connections during round_trip are TCP health checks (one a second).
    let (c1, r1) = (counts.connections.load(Ordering::Relaxed), counts.requests.load(Ordering::Relaxed));
    if r1 > r0 {
        // (nothing to check when a filter such as `-- headers` skipped round_trip)
        eprintln!("proxy/round_trip: the origin answered {} requests on {} new connections", r1 - r0, c1 - c0);
        assert!((c1 - c0) * 1000 < r1 - r0, "the proxy opened an upstream connection per request");
    }
    // Both connections must still be the original kept-alive ones.
    assert!(!direct.is_closed() && !proxied.is_closed(), "a client connection was closed during the bench");

    drop((direct, proxied));
    stop.cancel();
    controller.shutdown();
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
}

fn wait_ok(rt: &Runtime, sender: &mut SendRequest<Empty<Bytes>>) {
    for _ in 0..200 {
        if rt.block_on(one_request(sender)) == (200, 3) {
            return;
        }
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(25)).await });
    }
    panic!("the proxy never answered 200 ok");
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    targets = headers, proxy
}
criterion_main!(benches);
