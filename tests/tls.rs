//! TLS at the edge (SPEC §2 tls, §3 Protocols): SNI, ALPN h2, hot
//! certificate reload, bad certificates refused, redirect to HTTPS, and
//! TLS to upstreams with a private CA, stalled handshakes cut, TLS 1.2 and
//! 1.3, no ALPN. Certificates are made at test time.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use support::{Options, Origin, Proxy};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A private CA that signs leaf certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    /// Writes `NAME.pem` and `NAME.key` for `names` into `dir`; returns the leaf DER.
    fn leaf(&self, dir: &Path, file: &str, names: &[&str]) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.cert.pem()).unwrap();
    }

    fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config(rustls::DEFAULT_VERSIONS, alpn))
    }

    /// A client configuration trusting this CA, offering only `versions`.
    fn config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

async fn handshake(ca: &Ca, addr: SocketAddr, sni: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    ca.client(alpn).connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await.expect("TLS handshake")
}

/// An HTTP/1.1 client over `tls`.
async fn http1(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    sender
}

fn served_cert(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

fn tls_yaml(files: &[&str]) -> String {
    let certs: Vec<String> = files.iter().map(|f| format!("{{ cert: {f}.pem, key: {f}.key }}")).collect();
    format!("tls: {{ certificates: [{}] }}", certs.join(", "))
}

fn site(origin: SocketAddr, extra: &str) -> String {
    format!(
        "  - name: shop\n    hosts: [a.test, b.test]\n    live: blue\n    targets:\n      blue: {{ endpoints: [\"{origin}\"] }}\n{extra}"
    )
}

async fn start(
    ca: &Ca,
    origin: SocketAddr,
    site_extra: &str,
) -> (Proxy, CertificateDer<'static>, CertificateDer<'static>) {
    let dir = tempfile::tempdir().unwrap();
    let a = ca.leaf(dir.path(), "a", &["a.test"]);
    let b = ca.leaf(dir.path(), "b", &["b.test"]);
    let opts = Options { https: true, extra: tls_yaml(&["a", "b"]), dir: Some(dir), ..Default::default() };
    (Proxy::start_with(&site(origin, site_extra), opts).await, a, b)
}

/// SNI picks the right certificate; an unknown name gets the first one; the
/// upstream sees `X-Forwarded-Proto: https`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let (p, a, b) = start(&ca, origin.addr, "").await;
    let https = p.https.unwrap();
    assert_eq!(served_cert(&handshake(&ca, https, "b.test", &[b"http/1.1"]).await), b);
    assert_eq!(served_cert(&handshake(&ca, https, "a.test", &[b"http/1.1"]).await), a);
    // An unknown name gets the default (first) certificate: the client rejects it.
    let tcp = TcpStream::connect(https).await.unwrap();
    let err = ca.client(&[]).connect(ServerName::try_from("c.test").unwrap(), tcp).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");

    let mut sender = http1(handshake(&ca, https, "b.test", &[b"http/1.1"]).await).await;
    let resp = sender
        .send_request(Request::get("/").header("host", "b.test").body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.seen()[0].headers["x-forwarded-proto"], "https");
}

/// A kept-alive HTTPS connection lives until `idle_timeout`, not
/// `header_read_timeout`: the header timeout bounds a head that is arriving,
/// not the wait for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_keep_alive_outlives_header_read_timeout() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "a", &["a.test"]);
    let extra = format!("{}\nlimits: {{ header_read_timeout: 300ms, idle_timeout: 60s }}", tls_yaml(&["a"]));
    let opts = Options { https: true, extra, dir: Some(dir), ..Default::default() };
    let p = Proxy::start_with(&site(origin.addr, ""), opts).await;
    let mut sender = http1(handshake(&ca, p.https.unwrap(), "a.test", &[b"http/1.1"]).await).await;
    for _ in 0..2 {
        sender.ready().await.expect("the kept-alive connection was closed");
        let req = Request::get("/").header("host", "a.test").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    }
    assert!(!sender.is_closed());
}

