//! Black-box tests of the real `cutover` binary: durable state across
//! `kill -9`, refusing bad state and bad configuration, `check`, `ctl`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use support::Origin;

const BIN: &str = env!("CARGO_BIN_EXE_cutover");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a config for one site `shop` (blue live, green) into `dir`; returns (proxy, admin) addresses.
fn write_config(dir: &Path, blue: SocketAddr, green: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (http, admin) = (free_port(), free_port());
    let yaml = format!(
        r#"
listen: {{ http: "127.0.0.1:{http}" }}
admin: {{ listen: "127.0.0.1:{admin}" }}
state: {{ path: state/cutover-state.json }}
shutdown_timeout: 2s
sites:
  - name: shop
    hosts: ["*"]
    live: blue
    targets:
      blue:  {{ endpoints: ["{blue}"], version: v1 }}
      green: {{ endpoints: ["{green}"], version: v2 }}
    health: {{ path: /up, interval: 50ms, timeout: 500ms, healthy_threshold: 1 }}
"#
    );
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(dir.join("cutover.yaml"), yaml).unwrap();
    (format!("127.0.0.1:{http}").parse().unwrap(), format!("127.0.0.1:{admin}").parse().unwrap())
}

fn serve(dir: &Path, extra: &[&str]) -> Cutover {
    Cutover::spawn(Command::new(BIN).arg("serve").arg("--config").arg(dir.join("cutover.yaml")).args(extra))
}

/// A running `cutover serve` whose stdout and stderr go to files. Dropping it kills
/// it, and fails the test (unless it is failing already) if the process ever
/// printed `panicked at` (reliability plan F-1).
struct Cutover {
    child: Child,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
}

impl Cutover {
    fn spawn(cmd: &mut Command) -> Cutover {
        let (stdout, stderr) = (tempfile::NamedTempFile::new().unwrap(), tempfile::NamedTempFile::new().unwrap());
        let file = |f: &tempfile::NamedTempFile| std::fs::OpenOptions::new().append(true).open(f.path()).unwrap();
        let child = cmd.stdout(file(&stdout)).stderr(file(&stderr)).spawn().unwrap();
        Cutover { child, stdout, stderr }
    }

    /// Everything it wrote to stdout so far.
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.stdout.path()).unwrap()).into_owned()
    }

    /// Everything it wrote to stderr so far.
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.stderr.path()).unwrap()).into_owned()
    }

    /// Waits for it to exit: its exit status and its stderr.
    fn wait_output(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        (status, self.stderr())
    }
}

impl std::ops::Deref for Cutover {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for Cutover {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Cutover {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            assert_no_panic("cutover serve", &self.stderr());
        }
    }
}

/// Fails when a process's stderr shows a panic.
fn assert_no_panic(what: &str, stderr: &str) {
    assert!(!stderr.contains("panicked at"), "{what} panicked:\n{stderr}");
}

/// Runs a short-lived `cutover` command to its end and checks it did not panic.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert_no_panic(&format!("{cmd:?}"), &String::from_utf8_lossy(&out.stderr));
    out
}

async fn wait_up(admin: SocketAddr, child: &mut Cutover) {
    if let Err(early) = try_up(admin, child).await {
        panic!("{early}");
    }
}

/// Waits until cutover's admin API accepts connections; `Err` with its
/// stderr when it exited first.
async fn try_up(admin: SocketAddr, child: &mut Cutover) -> Result<(), String> {
    for _ in 0..200 {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("cutover exited early with {status}:\n{}", child.stderr()));
        }
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("cutover did not start");
}

async fn ctl(admin: SocketAddr, args: &[&str]) -> Output {
    let admin = format!("http://{admin}");
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("ctl").arg("--admin").arg(admin).args(args);
    let out = cmd.output().await.unwrap();
    assert_no_panic(&format!("cutover ctl {args:?}"), &String::from_utf8_lossy(&out.stderr));
    out
}

