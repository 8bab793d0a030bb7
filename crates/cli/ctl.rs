//! `cutover ctl`: the operator's client for the admin API.
//!
//! Exit codes (SPEC §1): 0 success; 1 the API refused (reasons printed);
//! 2 a usage error or the admin API could not be reached.

use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// `println!` that gives up quietly when stdout is closed (`ctl status | head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// [`out!`] without the newline.
macro_rules! out_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// The admin API `ctl` asks when neither `--admin` nor `$CUTOVER_ADMIN_URL` says.
const DEFAULT_ADMIN: &str = "http://127.0.0.1:9901";

/// Options of `cutover ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin API base URL.
    #[arg(long, global = true, env = "CUTOVER_ADMIN_URL", default_value = DEFAULT_ADMIN)]
    admin: String,
    /// Bearer token for the admin API.
    #[arg(long, global = true, env = "CUTOVER_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How long to wait for each answer of the admin API (a switch waits for
    /// its smoke checks) before giving up with exit code 2.
    #[arg(long, global = true, value_parser = timeout, default_value = "2m")]
    request_timeout: Duration,
    /// Print the raw JSON answer.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Show every site, or one site with its targets and endpoints.
    Status {
        /// Site name.
        site: Option<String>,
    },
    /// Make TARGET the live target of SITE.
    Switch {
        /// Site name.
        site: String,
        /// Target to make live.
        target: String,
        /// Skip the health and smoke gates.
        #[arg(long)]
        force: bool,
        /// How long the old target may finish its work, e.g. 30s.
        #[arg(long, value_parser = duration)]
        drain_timeout: Option<Duration>,
        /// Refuse unless every endpoint runs this version.
        #[arg(long)]
        expect_version: Option<String>,
    },
    /// Switch SITE back to its previous target.
    Rollback {
        /// Site name.
        site: String,
        /// Skip the health and smoke gates.
        #[arg(long)]
        force: bool,
    },
    /// Create or replace a non-live target.
    SetTarget {
        /// Site name.
        site: String,
        /// Target name.
        target: String,
        /// Endpoint address host:port (repeat for several).
        #[arg(long = "endpoint", required = true, num_args = 1..)]
        endpoints: Vec<String>,
        /// Version the target runs.
        #[arg(long)]
        version: Option<String>,
    },
    /// Show a site's history, newest first.
    History {
        /// Site name.
        site: String,
    },
    /// Deploy a release: set TARGET, wait healthy, smoke, switch, drain, watch.
    Deploy {
        /// Site name.
        site: String,
        /// Target to deploy to (not the live one).
        target: String,
        /// Endpoint address host:port (repeat for several).
        #[arg(long = "endpoint", required = true, num_args = 1..)]
        endpoints: Vec<String>,
        /// Version the endpoints run.
        #[arg(long)]
        version: Option<String>,
        /// How long to watch after the switch, e.g. 60s (default: the site's switch.watch).
        #[arg(long, value_parser = duration)]
        watch: Option<Duration>,
        /// How long to wait for the target to be healthy, e.g. 60s.
        #[arg(long, value_parser = duration)]
        healthy_timeout: Option<Duration>,
    },
    /// Re-read the configuration file of the running proxy.
    Reload,
    /// Refuse (on) or accept (off) writes on SITE.
    ReadOnly {
        /// Site name.
        site: String,
        /// `on` or `off`.
        state: OnOff,
    },
    /// Serve the maintenance page for every request on SITE (on), or stop (off).
    Maintenance {
        /// Site name.
        site: String,
        /// `on` or `off`.
        state: OnOff,
    },
    /// Hold new requests to SITE until `resume` (each for at most --timeout).
    Pause {
        /// Site name.
        site: String,
        /// How long each request may be held, e.g. 30s.
        #[arg(long, value_parser = duration)]
        timeout: Option<Duration>,
    },
    /// Release the requests held on SITE, to the live target of this moment.
    Resume {
        /// Site name.
        site: String,
    },
    /// Split SITE's traffic by sticky weights (NAME=PCT…, summing to 100), or --clear.
    Weights {
        /// Site name.
        site: String,
        /// Target weights, e.g. blue=90 green=10.
        #[arg(value_parser = parse_weight, required_unless_present = "clear")]
        weights: Vec<(String, u8)>,
        /// Back to 100 % live.
        #[arg(long, conflicts_with = "weights")]
        clear: bool,
    },
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    /// Turn the mode on.
    On,
    /// Turn the mode off.
    Off,
}

fn parse_weight(s: &str) -> Result<(String, u8), String> {
    let (name, pct) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=PERCENT"))?;
    let pct = pct.parse::<u8>().map_err(|_| format!("{s:?}: {pct:?} is not a percentage"))?;
    Ok((name.to_string(), pct))
}