/// Clients that connect and send nothing, or only the start of a hello, hold
/// up no one: with more of them open than any handshake limit, a real client's
/// handshake and request are answered long before they are cut at
/// `header_read_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_clients_delay_no_handshake() {
    use tokio::io::AsyncWriteExt;
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "a", &["a.test"]);
    let extra = format!("{}\nlimits: {{ header_read_timeout: 20s }}", tls_yaml(&["a"]));
    let opts = Options { https: true, extra, dir: Some(dir), ..Default::default() };
    let p = Proxy::start_with(&site(origin.addr, ""), opts).await;
    let https = p.https.unwrap();
    let mut silent = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(https).await.unwrap();
        if i % 2 == 0 {
            // A TLS record header, and no more.
            s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        }
        silent.push(s);
    }
    let request = async {
        let mut sender = http1(handshake(&ca, https, "a.test", &[b"http/1.1"]).await).await;
        let req = Request::get("/").header("host", "a.test").body(Empty::<Bytes>::new()).unwrap();
        sender.send_request(req).await.unwrap().status()
    };
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), request).await;
    assert_eq!(status.expect("the handshake waited behind silent clients"), 200);
    drop(silent);
}

/// ALPN h2 from the client, HTTP/1.1 to the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_to_an_http1_upstream() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let (p, _, _) = start(&ca, origin.addr, "").await;
    let tls = handshake(&ca, p.https.unwrap(), "a.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let resp =
            sender.send_request(Request::get("https://a.test/").body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "blue");
    }
    let seen = origin.seen();
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_11 && s.headers["host"] == "a.test"));
}

/// A-2 over TLS: 8 connections negotiated by ALPN h2 each keep 4 streams in
/// flight while blue and green are switched 24 times, 100–250 ms apart. No
/// stream fails; no connection is closed or sent a GOAWAY by a switch (each
/// connection future is still running and the HTTPS listener counts exactly
/// these 8 at the end); each connection then takes a new stream, served by
/// the last target named; every stream started more than 5 ms after an
/// acknowledged switch went to the target it named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_connections_outlive_a_switch_storm() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let ca = Ca::new();
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "a", &["a.test"]);
    let opts = Options { https: true, extra: tls_yaml(&["a"]), dir: Some(dir), ..Default::default() };
    let targets = [("blue", vec![blue.addr]), ("green", vec![green.addr])];
    let p = Proxy::start_with(&support::site("shop", "a.test", "blue", &targets), opts).await;
    p.wait_healthy("shop", &["blue", "green"]).await;
    let mut conns = Vec::new();
    for _ in 0..8 {
        let tls = handshake(&ca, p.https.unwrap(), "a.test", &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
        conns.push((sender, tokio::spawn(conn)));
    }
    let get = || Request::get("https://a.test/").body(Empty::<Bytes>::new()).unwrap();
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4 * conns.len())
        .map(|i| {
            let (mut sender, done) = (conns[i % conns.len()].0.clone(), done.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    let start = t0.elapsed();
                    let resp = sender.send_request(get()).await.expect("h2 stream failed in the storm");
                    assert_eq!(resp.status(), 200);
                    let body = resp.into_body().collect().await.expect("h2 body failed in the storm").to_bytes();
                    answers.push((start, t0.elapsed(), String::from_utf8_lossy(&body).into_owned()));
                }
                answers
            })
        })
        .collect();
    let mut switches = Vec::new();
    for i in 0..24 {
        let (sent, to) = (t0.elapsed(), ["green", "blue"][i % 2]);
        p.switch("shop", to).await;
        switches.push(support::Switch { sent, acked: t0.elapsed(), to });
        tokio::time::sleep(Duration::from_millis(100 + (i as u64 * 61) % 151)).await;
    }
    done.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for s in streams {
        answers.extend(s.await.unwrap());
    }
    for (i, (sender, conn)) in conns.iter().enumerate() {
        assert!(!conn.is_finished() && !sender.is_closed(), "a switch ended h2 connection {i}");
    }
    let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains(r#"cutover_client_connections{listener="https"} 8"#), "{metrics}");
    assert_eq!(blue.count() + green.count(), answers.len());
    let (checked, wrong) = support::routed_after_acks(&switches, &answers, Duration::from_millis(5));
    assert!(wrong.is_empty(), "{} of {checked} checked streams misrouted: {wrong:#?}", wrong.len());
    assert!(checked > answers.len() / 3, "too few streams checked: {checked} of {}", answers.len());
    for (i, (sender, _)) in conns.iter().enumerate() {
        let resp = sender.clone().send_request(get()).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "blue", "connection {i}");
    }
}