/// A switch acknowledged before `kill -9` is still in force after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_then_restart_keeps_the_live_target() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    assert_eq!(support::get(http, "shop", "/").await.body, "blue");
    // The switch is refused until green has been probed; retry until it passes.
    let mut switched = false;
    for _ in 0..100 {
        let out = ctl(admin, &["switch", "shop", "green"]).await;
        if out.status.success() {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(switched, "switch never accepted");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    assert_eq!(support::get(http, "shop", "/").await.body, "green");
    let out = ctl(admin, &["--json", "status", "shop"]).await;
    let site: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((site["live"].as_str(), site["previous"].as_str()), (Some("green"), Some("blue")));
    assert_eq!(
        site["targets"]["green"]["endpoints"][0]["version"],
        serde_json::Value::Null,
        "health must not be restored"
    );
    // SIGTERM: a clean exit 0.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
}

/// An unreadable state file stops the start with a message naming the file;
/// `--reset-state` moves it aside and starts from the configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_stops_the_start_until_reset() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let state = dir.path().join("state/cutover-state.json");
    std::fs::write(&state, "{ this is not json").unwrap();
    let (status, stderr) = serve(dir.path(), &[]).wait_output();
    assert!(!status.success());
    assert!(stderr.contains("cutover-state.json"), "{stderr}");
    assert!(stderr.contains("--reset-state"), "{stderr}");
    assert!(std::net::TcpListener::bind(http).is_ok(), "the listener was bound despite the error");

    let mut child = serve(dir.path(), &["--reset-state"]);
    wait_up(admin, &mut child).await;
    assert_eq!(support::get(http, "shop", "/").await.body, "blue");
    let aside: Vec<_> = std::fs::read_dir(dir.path().join("state")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(aside.iter().any(|n| n.to_string_lossy().starts_with("cutover-state.json.reset-")), "{aside:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// E-3, F-4: a state file that is empty, random bytes, JSON of an
/// unsupported `version`, or JSON of another shape than the state's
/// (including a BOM, bytes that are not UTF-8, a number out of range, a site
/// named twice, a field nothing reads) stops the start:
/// the process exits non-zero on its own (well within 10 s) with a line
/// naming the file, the fault and `--reset-state`, binds nothing, and leaves
/// the file byte for byte as it was, with nothing written beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_state_file_stops_the_start_and_is_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let dead = support::dead_addr().await;
    let (http, admin) = write_config(dir.path(), dead, dead);
    let state = dir.path().join("state/cutover-state.json");
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    // (the file's bytes, what the message says of the fault)
    let cases: [(&[u8], &str); 22] = [
        (b"", "EOF while parsing"),
        (b" \n\t\n", "EOF while parsing"),
        (&random, "is not valid"),
        (br#"{"version":2,"sites":{}}"#, "unsupported version 2"),
        (br#"{"version":0,"sites":{"shop":{"live":"green","previous":null}}}"#, "unsupported version 0"),
        (br#"{"version":"1","sites":{}}"#, "invalid type"),
        (br#"{"version":4294967296,"sites":{}}"#, "expected u32"),
        (b"null", "invalid type: null"),
        (br#""blue""#, "invalid type: string"),
        (br#"[1,{"shop":{"live":"green","previous":null}}]"#, "the file is an array, not an object"),
        (br#"{"version":1,"sites":{"shop":["green",null]}}"#, "sites.shop is an array, not an object"),
        (br#"{"version":1}"#, "missing field `sites`"),
        (br#"{"version":1,"sites":[]}"#, "invalid type: sequence"),
        (br#"{"version":1,"sites":{"shop":"green"}}"#, "invalid type: string"),
        (br#"{"version":1,"sites":{},"generation":7}"#, "unknown field `generation`"),
        (br#"{"version":1,"sites":{}} {}"#, "trailing characters"),
        (b"\xef\xbb\xbf{\"version\":1,\"sites\":{}}", "expected value at line 1 column 1"),
        (b"{\"version\":1,\"sites\":{\"shop\":{\"live\":\"gr\xffeen\",\"previous\":null}}}", "invalid unicode"),
        (br#"{"version":1e400,"sites":{}}"#, "number out of range"),
        (br#"{"version":1,"sites":{"shop":{"live":"green","previous":null,"weights":{"green":256}}}}"#, "expected u8"),
        (
            br#"{"version":1,"sites":{"shop":{"live":"green","previous":null},"shop":{"live":"blue","previous":null}}}"#,
            r#""shop" is named twice in one object"#,
        ),
        (
            br#"{"version":1,"sites":{"shop":{"live":"green","previous":null,"history":[{"at":"2025-01-01T00:00:00Z","kind":"switch","from":null,"to":null,"actor":"api","reason":null,"result":"ok","x":[[[]]]}]}}}"#,
            "unknown field `x`",
        ),
    ];
    for (bytes, fault) in cases {
        let what = String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned();
        std::fs::write(&state, bytes).unwrap();
        let mut child = serve(dir.path(), &[]);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(child.try_wait().unwrap().is_some(), "{what:?}: cutover still running after 10 s:\n{}", child.stderr());
        let (status, stderr) = child.wait_output();
        assert!(!status.success() && status.code().is_some(), "{what:?}: {status}\n{stderr}");
        let line = stderr.lines().find(|l| l.contains("state/cutover-state.json"));
        let line = line.unwrap_or_else(|| panic!("{what:?}: no line names the file:\n{stderr}"));
        assert!(line.contains(fault) && line.contains("--reset-state"), "{what:?}: {line}");
        assert_eq!(std::fs::read(&state).unwrap(), bytes, "{what:?}: the bad file was changed");
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        names.retain(|n| n != "cutover-state.json.lock");
        assert_eq!(names, ["cutover-state.json"], "{what:?}");
        for addr in [http, admin] {
            assert!(std::net::TcpListener::bind(addr).is_ok(), "{what:?}: {addr} was bound despite the error");
        }
    }
}

/// E-3, F-4: a directory in place of the state file stops the start with a
/// line naming the file, the fault and `--reset-state`, and stays as it was.
/// A state file naming a site and a live target the configuration no longer
/// has (SPEC §5) is accepted: cutover starts with a warning for each and
/// serves the configured live target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_for_the_state_file_is_refused_and_names_gone_from_the_config_are_dropped() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let state = dir.path().join("state/cutover-state.json");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("inside"), "kept").unwrap();
    let (status, stderr) = serve(dir.path(), &[]).wait_output();
    assert!(!status.success() && status.code().is_some(), "{status}\n{stderr}");
    let line = stderr.lines().find(|l| l.contains("state/cutover-state.json")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("cannot be read") && line.contains("--reset-state"), "{line}");
    assert_eq!(std::fs::read_to_string(state.join("inside")).unwrap(), "kept");
    assert!(std::net::TcpListener::bind(http).is_ok(), "{http} was bound despite the error");
    std::fs::remove_dir_all(&state).unwrap();

    let gone =
        r#"{"version":1,"sites":{"gone":{"live":"blue","previous":null},"shop":{"live":"purple","previous":null}}}"#;
    std::fs::write(&state, gone).unwrap();
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    assert_eq!(support::get(http, "shop", "/").await.body, "blue");
    let (_, site) = support::admin_call(admin, "GET", "/v1/sites/shop", None, None).await;
    assert_eq!(site["live"], "blue", "{site}");
    child.kill().unwrap();
    let stderr = child.wait_output().1;
    let warned = |what: &str| stderr.lines().any(|l| l.contains("WARN") && l.contains(what));
    assert!(warned("site=gone") && warned("target=purple"), "{stderr}");
}

/// `check` exits 0 on the documented example and 1 with every error (field
/// path and value) on a bad file; `serve` refuses the same file before binding.
#[tokio::test]
async fn check_and_serve_reject_bad_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = run(Command::new(BIN).args(["check", "--config", &format!("{root}/config/cutover.yaml")]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bad = format!(
        r#"
listen: {{ http: "127.0.0.1:{port}" }}
admin: {{ listen: "0.0.0.0:9901" }}
sites:
  - name: shop
    hosts: [a.test]
    live: purple
    targets:
      blue: {{ endpoints: ["not-an-endpoint"] }}
    health: {{ healthy_threshold: 0 }}
"#
    );
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let out = run(Command::new(BIN).args(["check", "--config"]).arg(&file));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "admin.listen",
        "sites[0].live",
        "purple",
        "sites[0].targets.blue.endpoints[0]",
        "not-an-endpoint",
        "sites[0].health.healthy_threshold",
        "bad.yaml",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    let out = run(Command::new(BIN).args(["serve", "--config"]).arg(&file));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sites[0].live"));
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());

    let out = run(Command::new(BIN).args(["check", "--config", "/nonexistent/cutover.yaml"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cutover.yaml"));
}

/// `ctl` exit codes: 0 success, 1 refused (reasons printed), 2 unreachable or usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exit_codes_and_output() {
    let blue = Origin::start("blue").await;
    let dead = support::dead_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let (_http, admin) = write_config(dir.path(), blue.addr, dead);
    let mut child = serve(dir.path(), &["--log-format", "json"]);
    wait_up(admin, &mut child).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let out = ctl(admin, &["status"]).await;
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SITE") && stdout.contains("shop"), "{stdout}");

    let out = ctl(admin, &["status", "shop"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("green") && stdout.contains("UNHEALTHY"), "{stdout}");

    let out = ctl(admin, &["switch", "shop", "green"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("target_unhealthy") && stderr.contains(&dead.to_string()), "{stderr}");

    let out = ctl(admin, &["switch", "shop", "green", "--force"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let out = ctl(admin, &["history", "shop"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("refused") && stdout.contains("forced"), "{stdout}");

    let out = ctl(admin, &["set-target", "shop", "blue", "--endpoint", "127.0.0.1:1", "--version", "v3"]).await;
    assert_eq!(out.status.code(), Some(0));

    let out = ctl(support::dead_addr().await, &["status"]).await;
    assert_eq!(out.status.code(), Some(2));
    // Something else answering at --admin (an app, the data plane) is not an
    // acknowledgement: exit 2, whatever its status.
    for not_admin in [blue.addr, _http] {
        let out = ctl(not_admin, &["switch", "shop", "green"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{not_admin}: {stderr}");
        assert!(stderr.contains("is this cutover's admin API?"), "{stderr}");
    }
    // An address that takes the connection and never answers: exit 2 at --request-timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let out = ctl(silent.local_addr().unwrap(), &["switch", "shop", "green", "--request-timeout", "300ms"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no answer within 300ms"), "{stderr}");
    drop(silent);
    let out = ctl(admin, &["switch", "shop"]).await;
    assert_eq!(out.status.code(), Some(2), "missing argument is a usage error");
    let out = ctl(admin, &["pause", "shop", "--timeout", "soon"]).await;
    assert_eq!(out.status.code(), Some(2), "a bad duration is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("such as 30s"), "{out:?}");
    // An empty $CUTOVER_ADMIN_URL is unset: the default address, not an error about "".
    let out =
        tokio::process::Command::new(BIN).args(["ctl", "status"]).env("CUTOVER_ADMIN_URL", "").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_panic("cutover ctl status", &stderr);
    assert!(stderr.contains("http://127.0.0.1:9901") || out.status.success(), "{stderr}");
    // `--admin` (and `--token`) may also follow the subcommand.
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "status", "shop", "--admin", &format!("http://{admin}")])
        .output()
        .await
        .unwrap();
    assert_no_panic("cutover ctl status shop", &String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // JSON logs: one access line per request.
    let _ = support::get(_http, "shop", "/").await;
    child.kill().unwrap();
    let logs = child.wait_output().1;
    let access = logs
        .lines()
        .find(|l| l.contains("request_id") && l.contains(r#""path":"/""#))
        .unwrap_or_else(|| panic!("no access line in:\n{logs}"));
    let line: serde_json::Value = serde_json::from_str(access).unwrap();
    assert_eq!(line["site"], "shop");
    assert_eq!(line["target"], "green", "{access}");
    assert_eq!((&line["method"], &line["path"]), (&serde_json::json!("GET"), &serde_json::json!("/")), "{access}");
    assert_eq!(line["status"], 502);
    assert_eq!(access.matches("\"target\"").count(), 1, "{access}");
    let id = line["request_id"].as_str().unwrap_or_default();
    assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "request id {id:?} in {access}");
}

/// `--version` and `--help` work on every command.
#[test]
fn version_and_help() {
    let out = run(Command::new(BIN).arg("--version"));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cutover "));
    for cmd in [&["serve"][..], &["check"], &["demo"], &["ctl"], &["ctl", "switch"], &["ctl", "set-target"]] {
        let out = run(Command::new(BIN).args(cmd).arg("--help"));
        assert!(out.status.success(), "{cmd:?} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
    for cmd in ["serve", "check", "demo", "ctl"] {
        let out = run(Command::new(BIN).args([cmd, "--version"]));
        assert!(out.status.success(), "{cmd} --version");
        assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")), "{cmd} --version");
    }
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
}

/// SIGTERM with a slow request in flight: the listener closes at once (new
/// connections are refused), the request completes, the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_then_exits_0() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let slow = tokio::spawn(async move { support::get(http, "shop", "/slow?ms=1500").await });
    while blue.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "new connections still accepted after SIGTERM");
    let a = slow.await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "blue slow done"));
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{status}");
}

/// SIGHUP re-reads the configuration file, like `POST /v1/reload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_configuration() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let file = dir.path().join("cutover.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    // "*" is replaced by a named host: an unknown host then gets 404.
    std::fs::write(&file, text.replace(r#"hosts: ["*"]"#, "hosts: [shop.test]")).unwrap();
    assert_eq!(support::get(http, "other.test", "/").await.status, 200);
    signal(&child, "-HUP");
    let mut status = 0;
    for _ in 0..100 {
        status = support::get(http, "other.test", "/").await.status;
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 404, "SIGHUP did not reload");
    assert_eq!(support::get(http, "shop.test", "/").await.body, "blue");
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP stopped the process");
    // A refused `ctl reload` prints every error, each naming its field.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("sites:", "bogus_key: 1\nsites:")).unwrap();
    let out = ctl(admin, &["reload"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid_config") && stderr.contains("  - bogus_key: "), "{stderr}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `ctl deploy` follows the steps as they happen and exits 0 on success, 1 on
/// failure with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_deploy_shows_steps_and_exit_codes() {
    let (blue, green, next) = (Origin::start("blue").await, Origin::start("green").await, Origin::start("next").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;

    let next_addr = next.addr.to_string();
    let out =
        ctl(admin, &["deploy", "shop", "green", "--endpoint", &next_addr, "--version", "v2", "--watch", "300ms"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for step in ["set_target", "wait_healthy", "smoke", "switch", "drain", "watch", "succeeded"] {
        assert!(stdout.contains(step), "missing {step} in:\n{stdout}");
    }
    assert_eq!(support::get(http, "shop", "/").await.body, "next");

    let dead = support::dead_addr().await.to_string();
    let out = ctl(admin, &["deploy", "shop", "blue", "--endpoint", &dead, "--healthy-timeout", "500ms"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("failed") && stderr.contains(&dead), "{stdout}\n{stderr}");
    assert_eq!(support::get(http, "shop", "/").await.body, "next");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `cutover demo`: two releases behind the proxy on the given ports, a banner
/// with the `cutover ctl` commands to try, and a switch that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_blue_prints_ctl_commands_and_switches() {
    use tokio::io::AsyncBufReadExt;
    let (port, admin_port) = (free_port(), free_port());
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["demo", "--port", &port.to_string(), "--admin-port", &admin_port.to_string()])
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    while !banner.contains("Ctrl-C") {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let line = line.expect("no banner within 30 s").unwrap().expect("demo exited before its banner");
        banner.push_str(&line);
        banner.push('\n');
    }
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert!(banner.contains(&format!("cutover ctl --admin http://{admin} switch demo green")), "{banner}");
    let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(support::get(proxy, "localhost", "/").await.body.contains("blue"));
    // The switch is gated on health: wait for green to be seen healthy.
    let mut out = ctl(admin, &["switch", "demo", "green"]).await;
    for _ in 0..100 {
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = ctl(admin, &["switch", "demo", "green"]).await;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(support::get(proxy, "localhost", "/").await.body.contains("green"));
    let pid = child.id().unwrap().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert_no_panic("cutover demo", &String::from_utf8_lossy(&std::fs::read(log.path()).unwrap()));
}

/// A pause acknowledged before `kill -9` holds requests after the restart,
/// with the same timeout, until `resume` (which is durable too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_survives_kill_9() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let out = ctl(admin, &["pause", "shop", "--timeout", "60s"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let out = ctl(admin, &["--json", "status", "shop"]).await;
    let site: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(site["mode"]["paused"], true, "{site}");
    let held = tokio::spawn(async move { support::get(http, "shop", "/").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a request passed the restored pause");
    let out = ctl(admin, &["resume", "shop"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer = tokio::time::timeout(Duration::from_secs(5), held).await.unwrap().unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "blue"));
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    assert_eq!(support::get(http, "shop", "/").await.body, "blue", "the resume was not durable");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A post-switch watch acknowledged before `kill -9` runs again after the
/// restart, for the time it has left, and still rolls a failing target back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_switch_watch_survives_kill_9() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let config = dir.path().join("cutover.yaml");
    let yaml = std::fs::read_to_string(&config).unwrap() + "    switch: { watch: { duration: 60s } }\n";
    std::fs::write(&config, yaml).unwrap();
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let body = serde_json::json!({"to": "green"});
    let mut before = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, site) =
            support::admin_call(admin, "POST", "/v1/sites/shop/switch", Some(body.clone()), None).await;
        before = site;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(before["watch"]["target"], "green", "switch never accepted: {before}");
    assert_eq!(before["watch"]["resumed_at"], serde_json::Value::Null);
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let (_, site) = support::admin_call(admin, "GET", "/v1/sites/shop", None, None).await;
    let watch = &site["watch"];
    assert_eq!((watch["target"].as_str(), watch["previous"].as_str()), (Some("green"), Some("blue")), "{site}");
    assert_eq!(watch["started_at"], before["watch"]["started_at"], "{site}");
    assert!(watch["resumed_at"].is_string(), "{site}");
    assert_eq!(watch["duration"], "1m", "{site}");
    let status = String::from_utf8(ctl(admin, &["status", "shop"]).await.stdout).unwrap();
    assert!(status.contains("resumed after a restart at"), "{status}");
    // Green fails: the resumed watch rolls it back (default min_requests 20).
    green.faults.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rolled_back = false;
    for _ in 0..200 {
        if support::get(http, "shop", "/").await.body == "blue" {
            rolled_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rolled_back, "the resumed watch did not roll green back");
    let (_, history) = support::admin_call(admin, "GET", "/v1/sites/shop/history", None, None).await;
    assert_eq!(
        (history[0]["kind"].as_str(), history[0]["actor"].as_str()),
        (Some("automatic_rollback"), Some("watch"))
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Polls `GET path` on the admin API until `done` holds for its answer (a
/// request to `http` first each time, when given); `None` after about 4 s.
async fn admin_until(
    admin: SocketAddr,
    path: &str,
    http: Option<SocketAddr>,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    for _ in 0..400 {
        if let Some(http) = http {
            let _ = support::get(http, "shop", "/").await;
        }
        let (_, answer) = support::admin_call(admin, "GET", path, None, None).await;
        if done(&answer) {
            return Some(answer);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A deploy acknowledged before `kill -9` answers by id after the restart;
/// one that went live follows its resumed watch, which still rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_survives_kill_9() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let body = serde_json::json!({"target": "green", "endpoints": [green.addr.to_string()], "watch": "60s"});
    let (status, answer) = support::admin_call(admin, "POST", "/v1/sites/shop/deploy", Some(body), None).await;
    assert_eq!(status, 202, "{answer}");
    let path = format!("/v1/deployments/{}", answer["id"].as_str().unwrap());
    let watching = admin_until(admin, &path, None, |d| d["steps"][5]["state"] == "running").await;
    assert!(watching.is_some(), "the deploy never reached its watch");
    child.kill().unwrap();
    child.wait().unwrap();

    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let (status, d) = support::admin_call(admin, "GET", &path, None, None).await;
    assert_eq!(
        (status, d["state"].as_str(), d["steps"][5]["state"].as_str()),
        (200, Some("running"), Some("running")),
        "{d}"
    );
    green.faults.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let ended = admin_until(admin, &path, Some(http), |d| d["state"] != "running").await.unwrap_or_default();
    assert_eq!(ended["state"], "rolled_back", "{ended}");
    assert_eq!(support::get(http, "shop", "/").await.body, "blue");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A second cutover cannot take the same state file (it is locked) nor the
/// same listening port (`SO_REUSEPORT` would have shared it silently); a
/// state directory that does not exist stops the start, naming it; a
/// temporary file a crashed save left behind is removed at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_is_refused_and_state_faults_are_named() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let stale = dir.path().join("state/cutover-state.json.tmp-999999-0");
    std::fs::write(&stale, "half a save").unwrap();
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    assert!(!stale.exists(), "a stale temporary state file was left");

    // Same file (and same ports): refused because of the lock.
    let (status, stderr) = serve(dir.path(), &[]).wait_output();
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("state.path") && stderr.contains("in use by another cutover"), "{stderr}");

    // Another state file, same proxy port: refused at the bind.
    let other = tempfile::tempdir().unwrap();
    write_config(other.path(), blue.addr, green.addr);
    let yaml = std::fs::read_to_string(other.path().join("cutover.yaml")).unwrap();
    let http_line = yaml.lines().find(|l| l.starts_with("listen:")).unwrap().to_string();
    let yaml = yaml.replace(&http_line, &format!("listen: {{ http: \"{http}\" }}"));
    std::fs::write(other.path().join("cutover.yaml"), &yaml).unwrap();
    let (status, stderr) = serve(other.path(), &[]).wait_output();
    assert_eq!(status.code(), Some(1), "a second cutover shared {http}");
    assert!(stderr.contains("cutover.yaml: listen.http: cannot bind"), "{stderr}");
    assert_eq!(support::get(http, "shop", "/").await.body, "blue");
    child.kill().unwrap();
    child.wait().unwrap();

    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let (status, stderr) = serve(dir.path(), &[]).wait_output();
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("does not exist") && stderr.contains("state"), "{stderr}");
}

/// Under an open-file limit too low for `max_connections`, cutover says so and
/// serves only the connections that fit with an upstream connection each: the
/// rest are closed at once, the admin API keeps answering, and requests pass
/// again once the idle connections are gone (reliability plan C-5b, D-7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_caps_connections_and_spares_the_admin_api() {
    use tokio::io::AsyncReadExt;
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    // (300 - 256 kept back) / 2 = 22 client connections. A port picked free
    // may be taken by another test before cutover binds it: then new ones.
    let mut attempts = 0;
    let (http, admin, mut child) = loop {
        let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
        let mut child =
            Cutover::spawn(Command::new("sh").arg("-c").arg(format!(
                "ulimit -n 300 && exec {BIN} serve --config {}",
                dir.path().join("cutover.yaml").display()
            )));
        match try_up(admin, &mut child).await {
            Ok(()) => break (http, admin, child),
            Err(early) if early.contains("cannot bind") && attempts < 3 => attempts += 1,
            Err(early) => panic!("{early}"),
        }
    };
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(http).await.unwrap());
    }
    let reads = idle.iter_mut().map(|s| async move {
        let mut byte = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_millis(300), s.read(&mut byte)).await, Ok(Ok(0)))
    });
    let closed = futures_util::future::join_all(reads).await.into_iter().filter(|&c| c).count();
    assert_eq!(closed, 18, "connections closed beyond the 22 that fit");
    let status = ctl(admin, &["--json", "status", "shop"]).await;
    assert!(status.status.success(), "admin API with every data-plane place taken: {status:?}");
    drop(idle);
    let mut served = false;
    for _ in 0..50 {
        if let Ok(Ok(answer)) = tokio::time::timeout(Duration::from_secs(1), async {
            support::Client::connect(http).await.get("shop", "/").await
        })
        .await
        {
            served = answer.body == "blue";
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "no request served once the idle connections closed");
    child.kill().unwrap();
    let stderr = child.wait_output().1;
    assert!(stderr.contains("serving at most 22 connections") && stderr.contains("ulimit -n"), "{stderr}");
}

/// D-7: while 200 slowloris connections drip request heads a byte every
/// 100 ms and rapid-reset floods (h2c) hit the data plane of the real
/// binary, every admin call (status, switch, `/healthz`) is answered within
/// 5 s, and each of 8 switches takes effect: a request sent after its ack
/// goes to the target it named. The attack is shown to be under way: the
/// proxy counts the slowloris connections, and floods get GOAWAY while the
/// admin calls run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_and_switches_under_slowloris_and_an_h2_flood() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use support::h2_frames as h2;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &[]);
    wait_up(admin, &mut child).await;
    let healthy = |site: &serde_json::Value| site["targets"]["green"]["endpoints"][0]["healthy"] == true;
    let mut ready = false;
    for _ in 0..200 {
        ready = healthy(&support::admin_call(admin, "GET", "/v1/sites/shop", None, None).await.1);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "green never became healthy");

    let stop = Arc::new(AtomicBool::new(false));
    let slowloris: Vec<_> = (0..200)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                'connect: while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else { continue };
                    if s.write_all(b"GET /slowloris HTTP/1.1\r\nHost: shop\r\nX-Drip: ").await.is_err() {
                        continue;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                            Ok(Ok(0)) | Ok(Err(_)) => continue 'connect,
                            Ok(Ok(_)) => {}
                            Err(_) if s.write_all(b"a").await.is_err() => continue 'connect,
                            Err(_) => {}
                        }
                    }
                }
            })
        })
        .collect();
    let goaways = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, goaways) = (stop.clone(), goaways.clone());
        let block = h2::request_block("shop", "GET", b"/flood", &[]);
        let out: Vec<u8> = (1..4000u32)
            .step_by(2)
            .flat_map(|id| {
                let cancel = h2::frame(h2::RST_STREAM, 0, id, &h2::CANCEL.to_be_bytes());
                [h2::frame(h2::HEADERS, h2::END_STREAM | h2::END_HEADERS, id, &block), cancel].concat()
            })
            .collect();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (mut frames, mut w) = h2::raw_h2(http).await;
                let out = out.clone();
                let writer = tokio::spawn(async move {
                    for batch in out.chunks(64 * 1024) {
                        if w.write_all(batch).await.is_err() {
                            break;
                        }
                    }
                });
                if frames.until(|f| f.kind == h2::GOAWAY).await.is_some() {
                    goaways.fetch_add(1, Ordering::Relaxed);
                }
                frames.until_closed(|_| false).await;
                let _ = writer.await;
            }
        })
    };
    // The attack is on: the proxy holds the slowloris crowd, and a flood was answered.
    let gauge = r#"cutover_client_connections{listener="http"} "#;
    let held = || async {
        let metrics = support::get(admin, "127.0.0.1", "/metrics").await.body;
        let line = metrics.lines().find_map(|l| l.strip_prefix(gauge)).map(str::to_string);
        line.and_then(|n| n.parse::<f64>().ok()).unwrap_or(0.0)
    };
    let mut crowd = 0.0;
    for _ in 0..500 {
        crowd = held().await;
        if crowd >= 150.0 && goaways.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(crowd >= 150.0 && goaways.load(Ordering::Relaxed) > 0, "attack not under way: {crowd} connections");
    let floods_before = goaways.load(Ordering::Relaxed);

    let mut least = f64::MAX;
    for i in 0..8 {
        let to = ["green", "blue"][i % 2];
        let (status, site) = within_5s("status", support::admin_call(admin, "GET", "/v1/sites/shop", None, None)).await;
        assert_eq!((status, site["live"].as_str()), (200, Some(["blue", "green"][i % 2])), "{site}");
        let body = Some(serde_json::json!({ "to": to }));
        let switch = support::admin_call(admin, "POST", "/v1/sites/shop/switch", body, None);
        let (status, site) = within_5s("switch", switch).await;
        assert_eq!((status, site["live"].as_str()), (200, Some(to)), "switch {i}: {site}");
        let answer = within_5s("data-plane request", support::get(http, "shop", "/")).await;
        assert_eq!(answer.body, to, "request after switch {i} was acknowledged");
        assert_eq!(within_5s("/healthz", support::get(admin, "127.0.0.1", "/healthz")).await.status, 200);
        least = least.min(held().await);
        // Long enough for drips and new floods between the rounds.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(least >= 150.0, "the slowloris crowd thinned to {least} connections during the admin calls");
    assert!(goaways.load(Ordering::Relaxed) > floods_before, "no flood was answered during the admin calls");
    stop.store(true, Ordering::Relaxed);
    for t in slowloris {
        t.await.unwrap();
    }
    flood.await.unwrap();
    assert!(blue.seen().iter().chain(green.seen().iter()).all(|s| s.path == "/"), "an attack request was forwarded");
}

/// `call`'s outcome; fails the test when it takes more than 5 s.
async fn within_5s<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), call).await.unwrap_or_else(|_| panic!("{what}: no answer within 5 s"))
}

/// A switch sent raw, as the kill may cut it: the status line's code, or
/// `None` when no answer came before the connection ended.
async fn switch_or_cut(admin: SocketAddr, to: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({ "to": to }).to_string();
    let req = format!(
        "POST /v1/sites/shop/switch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    // A reset after the answer was sent still leaves its bytes here.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Starts cutover on `dir` again and waits until it is up; when another
/// process took one of its ports meanwhile (they were picked free, then let
/// go by the kill), on new ones, up to 3 times. Any other failure panics.
async fn restart(dir: &Path, blue: SocketAddr, green: SocketAddr, ports: &mut (SocketAddr, SocketAddr)) -> Cutover {
    for _ in 0..3 {
        let mut child = serve(dir, &[]);
        match try_up(ports.1, &mut child).await {
            Ok(()) => return child,
            Err(early) if early.contains("cannot bind") => *ports = write_config(dir, blue, green),
            Err(early) => panic!("{early}"),
        }
    }
    panic!("no free ports in 3 attempts");
}

/// Waits until `target` of `shop` has been probed healthy (the switch gate after a start).
async fn wait_target_healthy(admin: SocketAddr, target: &str) {
    let healthy =
        admin_until(admin, "/v1/sites/shop", None, |s| s["targets"][target]["endpoints"][0]["healthy"] == true);
    assert!(healthy.await.is_some(), "{target} never became healthy");
}

/// E-1: `kill -9` at a pseudo-random 0–20 ms into a switch, 30 times: every
/// restart succeeds with the old or the new target live (the new one whenever
/// the 200 came), the state file agrees, no temporary file is left, and
/// traffic goes to the live target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_of_a_switch_keeps_the_old_or_the_acknowledged_target() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let mut ports = write_config(dir.path(), blue.addr, green.addr);
    let state_dir = dir.path().join("state");
    let mut child = restart(dir.path(), blue.addr, green.addr, &mut ports).await;
    let (mut live, mut seed) = ("blue".to_string(), 0x9e37_79b9_7f4a_7c15_u64);
    // Switches answered; cut before their answer with the old target, with the new one.
    let (mut acknowledged, mut cut_old, mut cut_new) = (0, 0, 0);
    for i in 0..30 {
        let to = if live == "blue" { "green" } else { "blue" };
        wait_target_healthy(ports.1, to).await;
        // xorshift64: the same delays on every run.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % 20_001);
        let switch = tokio::spawn(switch_or_cut(ports.1, to));
        tokio::time::sleep(delay).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let answer = switch.await.unwrap();
        assert!(matches!(answer, None | Some(200)), "iteration {i}: the switch answered {answer:?}");

        child = restart(dir.path(), blue.addr, green.addr, &mut ports).await;
        let (http, admin) = ports;
        let (_, site) = support::admin_call(admin, "GET", "/v1/sites/shop", None, None).await;
        let now = site["live"].as_str().unwrap_or_default().to_string();
        match (answer, now == to) {
            (Some(_), true) => acknowledged += 1,
            (Some(_), false) => panic!("iteration {i} ({delay:?}): an acknowledged switch was lost: {site}"),
            (None, false) if now == live => cut_old += 1,
            (None, false) => panic!("iteration {i}: live is {now:?}"),
            (None, true) => cut_new += 1,
        }
        let mut names: Vec<String> =
            std::fs::read_dir(&state_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        match std::fs::read(state_dir.join("cutover-state.json")) {
            Ok(bytes) => {
                let saved: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(saved["sites"]["shop"]["live"].as_str(), Some(now.as_str()), "iteration {i}: {saved}");
                assert_eq!(names, ["cutover-state.json", "cutover-state.json.lock"], "iteration {i}");
            }
            // Killed before the first save ever finished: the configuration's target.
            Err(_) => {
                assert_eq!((now.as_str(), &names[..]), ("blue", &["cutover-state.json.lock".to_string()][..]))
            }
        }
        assert_eq!(support::get(http, "shop", "/").await.body, now, "iteration {i}");
        live = now;
    }
    eprintln!("{acknowledged} acknowledged before the kill; cut before the answer: {cut_old} old, {cut_new} new");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `shop`'s history, newest first, as (reason, from, to), each entry an accepted switch by the API.
async fn switch_history(admin: SocketAddr) -> Vec<(String, String, String)> {
    let (_, history) = support::admin_call(admin, "GET", "/v1/sites/shop/history", None, None).await;
    let entries = history.as_array().unwrap_or_else(|| panic!("{history}"));
    let field = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
    for e in entries {
        assert_eq!(
            (field(e, "kind"), field(e, "result"), field(e, "actor")),
            ("switch".into(), "ok".into(), "api".into())
        );
    }
    entries.iter().map(|e| (field(e, "reason"), field(e, "from"), field(e, "to"))).collect()
}

/// The (reason, from, to) of the first `n` switches of E-4 (blue → green → blue ...), newest first.
fn e4_switches(n: usize) -> Vec<(String, String, String)> {
    let target = |i: usize| if i.is_multiple_of(2) { "blue" } else { "green" }.to_string();
    (0..n).rev().map(|i| (format!("e4-{i}"), target(i), target(i + 1))).collect()
}

/// E-4: five switches acknowledged back to back then `kill -9` at once, and a
/// switch then SIGTERM: each restart has the last acknowledged target live and
/// every switch in the history, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_returns_to_the_last_acknowledged_switch() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let mut ports = write_config(dir.path(), blue.addr, green.addr);
    let mut child = restart(dir.path(), blue.addr, green.addr, &mut ports).await;
    let admin = ports.1;
    wait_target_healthy(admin, "green").await;
    let switch = |admin: SocketAddr, i: usize, to: &'static str| async move {
        let body = serde_json::json!({ "to": to, "reason": format!("e4-{i}") });
        let (status, site) = support::admin_call(admin, "POST", "/v1/sites/shop/switch", Some(body), None).await;
        assert_eq!((status, site["live"].as_str()), (200, Some(to)), "switch {i}: {site}");
    };
    let order = ["green", "blue", "green", "blue", "green"];
    for (i, to) in order.into_iter().enumerate() {
        switch(admin, i, to).await;
    }
    child.kill().unwrap(); // SIGKILL, right after the fifth 200
    child.wait().unwrap();
    let mut child = restart(dir.path(), blue.addr, green.addr, &mut ports).await;
    let (http, admin) = ports;
    let (_, site) = support::admin_call(admin, "GET", "/v1/sites/shop", None, None).await;
    assert_eq!((site["live"].as_str(), site["previous"].as_str()), (Some("green"), Some("blue")), "{site}");
    assert_eq!(switch_history(admin).await, e4_switches(5));
    assert_eq!(support::get(http, "shop", "/").await.body, "green");

    // A switch, then SIGTERM: the clean exit keeps it too.
    wait_target_healthy(admin, "blue").await;
    switch(admin, 5, "blue").await;
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status}");
    let mut child = restart(dir.path(), blue.addr, green.addr, &mut ports).await;
    let (http, admin) = ports;
    let (_, site) = support::admin_call(admin, "GET", "/v1/sites/shop", None, None).await;
    assert_eq!((site["live"].as_str(), site["previous"].as_str()), (Some("blue"), Some("green")), "{site}");
    assert_eq!(switch_history(admin).await, e4_switches(6));
    assert_eq!(support::get(http, "shop", "/").await.body, "blue");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// E-7: `kill -9` while blue drains a slow request after a switch to green:
/// after the restart green is live, blue is a standby with nothing in flight,
/// and new requests go to green only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_drain_restarts_with_nothing_draining() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let mut ports = write_config(dir.path(), blue.addr, green.addr);
    let mut child = restart(dir.path(), blue.addr, green.addr, &mut ports).await;
    let (http, admin) = ports;
    wait_target_healthy(admin, "green").await;
    let slow = tokio::spawn(async move { support::Client::connect(http).await.get("shop", "/slow?ms=3000").await });
    assert!(
        support::eventually(Duration::from_secs(5), || blue.count() == 1).await,
        "the slow request never reached blue"
    );
    let (status, site) =
        support::admin_call(admin, "POST", "/v1/sites/shop/switch", Some(serde_json::json!({"to": "green"})), None)
            .await;
    assert_eq!(status, 200, "{site}");
    let blue_now = &site["targets"]["blue"];
    assert_eq!((blue_now["state"].as_str(), blue_now["inflight"].as_u64()), (Some("draining"), Some(1)), "{site}");
    child.kill().unwrap(); // SIGKILL, mid-drain
    child.wait().unwrap();
    assert!(slow.await.unwrap().is_err(), "the slow request completed through a killed proxy");

    let mut child = restart(dir.path(), blue.addr, green.addr, &mut ports).await;
    let (http, admin) = ports;
    let (_, site) = support::admin_call(admin, "GET", "/v1/sites/shop", None, None).await;
    assert_eq!((site["live"].as_str(), site["previous"].as_str()), (Some("green"), Some("blue")), "{site}");
    let blue_now = &site["targets"]["blue"];
    assert_eq!((blue_now["state"].as_str(), blue_now["inflight"].as_u64()), (Some("standby"), Some(0)), "{site}");
    assert_eq!(blue_now["endpoints"][0]["inflight"], 0, "{site}");
    for _ in 0..10 {
        assert_eq!(support::get(http, "shop", "/").await.body, "green");
    }
    assert_eq!(blue.count(), 1, "blue got new traffic after the restart");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// One hostile request of [`access_log_escapes_what_clients_send`]: the
/// target is `before` + `/lgN` + `after`, so its access line is found by
/// its path.
struct LogCase {
    method: &'static [u8],
    before: &'static [u8],
    after: &'static [u8],
    /// Extra header lines, each ending in `\r\n`.
    headers: &'static [u8],
    /// `Some(status)`: answered by cutover, exactly one access line with it;
    /// `None`: refused by the HTTP parser (400), at most one line.
    status: Option<u16>,
    /// The logged path after `/lgN` (non-ASCII percent-encoded).
    logged: &'static str,
    /// The logged request id: `Some` as sent, `None` a 32-hex one of cutover's.
    id: Option<&'static str>,
}

const fn lc(before: &'static [u8], after: &'static [u8], headers: &'static [u8]) -> LogCase {
    LogCase { method: b"GET", before, after, headers, status: None, logged: "", id: None }
}

impl LogCase {
    const fn ok(self, status: u16, logged: &'static str) -> LogCase {
        LogCase { status: Some(status), logged, ..self }
    }
}

fn log_cases() -> Vec<LogCase> {
    vec![
        lc(b"", b"/a%0d%0aFORGED?q=%0d%0a%1b[31m", b"").ok(200, "/a%0d%0aFORGED"),
        lc(b"", br#"/x"y\z?q=\'"#, b"").ok(200, r#"/x"y\z"#),
        lc(b"", b"/caf\xc3\xa9", b"").ok(200, "/caf%C3%A9"),
        // 8-bit CSI (a terminal escape), NEL, line separator, bidi override.
        lc(b"", b"/a\xc2\x9b31mRED", b"").ok(200, "/a%C2%9B31mRED"),
        lc(b"", b"/a\xc2\x85FORGED", b"").ok(200, "/a%C2%85FORGED"),
        lc(b"", b"/a\xe2\x80\xa8FORGED\xe2\x80\xae", b"").ok(200, "/a%E2%80%A8FORGED%E2%80%AE"),
        lc(b"", b"/a{}%00%ff%fe", b"").ok(200, "/a{}%00%ff%fe"),
        lc(b"http://shop", b"/abs%0a", b"").ok(200, "/abs%0a"),
        lc(b"", b"/\x1b[31mred", b""),
        lc(b"", b"/ok\rFORGED", b""),
        lc(b"", b"/\xff", b""),
        lc(b"", b"/ok", b"User-Agent: \x1b[31mred\r\n"),
        lc(b"", b"/ok", b"User-Agent: caf\xc3\xa9\xff\x9b31m\r\n").ok(200, "/ok"),
        lc(b"", b"/ok", b"X-Evil: \x1b]0;pwned\x07\r\n"),
        LogCase { id: Some(r#""q\""#), ..lc(b"", b"/ok", b"X-Request-Id: \"q\\\"\r\n").ok(200, "/ok") },
        lc(b"", b"/ok", b"X-Request-Id: caf\xc3\xa9\r\n").ok(200, "/ok"),
        lc(b"", b"/ok", b"X-Request-Id: \x7f\r\n"),
        lc(b"", b"/ok", b"X-Request-Id: a\r\n FORGED\r\n"),
        LogCase { id: Some("a"), ..lc(b"", b"/ok", b"X-Request-Id: a\nFORGED: 1\r\n").ok(200, "/ok") },
        lc(b"", b"/ok", b"Host: x\"\\\r\n").ok(400, "/ok"),
        lc(b"", b"/ok", b"Host: caf\xc3\xa9\r\n").ok(400, "/ok"),
        lc(b"", b"/ok", b"Host: shop\x1b[31m\r\n"),
        LogCase { method: b"GET%0a", ..lc(b"", b"/m", b"").ok(200, "/m") },
    ]
}

/// Sends the [`log_cases`] to a `cutover serve` with `--log-format FORMAT`
/// (`human` or `json`); for each: the answer's status, and its access
/// lines' parsed fields (method, path, status, request id); then every line
/// cutover logged.
async fn hostile_requests_logged(format: &str) -> (Vec<(u16, Vec<[String; 4]>)>, Vec<String>) {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let mut child = serve(dir.path(), &["--log-format", format]);
    wait_up(admin, &mut child).await;
    let cases = log_cases();
    let mut statuses = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut raw = case.method.to_vec();
        raw.push(b' ');
        raw.extend_from_slice(case.before);
        raw.extend_from_slice(format!("/lg{i}").as_bytes());
        raw.extend_from_slice(case.after);
        raw.extend_from_slice(b" HTTP/1.1\r\n");
        if !case.headers.starts_with(b"Host:") {
            raw.extend_from_slice(b"Host: shop\r\n");
        }
        raw.extend_from_slice(case.headers);
        raw.extend_from_slice(b"Connection: close\r\n\r\n");
        let answer = support::raw_exchange(http, &raw).await;
        let status = answer.get(9..12).and_then(|s| s.parse::<u16>().ok());
        statuses.push(status.unwrap_or_else(|| panic!("case {i}: no answer: {answer:?}")));
    }
    // The answers are in; their lines follow when each exchange is done.
    let logged = |i: usize| match format {
        "json" => format!(r#""path":"/lg{i}"#),
        _ => format!(" path=/lg{i}"),
    };
    let wanted: Vec<String> =
        cases.iter().enumerate().filter(|(_, c)| c.status.is_some()).map(|(i, _)| logged(i)).collect();
    let all_in = support::eventually(Duration::from_secs(10), || {
        let text = child.stderr();
        wanted.iter().all(|w| text.contains(w.as_str()))
    })
    .await;
    assert!(all_in, "access lines missing:\n{}", child.stderr());
    signal(&child, "-TERM");
    let (status, text) = child.wait_output();
    assert!(status.success(), "{status}\n{text}");
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let fields = |line: &str| -> Option<[String; 4]> {
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            v.get("request_id")?;
            let s = |k: &str| v[k].as_str().map_or_else(|| v[k].to_string(), str::to_owned);
            return Some([s("method"), s("path"), s("status"), s("request_id")]);
        }
        line.contains(" access: ").then_some(())?;
        let f = |k: &str| {
            let at = line.find(&format!(" {k}=")).unwrap_or_else(|| panic!("no {k} in {line:?}")) + k.len() + 2;
            line[at..].split(' ').next().unwrap().to_owned()
        };
        // The human format quotes (and escapes) a text field: the id.
        let id = f("request_id");
        let id = serde_json::from_str::<String>(&id).unwrap_or_else(|_| panic!("request_id {id} in {line:?}"));
        Some([f("method"), f("path"), f("status"), id])
    };
    let access: Vec<[String; 4]> = lines.iter().filter_map(|l| fields(l)).collect();
    let mut per_case = Vec::new();
    let mut matched = 0;
    for (i, status) in statuses.into_iter().enumerate() {
        let prefix = format!("/lg{i}");
        let mine: Vec<[String; 4]> = access
            .iter()
            .filter(|f| f[1].strip_prefix(&prefix).is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit())))
            .cloned()
            .collect();
        matched += mine.len();
        per_case.push((status, mine));
    }
    assert_eq!(matched, access.len(), "access lines that belong to no request:\n{text}");
    (per_case, lines)
}

/// Requests carrying CR, LF, `%0d%0a`, ESC and 8-bit CSI, NEL, line
/// separators, bidi overrides, quotes, backslashes and UTF-8 / obs-text in
/// their path, query, method, Host, User-Agent, X-Request-Id or another
/// header leave, in both log formats, exactly one access line each (none
/// when the HTTP parser refused them with 400) with the path as sent (bytes
/// outside visible ASCII percent-encoded) and the request id kept or made;
/// every log line is printable ASCII (no terminal escape, no colour codes
/// in a file), JSON lines all parse, and human lines all start with a
/// timestamp, so no client forges a line (SPEC §6 "Logs", plan C-7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_escapes_what_clients_send() {
    let cases = log_cases();
    for format in ["json", "human"] {
        let (per_case, lines) = hostile_requests_logged(format).await;
        let all = lines.join("\n");
        for (n, line) in lines.iter().enumerate() {
            assert!(line.bytes().all(|b| (0x20..0x7f).contains(&b)), "{format} line {n} is not printable: {line:?}");
            match format {
                "json" => assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not JSON: {line:?}"),
                _ => assert!(line.starts_with("20") && line.as_bytes()[10] == b'T', "forged line {n}: {line:?}\n{all}"),
            }
        }
        for (i, ((status, mine), case)) in per_case.iter().zip(&cases).enumerate() {
            let Some(want) = case.status else {
                assert_eq!(*status, 400, "{format} case {i}");
                assert!(mine.len() <= 1 && mine.iter().all(|f| f[2] == "400"), "{format} case {i}: {mine:?}");
                continue;
            };
            assert_eq!(*status, want, "{format} case {i}");
            assert_eq!(mine.len(), 1, "{format} case {i}: access lines {mine:?}\n{all}");
            let [method, path, logged_status, id] = &mine[0];
            let want_method = std::str::from_utf8(case.method).unwrap();
            assert_eq!((method.as_str(), logged_status.as_str()), (want_method, want.to_string().as_str()), "case {i}");
            assert_eq!(path, &format!("/lg{i}{}", case.logged), "{format} case {i}");
            match case.id {
                Some(sent) => assert_eq!(id, sent, "{format} case {i}"),
                None if want == 400 => assert!(id == "-" || id.len() == 32, "{format} case {i}: {id}"),
                None => assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "case {i}: {id}"),
            }
        }
    }
}

/// D-2: the admin token never shows. `cutover serve` runs with a token file
/// and `RUST_LOG=trace` (every crate's most verbose logs: DEBUG lines show);
/// admin calls that
/// succeed, fail (bad JSON, unknown site, refused switch) or are refused
/// (a wrong token that starts with the real one or repeats it, the token in
/// the query string, with the Basic scheme or none), a reload, `ctl` with
/// a wrong token and a data-plane request carrying it all leave the token out of the
/// process's stdout and stderr, every answer, `/metrics`, and ctl's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_never_shows_in_logs_answers_or_metrics() {
    let (blue, green) = (Origin::start("blue").await, Origin::start("green").await);
    let dir = tempfile::tempdir().unwrap();
    let (http, admin) = write_config(dir.path(), blue.addr, green.addr);
    let token =
        format!("tk-{:032x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    std::fs::write(dir.path().join("admin.token"), format!("{token}\n")).unwrap();
    let yaml = std::fs::read_to_string(dir.path().join("cutover.yaml")).unwrap();
    let with_token =
        yaml.replace(&format!("listen: \"{admin}\" }}"), &format!("listen: \"{admin}\", token_file: admin.token }}"));
    assert_ne!(yaml, with_token);
    std::fs::write(dir.path().join("cutover.yaml"), with_token).unwrap();
    let mut child = Cutover::spawn(
        Command::new(BIN).arg("serve").arg("--config").arg(dir.path().join("cutover.yaml")).env("RUST_LOG", "trace"),
    );
    wait_up(admin, &mut child).await;
    let mut answers = Vec::new();
    let call = |method: &str, path: &str, body: &str, auth: Option<String>| {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        if let Some(a) = auth {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        async move { support::raw_exchange(admin, req.as_bytes()).await }
    };
    let bearer = Some(format!("Bearer {token}"));
    let status = |a: &str| a.get(9..12).unwrap_or_default().to_string();
    for (method, path, body, auth, want) in [
        ("GET", "/v1/sites", "", bearer.clone(), "200"),
        ("POST", "/v1/sites/shop/switch", "{\"to\":\"green\"}", bearer.clone(), "200"),
        ("POST", "/v1/sites/shop/switch", "{\"to\":", bearer.clone(), "400"),
        ("POST", "/v1/sites/nope/switch", "{\"to\":\"green\"}", bearer.clone(), "404"),
        ("POST", "/v1/sites/shop/switch", "{\"to\":\"none\"}", bearer.clone(), "404"),
        ("POST", "/v1/reload", "", bearer.clone(), "200"),
        ("GET", "/v1/sites", "", Some(format!("Bearer {token}x")), "401"),
        ("POST", "/v1/sites/shop/switch", "{\"to\":\"blue\"}", Some(format!("Bearer {token}{token}")), "401"),
        ("GET", &format!("/v1/sites?token={token}"), "", None, "401"),
        ("GET", &format!("/v1/sites?access_token={token}"), "", Some(format!("Bearer {token}x")), "401"),
        ("GET", "/v1/sites", "", Some(format!("Basic {token}")), "401"),
        ("GET", "/v1/sites", "", Some(token.clone()), "401"),
        ("GET", "/healthz", "", Some(format!("Bearer {token}x")), "200"),
    ] {
        let a = call(method, path, body, auth).await;
        assert_eq!(status(&a), want, "{method} {path}: {a}");
        answers.push(a);
    }
    let metrics = support::get(admin, "127.0.0.1", "/metrics").await.body;
    assert!(metrics.contains("cutover_switches_total"), "{metrics}");
    answers.push(metrics);
    // A data-plane request carrying the token (an operator's mistake), and
    // an underscore header, whose drop is logged at DEBUG.
    let plain = format!(
        "GET /after HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {token}\r\nX_Under: 1\r\nConnection: close\r\n\r\n"
    );
    let a = support::raw_exchange(http, plain.as_bytes()).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    answers.push(a);
    let wrong = format!("{token}x");
    let out = ctl(admin, &["--token", &wrong, "status"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    answers.push(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    let out = ctl(admin, &["--token", &token, "history", "shop"]).await;
    assert!(out.status.success(), "{out:?}");
    answers.push(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    for (i, a) in answers.iter().enumerate() {
        assert!(!a.contains(&token), "answer {i} shows the token: {a}");
    }
    signal(&child, "-TERM");
    let stdout = child.stdout();
    let (status, stderr) = child.wait_output();
    assert!(status.success(), "{status}");
    // The debug logs are there (the test would pass vacuously otherwise).
    assert!(stderr.contains("DEBUG") && stderr.contains(" access: "), "{stderr}");
    assert!(
        !stderr.contains(&token),
        "stderr shows the token:\n{}",
        stderr.lines().filter(|l| l.contains(&token)).collect::<Vec<_>>().join("\n")
    );
    assert!(!stdout.contains(&token), "stdout shows the token");
}