/// How long `ctl` waits for the admin API to take a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A duration argument, such as `30s`.
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected a duration such as 30s, 500ms or 5m)"))
}

/// A timeout argument: a duration above zero.
fn timeout(s: &str) -> Result<Duration, String> {
    duration(s).and_then(|d| if d.is_zero() { Err("must be greater than zero".into()) } else { Ok(d) })
}

/// Where and how `ctl` asks the admin API.
struct Admin<'a> {
    /// The base URL (an empty `$CUTOVER_ADMIN_URL` counts as unset).
    base: &'a str,
    token: Option<&'a str>,
    /// For each exchange, from the connect to the answer's last byte.
    timeout: Duration,
}

/// Runs one `ctl` command and maps the outcome to the exit code.
pub fn run(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cutover ctl: {e}");
            return ExitCode::from(2);
        }
    };
    let (method, path, body) = request_for(&args.command);
    let base = if args.admin.trim().is_empty() { DEFAULT_ADMIN } else { args.admin.as_str() };
    let admin = Admin { base, token: args.token.as_deref(), timeout: args.request_timeout };
    match runtime.block_on(call(&admin, method, &path, body)) {
        Err(e) => {
            eprintln!("cutover ctl: cannot reach the admin API at {}: {e}", admin.base);
            ExitCode::from(2)
        }
        Ok((status, value)) if status >= 400 => {
            if args.json {
                out!("{}", pretty(&value));
            } else {
                print_error(status, &value);
            }
            ExitCode::from(1)
        }
        Ok((_, value)) if matches!(args.command, CtlCommand::Deploy { .. }) => {
            let id = value["id"].as_str().unwrap_or_default().to_string();
            runtime.block_on(follow_deploy(&admin, &id, args.json))
        }
        Ok((_, value)) => {
            if args.json {
                out!("{}", pretty(&value));
            } else {
                print_human(&args.command, &value);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Follows deployment `id` until it ends, showing each step as it happens:
/// a live spinner line on a terminal, one plain line per change otherwise.
async fn follow_deploy(admin: &Admin<'_>, id: &str, json: bool) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let tty = !json && std::io::stdout().is_terminal();
    const SPINNER: [char; 4] = ['|', '/', '-', '\\'];
    let mut printed: Vec<String> = Vec::new();
    let mut frame = 0usize;
    if !json {
        out!("deployment {id}");
    }
    loop {
        let d = match call(admin, Method::GET, &format!("/v1/deployments/{id}"), None).await {
            Ok((200, d)) => d,
            Ok((status, v)) => {
                print_error(status, &v);
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("cutover ctl: lost the admin API while following {id}: {e}");
                return ExitCode::from(2);
            }
        };
        let steps = d["steps"].as_array().cloned().unwrap_or_default();
        if !json {
            for (i, step) in steps.iter().enumerate() {
                let state = text(&step["state"]);
                if state == "pending" {
                    break;
                }
                let line = format!(
                    "{:<12} {:<9} {}",
                    text(&step["name"]),
                    state,
                    step["message"].as_str().unwrap_or_default()
                );
                if state == "running" {
                    if tty {
                        out_part!("\r{} {:<12} running\x1b[K", SPINNER[frame % 4], text(&step["name"]));
                        let _ = std::io::stdout().flush();
                    }
                    break;
                }
                if printed.get(i) != Some(&line) {
                    if tty {
                        out_part!("\r\x1b[K");
                    }
                    let mark = match state.as_str() {
                        "succeeded" => "ok",
                        "skipped" => "--",
                        _ => "!!",
                    };
                    out!("{mark} {line}");
                    printed.resize(i + 1, String::new());
                    printed[i] = line;
                }
            }
        }
        let state = text(&d["state"]);
        if state != "running" {
            if json {
                out!("{}", pretty(&d));
            } else {
                out!("deployment {id}: {state}");
                if let Some(e) = d["error"].as_str() {
                    eprintln!("  {e}");
                }
            }
            return if state == "succeeded" { ExitCode::SUCCESS } else { ExitCode::from(1) };
        }
        frame += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn request_for(cmd: &CtlCommand) -> (Method, String, Option<Value>) {
    match cmd {
        CtlCommand::Status { site: None } => (Method::GET, "/v1/sites".into(), None),
        CtlCommand::Status { site: Some(s) } => (Method::GET, format!("/v1/sites/{s}"), None),
        CtlCommand::Switch { site, target, force, drain_timeout, expect_version } => {
            let mut body = json!({ "to": target, "force": force });
            if let Some(d) = drain_timeout {
                body["drain_timeout"] = json!(humantime::format_duration(*d).to_string());
            }
            if let Some(v) = expect_version {
                body["expect_version"] = json!(v);
            }
            (Method::POST, format!("/v1/sites/{site}/switch"), Some(body))
        }
        CtlCommand::Rollback { site, force } => {
            (Method::POST, format!("/v1/sites/{site}/rollback"), Some(json!({ "force": force })))
        }
        CtlCommand::SetTarget { site, target, endpoints, version } => {
            let body = json!({ "endpoints": endpoints, "version": version });
            (Method::PUT, format!("/v1/sites/{site}/targets/{target}"), Some(body))
        }
        CtlCommand::History { site } => (Method::GET, format!("/v1/sites/{site}/history"), None),
        CtlCommand::Deploy { site, target, endpoints, version, watch, healthy_timeout } => {
            let mut body = json!({ "target": target, "endpoints": endpoints, "version": version });
            for (key, d) in [("watch", watch), ("healthy_timeout", healthy_timeout)] {
                if let Some(d) = d {
                    body[key] = json!(humantime::format_duration(*d).to_string());
                }
            }
            (Method::POST, format!("/v1/sites/{site}/deploy"), Some(body))
        }
        CtlCommand::Reload => (Method::POST, "/v1/reload".into(), None),
        CtlCommand::ReadOnly { site, state } => {
            (Method::PUT, format!("/v1/sites/{site}/mode"), Some(json!({ "read_only": *state == OnOff::On })))
        }
        CtlCommand::Maintenance { site, state } => {
            (Method::PUT, format!("/v1/sites/{site}/mode"), Some(json!({ "maintenance": *state == OnOff::On })))
        }
        CtlCommand::Pause { site, timeout } => {
            let body = match timeout {
                Some(d) => json!({ "timeout": humantime::format_duration(*d).to_string() }),
                None => json!({}),
            };
            (Method::POST, format!("/v1/sites/{site}/pause"), Some(body))
        }
        CtlCommand::Resume { site } => (Method::POST, format!("/v1/sites/{site}/resume"), None),
        CtlCommand::Weights { site, clear: true, .. } => (Method::DELETE, format!("/v1/sites/{site}/weights"), None),
        CtlCommand::Weights { site, weights, .. } => {
            let body: serde_json::Map<String, Value> = weights.iter().map(|(t, p)| (t.clone(), json!(p))).collect();
            (Method::PUT, format!("/v1/sites/{site}/weights"), Some(Value::Object(body)))
        }
    }
}

/// Sends one request to the admin API; returns the status and the JSON answer.
async fn call(admin: &Admin<'_>, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    let limit = humantime::format_duration(admin.timeout);
    tokio::time::timeout(admin.timeout, exchange(admin, method, path, body))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {limit} (--request-timeout)"))?
}

async fn exchange(admin: &Admin<'_>, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    let base = admin.base;
    let base: Uri = base.parse().map_err(|e| anyhow::anyhow!("--admin {base:?} is not a URL: {e}"))?;
    if base.scheme_str() != Some("http") {
        anyhow::bail!("--admin must be an http:// URL");
    }
    let authority = base.authority().ok_or_else(|| anyhow::anyhow!("--admin has no host"))?.clone();
    let port = authority.port_u16().unwrap_or(80);
    // An address that drops the connect: said within seconds, not at the answer's timeout.
    let connect = tokio::net::TcpStream::connect((authority.host().trim_matches(['[', ']']), port));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT.min(admin.timeout), connect)
        .await
        .map_err(|_| anyhow::anyhow!("connection timed out"))??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let prefix = base.path().trim_end_matches('/');
    let mut req = Request::builder().method(method).uri(format!("{prefix}{path}")).header("host", authority.as_str());
    if let Some(t) = admin.token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let bytes = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(&b)?)
        }
        None => Bytes::new(),
    };
    let resp = sender.send_request(req.body(Full::new(bytes))?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    // Something else listening there (an app, the data plane) must not pass
    // for an acknowledgement.
    let value: Value = serde_json::from_slice(&body)
        .map_err(|_| anyhow::anyhow!("its {status} answer is not JSON: is this cutover's admin API?"))?;
    let admin_shaped = match status {
        200..=299 => value.is_object() || value.is_array(),
        400.. => value.get("error").is_some_and(Value::is_object),
        _ => false,
    };
    if !admin_shaped {
        anyhow::bail!("its {status} answer is not one of cutover's admin API: is this cutover's admin API?");
    }
    Ok((status, value))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn print_error(status: u16, v: &Value) {
    let err = &v["error"];
    let message = err["message"].as_str().unwrap_or("request refused");
    let code = err["code"].as_str().unwrap_or("error");
    eprintln!("refused ({status} {code}): {message}");
    if let Some(reasons) = err["details"]["reasons"].as_array() {
        for r in reasons {
            eprintln!("  - {}", r.as_str().unwrap_or_default());
        }
    }
    // A refused reload: every error of the file, as `cutover check` prints them.
    if let Some(errors) = err["details"]["errors"].as_array() {
        for e in errors {
            let path = e["path"].as_str().filter(|p| !p.is_empty()).map(|p| format!("{p}: ")).unwrap_or_default();
            let message = text(&e["message"]);
            match e["value"].as_str().filter(|v| !v.is_empty()) {
                Some(value) => eprintln!("  - {path}{message} (value: {value:?})"),
                None => eprintln!("  - {path}{message}"),
            }
        }
    }
}

fn print_human(cmd: &CtlCommand, v: &Value) {
    match cmd {
        CtlCommand::Status { site: None } => {
            let sites = v.as_array().cloned().unwrap_or_default();
            let mut rows = vec![row(["SITE", "HOSTS", "LIVE", "PREVIOUS", "MODE"])];
            for s in &sites {
                rows.push(row([
                    text(&s["name"]),
                    join(&s["hosts"]),
                    text(&s["live"]),
                    text(&s["previous"]),
                    mode(&s["mode"]),
                ]));
            }
            print_table(&rows);
        }
        CtlCommand::History { .. } => {
            let mut rows = vec![row(["AT", "KIND", "FROM", "TO", "ACTOR", "RESULT", "REASON"])];
            for h in v.as_array().cloned().unwrap_or_default() {
                rows.push(row([
                    text(&h["at"]),
                    text(&h["kind"]),
                    text(&h["from"]),
                    text(&h["to"]),
                    text(&h["actor"]),
                    text(&h["result"]),
                    text(&h["reason"]),
                ]));
            }
            print_table(&rows);
        }
        CtlCommand::Reload => {
            out!("reloaded: sites {}", join(&v["sites"]));
            let restart = join(&v["restart_required"]);
            if !restart.is_empty() {
                out!("changed but applied only after a restart: {restart}");
            }
        }
        _ => print_site(v),
    }
}

fn print_site(s: &Value) {
    out!("site {}  hosts: {}", text(&s["name"]), join(&s["hosts"]));
    out!("live: {}   previous: {}   mode: {}", text(&s["live"]), text(&s["previous"]), mode(&s["mode"]));
    if let Some(w) = s["weights"].as_object() {
        let split: Vec<String> = w.iter().map(|(t, p)| format!("{t} {p}%")).collect();
        out!("weights: {}", split.join(", "));
    }
    if s["mode"]["paused"].as_bool() == Some(true) || s["held"].as_u64().unwrap_or(0) > 0 {
        out!("held requests: {}", text(&s["held"]));
    }
    if s["watch"].is_object() {
        let w = &s["watch"];
        out!(
            "watch: {} for {} — {} answers, {} errors (max rate {})",
            text(&w["target"]),
            text(&w["duration"]),
            text(&w["requests"]),
            text(&w["errors"]),
            text(&w["max_error_rate"])
        );
        if w["resumed_at"].is_string() {
            out!("  resumed after a restart at {} (answers counted since then)", text(&w["resumed_at"]));
        }
    }
    let mut rows = vec![row(["TARGET", "STATE", "VERSION", "INFLIGHT", "ENDPOINT", "HEALTH", "REPORTS"])];
    if let Some(targets) = s["targets"].as_object() {
        for (name, t) in targets {
            let endpoints = t["endpoints"].as_array().cloned().unwrap_or_default();
            for (i, e) in endpoints.iter().enumerate() {
                let health = match e["healthy"].as_bool() {
                    Some(true) => "healthy",
                    Some(false) => "UNHEALTHY",
                    None => "unchecked",
                };
                let first = i == 0;
                rows.push(row([
                    if first { name.clone() } else { String::new() },
                    if first { text(&t["state"]) } else { String::new() },
                    if first { text(&t["version"]) } else { String::new() },
                    if first { text(&t["inflight"]) } else { String::new() },
                    text(&e["address"]),
                    health.to_string(),
                    text(&e["version"]),
                ]));
            }
        }
    }
    print_table(&rows);
}

fn row<const N: usize, S: Into<String>>(cells: [S; N]) -> Vec<String> {
    cells.into_iter().map(Into::into).collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn join(v: &Value) -> String {
    v.as_array().map(|a| a.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default()
}

fn mode(m: &Value) -> String {
    let on: Vec<&str> =
        ["read_only", "maintenance", "paused"].into_iter().filter(|k| m[*k].as_bool().unwrap_or(false)).collect();
    if on.is_empty() {
        "normal".into()
    } else {
        on.join(", ")
    }
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        out!("{}", line.join("  ").trim_end());
    }
}