/// Reload swaps the certificate for new connections while an open one keeps
/// working; a key that does not match its certificate is refused and the old
/// certificate stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_certificates_and_refuses_bad_ones() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let (p, a, _) = start(&ca, origin.addr, "").await;
    let https = p.https.unwrap();
    let open = handshake(&ca, https, "a.test", &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(open)).await.unwrap();
    tokio::spawn(conn);
    let get = || Request::get("/").header("host", "a.test").body(Empty::<Bytes>::new()).unwrap();
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);

    // A renewed certificate for a.test.
    let renewed = ca.leaf(p.dir.path(), "a", &["a.test"]);
    assert_ne!(renewed, a);
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served_cert(&handshake(&ca, https, "a.test", &[b"http/1.1"]).await), renewed);
    assert_eq!(sender.send_request(get()).await.unwrap().status(), 200, "the open connection broke");

    // A key from another certificate: refused, the renewed certificate stays.
    std::fs::copy(p.dir.path().join("b.key"), p.dir.path().join("a.key")).unwrap();
    let (status, body) = p.api("POST", "/v1/reload", None).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["details"]["errors"].to_string();
    assert!(message.contains("tls.certificates[0].key") && message.contains("does not match"), "{message}");
    assert_eq!(served_cert(&handshake(&ca, https, "a.test", &[b"http/1.1"]).await), renewed);
}

/// `cutover check` refuses a key that does not match its certificate, and missing files, with the field path.
#[test]
fn check_validates_tls_files() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "a", &["a.test"]);
    ca.leaf(dir.path(), "b", &["b.test"]);
    // A PEM certificate block whose content is no certificate: the cert is at fault, not the key.
    std::fs::write(dir.path().join("junk.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .unwrap();
    let yaml = "listen: { http: 127.0.0.1:0, https: 127.0.0.1:0 }\ntls: { certificates: [{ cert: a.pem, key: b.key }, { cert: gone.pem, key: a.key }, { cert: junk.pem, key: a.key }] }\nsites:\n  - { name: s, hosts: [\"*\"], live: b, targets: { b: { endpoints: [127.0.0.1:1] } } }\n";
    let file = dir.path().join("cutover.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls.certificates[0].key") && stderr.contains("does not match"), "{stderr}");
    assert!(stderr.contains("tls.certificates[1].cert") && stderr.contains("gone.pem"), "{stderr}");
    assert!(stderr.contains("tls.certificates[2].cert") && !stderr.contains("tls.certificates[2].key"), "{stderr}");
}

/// `redirect_https`: plain HTTP gets 308 to the same path and query on the
/// HTTPS port, except `read_only.allow_paths`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let extra = "    redirect_https: true\n    read_only: { allow_paths: [/.well-known/*] }\n";
    let (p, _, _) = start(&ca, origin.addr, extra).await;
    let a = support::get(p.addr, "a.test:8080", "/cart?item=1").await;
    assert_eq!(a.status, 308);
    assert_eq!(a.headers["location"], format!("https://a.test:{}/cart?item=1", p.https.unwrap().port()).as_str());
    assert_eq!(support::get(p.addr, "a.test", "/.well-known/acme-challenge/x").await.status, 200);
    assert_eq!(origin.seen().len(), 1);
}

/// An HTTPS upstream with a private CA (and `server_name`), over HTTP/1.1 and
/// over h2 by ALPN; an upstream the CA does not vouch for is never used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_a_private_ca() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "upstream", &["api.internal"]);
    ca.write(&dir.path().join("ca.pem"));
    let origin = tls_origin(&dir.path().join("upstream.pem"), &dir.path().join("upstream.key")).await;
    let other_ca = Ca::new();
    other_ca.write(&dir.path().join("other-ca.pem"));
    let sites = format!(
        "  - name: api\n    hosts: [api.test]\n    live: blue\n    targets:\n      blue: {{ endpoints: [\"{origin}\"], tls: true, ca: {ca}, server_name: api.internal }}\n      grpc: {{ endpoints: [\"{origin}\"], tls: true, ca: {ca}, server_name: api.internal, protocol: h2 }}\n      wrong: {{ endpoints: [\"{origin}\"], tls: true, ca: {other}, server_name: api.internal }}\n    health: {{ path: /up, interval: 50ms, healthy_threshold: 1, unhealthy_threshold: 1 }}\n",
        ca = dir.path().join("ca.pem").display(),
        other = dir.path().join("other-ca.pem").display(),
    );
    let p = Proxy::start(&sites).await;
    p.wait_healthy("api", &["blue", "grpc"]).await;
    let a = support::get(p.addr, "api.test", "/hello").await;
    assert_eq!((a.status, a.body.as_str()), (200, "tls-origin HTTP/1.1 /hello"));
    p.switch("api", "grpc").await;
    assert_eq!(support::get(p.addr, "api.test", "/hello").await.body, "tls-origin HTTP/2.0 /hello");
    let (_, site) = p.api("GET", "/v1/sites/api", None).await;
    assert_eq!(site["targets"]["wrong"]["endpoints"][0]["healthy"], json!(false), "{site}");
    let (status, _) = p.api("POST", "/v1/sites/api/switch", Some(json!({"to": "wrong", "force": true}))).await;
    assert_eq!(status, 200);
    assert_eq!(support::get(p.addr, "api.test", "/hello").await.status, 502);
}

