//! `cutover serve`: build the runtime, start the controller, bind the
//! listeners, serve until SIGTERM/SIGINT, then drain with a deadline.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use cutover_admin::Admin;
use cutover_config::Config;
use cutover_core::state::{FileStore, StateStore};
use cutover_core::Controller;
use cutover_metrics::Metrics;
use cutover_proxy::tls::TlsStore;
use cutover_proxy::{ListenerConfig, Proxy};

use crate::{fd_limit, workers};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::LogFormat;

/// Installs the global `tracing` subscriber (`RUST_LOG` overrides the `info` default).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or journald gets no escape
    // sequences (tracing-subscriber colours by default, whatever stderr is).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        // No `target` key of tracing's own: the access line's `target` field is the site's target.
        LogFormat::Json => builder.json().flatten_event(true).with_target(false).init(),
    }
}

/// Runs the proxy with `config` (read from `config_path`, re-read on reload)
/// until a signal; `ready` is called once the listeners are bound.
pub fn run(
    config: Config,
    config_path: Option<PathBuf>,
    reset_state: bool,
    ready: Option<Box<dyn FnOnce() + Send>>,
) -> ExitCode {
    // Errors name the configuration file, then the field.
    let file = config_path.as_ref().map_or_else(String::new, |p| format!("{}: ", p.display()));
    let store = match FileStore::open(&config.state_path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cutover: {file}state.path: {e}");
            return ExitCode::FAILURE;
        }
    };
    if reset_state {
        match store.reset() {
            Ok(Some(aside)) => {
                tracing::warn!(from = %store.path().display(), to = %aside.display(), "state file moved aside")
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("cutover: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // The control plane's runtime; the data plane has its own workers (see `workers`).
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cutover: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, config_path, Arc::new(store), ready)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cutover: {file}{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: Config,
    config_path: Option<PathBuf>,
    store: Arc<dyn StateStore>,
    ready: Option<Box<dyn FnOnce() + Send>>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let metrics = Metrics::new();
    let limits =
        cutover_config::Limits { max_connections: fd_limit::fit(config.limits.max_connections), ..config.limits };
    let workers = workers::count();
    let http = workers::bind(config.listen.http, workers)
        .with_context(|| format!("listen.http: cannot bind {}", config.listen.http))?;
    let https = match config.listen.https {
        Some(addr) => {
            let store = Arc::new(TlsStore::new(&config.tls).map_err(|e| anyhow::anyhow!("tls: {e}"))?);
            let sockets = workers::bind(addr, workers).with_context(|| format!("listen.https: cannot bind {addr}"))?;
            Some((sockets, store))
        }
        None => None,
    };
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", config.admin.listen))?;
    let mut config = config;
    if let Some((sockets, _)) = &https {
        // The port really bound (the file may say 0), for redirects to HTTPS.
        config.listen.https = sockets.first().and_then(|s| s.local_addr().ok());
    }
    let controller = Controller::start(config.clone(), config_path, store, metrics.clone())?;
    // Certificates are re-read with the configuration; a bad one refuses the reload.
    let tls_store = https.as_ref().map(|(_, store)| store.clone());
    controller.on_reload(Box::new(move |new| match &tls_store {
        Some(store) if !new.tls.is_empty() => store.reload(&new.tls),
        _ => Ok(()),
    }));
    tracing::info!(
        http = %config.listen.http,
        https = %config.listen.https.map_or_else(|| "off".to_string(), |a| a.to_string()),
        admin = %config.admin.listen,
        sites = config.sites.len(),
        "cutover serving"
    );
    if let Some(ready) = ready {
        ready();
    }

    let stop = CancellationToken::new();
    let proxy = Arc::new(Proxy::new(controller.table()));
    let listener_config =
        |scheme: &'static str, tls: Option<Arc<TlsStore>>| ListenerConfig::new(scheme, limits, &metrics, tls);
    let plain = listener_config("http", None);
    // `max_connections` holds for both listeners together.
    let permits = plain.permits.clone();
    let mut listeners = vec![workers::Listener { sockets: http, config: plain }];
    if let Some((sockets, store)) = https {
        let config = ListenerConfig { permits, ..listener_config("https", Some(store)) };
        listeners.push(workers::Listener { sockets, config });
    }
    let data_plane = workers::spawn(listeners, proxy, stop.clone(), config.shutdown_timeout)
        .context("cannot start the data-plane workers")?;
    let admin = Arc::new(Admin::new(controller.clone(), config.admin.token.clone()));
    let admin_plane = tokio::spawn(cutover_admin::serve(admin_listener, admin, stop.clone().cancelled_owned()));

    wait_for_signal(&controller).await;
    tracing::info!(deadline = ?config.shutdown_timeout, "shutting down: listeners closed, finishing in-flight requests");
    stop.cancel();
    let _ = tokio::task::spawn_blocking(move || {
        for worker in data_plane {
            let _ = worker.join();
        }
    })
    .await;
    let _ = admin_plane.await;
    controller.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. SIGHUP reloads the configuration (as `POST /v1/reload`).
async fn wait_for_signal(controller: &Controller) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => match controller.reload_file().await {
                Ok(outcome) => tracing::info!(sites = ?outcome.sites, restart_required = ?outcome.restart_required, "SIGHUP: configuration reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: reload refused; nothing changed"),
            },
        }
    }
}
