//! `cutover demo`: two built-in releases (blue v1, green v2) on ephemeral
//! loopback ports, the proxy on 127.0.0.1:8080 and the admin API on
//! 127.0.0.1:9901 without a token, and the `ctl` commands to try.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Options of `cutover demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Port of the proxy on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Port of the admin API on 127.0.0.1.
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
}

/// Starts the demo apps, then serves the proxy until Ctrl-C.
pub fn run(args: DemoArgs) -> ExitCode {
    // The demo apps run on their own small runtime so the proxy's runtime is the real one.
    let apps = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cutover demo: cannot start the demo apps: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addrs = apps.block_on(async {
        let blue = start_app("blue", "v1", "#1d4ed8").await?;
        let green = start_app("green", "v2", "#15803d").await?;
        Ok::<_, std::io::Error>((blue, green))
    });
    let (blue, green) = match addrs {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cutover demo: cannot start the demo apps: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state_dir = std::env::temp_dir().join(format!("cutover-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&state_dir) {
        eprintln!("cutover demo: cannot create {}: {e}", state_dir.display());
        return ExitCode::FAILURE;
    }
    let yaml = demo_config(args.port, args.admin_port, blue, green);
    let config = match cutover_config::parse(&yaml, &state_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cutover demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (port, admin_port) = (args.port, args.admin_port);
    let banner = Box::new(move || print_banner(port, admin_port, blue, green));
    let code = crate::serve::run(config, None, false, Some(banner));
    let _ = std::fs::remove_dir_all(&state_dir);
    drop(apps);
    code
}

fn demo_config(port: u16, admin_port: u16, blue: SocketAddr, green: SocketAddr) -> String {
    format!(
        r#"
listen: {{ http: "127.0.0.1:{port}" }}
admin: {{ listen: "127.0.0.1:{admin_port}" }}
state: {{ path: cutover-state.json }}
shutdown_timeout: 5s
limits: {{ max_connections: 1000 }}   # a demo; fits small open-file limits
sites:
  - name: demo
    hosts: ["*"]
    live: blue
    targets:
      blue:  {{ endpoints: ["{blue}"], version: v1 }}
      green: {{ endpoints: ["{green}"], version: v2 }}
    health:
      path: /up
      interval: 1s
      timeout: 500ms
      healthy_threshold: 2
      unhealthy_threshold: 2
      version_header: x-app-version
    switch:
      drain_timeout: 10s
      smoke:
        - {{ path: /up, expect_body_contains: ok }}
"#
    )
}

fn print_banner(port: u16, admin_port: u16, blue: SocketAddr, green: SocketAddr) {
    let admin = if admin_port == 9901 { String::new() } else { format!(" --admin http://127.0.0.1:{admin_port}") };
    println!(
        r#"
cutover demo is running.

  proxy      http://127.0.0.1:{port}/      (site "demo": blue v1 is live)
  admin API  http://127.0.0.1:{admin_port}/v1/sites   (no token)
  releases   blue v1 on {blue}, green v2 on {green}

Open http://127.0.0.1:{port}/ (or: curl -s http://127.0.0.1:{port}/), then try:

  cutover ctl{admin} status demo
  cutover ctl{admin} switch demo green      # reload the page: green v2
  cutover ctl{admin} rollback demo          # back to blue v1
  cutover ctl{admin} history demo
  curl -s http://127.0.0.1:{admin_port}/metrics | grep cutover_

(From a source checkout, `cargo run --release -- ctl …` runs the same commands.)

Ctrl-C stops everything.
"#
    );
}

/// Serves one demo release on an ephemeral loopback port.
async fn start_app(colour: &'static str, version: &'static str, css: &'static str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let service = service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(app_response(&req, colour, version, css))
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(addr)
}

fn app_response(req: &Request<Incoming>, colour: &str, version: &str, css: &str) -> Response<Full<Bytes>> {
    let (content_type, body) = if req.uri().path() == "/up" {
        ("text/plain", "ok\n".to_string())
    } else {
        let page = format!(
            r#"<!doctype html>
<html><head><meta charset="utf-8"><title>{colour} {version}</title></head>
<body style="background:{css};color:#fff;font-family:system-ui,sans-serif;display:flex;align-items:center;justify-content:center;height:100vh;margin:0">
<div style="text-align:center"><h1 style="font-size:5em;margin:0">{colour}</h1><p style="font-size:2em">release {version}</p>
<p>served through cutover &middot; path {path}</p></div></body></html>
"#,
            path = html_escape(req.uri().path())
        );
        ("text/html; charset=utf-8", page)
    };
    Response::builder()
        .header("content-type", content_type)
        .header("x-app-version", version)
        .header("x-app-colour", colour)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