/// An HTTPS origin (HTTP/1.1 and h2 by ALPN) answering `tls-origin VERSION PATH`.
async fn tls_origin(cert: &Path, key: &Path) -> SocketAddr {
    let pair = cutover_config::tls::load_pair(cert, key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pair.cert.clone(), rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let body = format!("tls-origin {:?} {}", req.version(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from(
                        body,
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

use rustls::pki_types::pem::PemObject;

/// A proxy with one HTTPS certificate (`a.test`) and `limits` (YAML flow map).
async fn start_https(ca: &Ca, origin: SocketAddr, limits: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    ca.leaf(dir.path(), "a", &["a.test"]);
    let extra = format!("{}\nlimits: {limits}", tls_yaml(&["a"]));
    let opts = Options { https: true, extra, dir: Some(dir), ..Default::default() };
    Proxy::start_with(&site(origin, ""), opts).await
}

/// A GET of `/` for `a.test` over HTTP/1.1 on `tls`: its status and version.
async fn get_over(tls: TlsStream<TcpStream>) -> (u16, http::Version) {
    let mut sender = http1(tls).await;
    let req = Request::get("/").header("host", "a.test").body(Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    (resp.status().as_u16(), resp.version())
}

/// Writes `opening` to a new connection to `addr`, then `drip` one byte every
/// 50 ms, until the proxy closes it (5 s at most): how long after the
/// connection began that was, or `None`.
async fn stall(addr: SocketAddr, opening: Vec<u8>, drip: Vec<u8>) -> Option<std::time::Duration> {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&opening).await.unwrap();
    let mut drip = drip.into_iter();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(5) {
        if let Some(b) = drip.next() {
            if s.write_all(&[b]).await.is_err() {
                return Some(start.elapsed());
            }
        }
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            // Still open (the server's first flight, after a whole hello).
            Err(_) | Ok(Ok(1..)) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
        }
    }
    None
}

/// C-5/C-15: TLS connections that stall before their handshake ends are cut
/// at `header_read_timeout` (500 ms), not before 400 ms and well within 3 s:
/// one silent, one that sent part of a record header, one that drips its
/// ClientHello a byte every 50 ms, one that sent a whole ClientHello and
/// then nothing. Meanwhile a real handshake and request succeed, and once
/// all are closed the listener counts no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_cut_at_header_read_timeout() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let p = start_https(&ca, origin.addr, "{ header_read_timeout: 500ms }").await;
    let https = p.https.unwrap();
    // A real ClientHello, as a rustls client writes it.
    let mut client = rustls::ClientConnection::new(
        ca.config(rustls::DEFAULT_VERSIONS, &[b"http/1.1"]),
        ServerName::try_from("a.test").unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "not a handshake record");
    let stalled = [
        ("silent", Vec::new(), Vec::new()),
        ("part of a record header", vec![0x16, 0x03, 0x01], Vec::new()),
        // The record and handshake headers at once, then the hello itself, slowly.
        ("a dripped ClientHello", hello[..9].to_vec(), hello[9..].to_vec()),
        ("a whole ClientHello, then nothing", hello.clone(), Vec::new()),
    ]
    .map(|(what, opening, drip)| (what, tokio::spawn(stall(https, opening, drip))));

    assert_eq!(get_over(handshake(&ca, https, "a.test", &[b"http/1.1"]).await).await.0, 200);
    for (what, cut) in stalled {
        let cut = cut.await.unwrap().unwrap_or_else(|| panic!("{what}: still open after 5 s"));
        let ms = cut.as_millis();
        assert!((400..3000).contains(&ms), "{what}: cut after {ms} ms, not at header_read_timeout (500 ms)");
    }
    let gone = async {
        loop {
            let metrics = support::get(p.admin, "127.0.0.1", "/metrics").await.body;
            if metrics.contains(r#"cutover_client_connections{listener="https"} 0"#) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), gone).await.expect("HTTPS connections still counted");
}

/// C-15: a client offering TLS 1.2 only gets TLS 1.2, one offering 1.3 only
/// gets 1.3, and both are served. (TLS 1.0 and 1.1 cannot be offered by a
/// rustls client, and the proxy's rustls has neither.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_clients_are_served() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let p = start_https(&ca, origin.addr, "{}").await;
    for (version, wanted) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let connector = tokio_rustls::TlsConnector::from(ca.config(&[version], &[b"http/1.1"]));
        let tcp = TcpStream::connect(p.https.unwrap()).await.unwrap();
        let tls = connector.connect(ServerName::try_from("a.test").unwrap(), tcp).await.expect("TLS handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(wanted));
        assert_eq!(get_over(tls).await.0, 200, "{wanted:?}");
    }
}

/// C-15: a client that offers no ALPN protocol is served HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_alpn_gets_http_1_1() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let p = start_https(&ca, origin.addr, "{}").await;
    let tls = handshake(&ca, p.https.unwrap(), "a.test", &[]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    assert_eq!(get_over(tls).await, (200, http::Version::HTTP_11));
    assert_eq!(origin.seen()[0].headers["x-forwarded-proto"], "https");
}

/// A raw ClientHello record (RFC 5246 §7.4.1.2) with `legacy_version`,
/// these cipher suites, SNI `a.test`, the groups, point formats and
/// signature algorithms of a modern client, and no `supported_versions`
/// (so no TLS 1.3).
fn client_hello(version: u16, suites: &[u16]) -> Vec<u8> {
    let ext = |kind: u16, data: &[u8]| [&kind.to_be_bytes()[..], &(data.len() as u16).to_be_bytes(), data].concat();
    let list16 = |items: &[u16]| {
        let bytes: Vec<u8> = items.iter().flat_map(|i| i.to_be_bytes()).collect();
        [&(bytes.len() as u16).to_be_bytes()[..], &bytes].concat()
    };
    let name = b"a.test";
    let sni = [&(name.len() as u16 + 3).to_be_bytes()[..], &[0], &(name.len() as u16).to_be_bytes(), name].concat();
    let extensions = [
        ext(0x0000, &sni),
        ext(0x000a, &list16(&[0x001d, 0x0017, 0x0018])),
        ext(0x000b, &[1, 0]),
        ext(0x000d, &list16(&[0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0201])),
    ]
    .concat();
    let mut body = version.to_be_bytes().to_vec();
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0);
    body.extend_from_slice(&list16(suites));
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// What the server answers to a raw `hello`: the first record's content
/// type and its first two bytes (an alert's level and description, or a
/// handshake message's type); `None` if it closes without a record.
async fn answer_to_hello(addr: SocketAddr, hello: &[u8]) -> Option<(u8, [u8; 2])> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while got.len() < 7 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read).await.expect("neither an answer nor a close in 5 s");
    (got.len() >= 7).then(|| (got[0], [got[5], got[6]]))
}

/// C-15: TLS 1.0 and 1.1 are refused, and so are weak cipher suites. A
/// ClientHello offering only TLS 1.1 or 1.0 (classic CBC suites, or even
/// AES-GCM ones) gets a `protocol_version` alert (70) or a close, and a
/// TLS 1.2 one offering only RC4, 3DES and CBC-SHA suites a
/// `handshake_failure` (40) or a close, never a ServerHello; the same TLS 1.2
/// hello with an ECDHE-ECDSA AES-GCM suite (the control) gets a ServerHello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_1_1_and_weak_suites_are_refused() {
    let ca = Ca::new();
    let origin = Origin::start("blue").await;
    let p = start_https(&ca, origin.addr, "{}").await;
    let addr = p.https.unwrap();
    const ALERT: u8 = 0x15;
    let classic = [0xc009, 0xc013, 0xc00a, 0xc014, 0x002f, 0x0035, 0x000a];
    let gcm = [0xc02b, 0xc02f, 0xc02c, 0xc030];
    for (version, suites) in [(0x0302, &classic[..]), (0x0301, &classic[..]), (0x0302, &gcm[..])] {
        match answer_to_hello(addr, &client_hello(version, suites)).await {
            None | Some((ALERT, [2, 70])) => {}
            other => panic!("TLS {version:#06x} with {suites:04x?}: {other:?}"),
        }
    }
    let weak = [0x0005, 0x0004, 0xc011, 0xc007, 0x000a, 0xc008, 0xc012, 0xc009, 0xc013, 0x002f, 0x0035, 0x003c];
    match answer_to_hello(addr, &client_hello(0x0303, &weak)).await {
        None | Some((ALERT, [2, 40])) => {}
        other => panic!("TLS 1.2 with weak suites: {other:?}"),
    }
    let control = [&weak[..], &[0xc02b]].concat();
    assert_eq!(answer_to_hello(addr, &client_hello(0x0303, &control)).await, Some((0x16, [0x02, 0x00])));
    assert_eq!(origin.count(), 0);
}
