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
use cutover_proxy::{ListenerConfig, Proxy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::LogFormat;

/// Installs the global `tracing` subscriber (`RUST_LOG` overrides the `info` default).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
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
    let store = FileStore::new(&config.state_path);
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cutover: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, config_path, Arc::new(store), ready)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cutover: {e:#}");
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
    let controller = Controller::start(config.clone(), config_path, store, metrics.clone())?;
    let http = TcpListener::bind(config.listen.http)
        .await
        .with_context(|| format!("listen.http: cannot bind {}", config.listen.http))?;
    let admin_listener = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin.listen: cannot bind {}", config.admin.listen))?;
    if config.listen.https.is_some() {
        tracing::warn!("listen.https is configured but TLS termination is not available in this build; ignoring it");
    }
    tracing::info!(http = %config.listen.http, admin = %config.admin.listen, sites = config.sites.len(), "cutover serving");
    if let Some(ready) = ready {
        ready();
    }

    let stop = CancellationToken::new();
    let proxy = Arc::new(Proxy::new(controller.table()));
    let listener_config = ListenerConfig {
        scheme: "http",
        limits: config.limits,
        connections: metrics.client_connections.with_label_values(&["http"]),
    };
    let data_plane = tokio::spawn(cutover_proxy::serve(
        http,
        proxy,
        listener_config,
        stop.clone().cancelled_owned(),
        config.shutdown_timeout,
    ));
    let admin = Arc::new(Admin::new(controller.clone(), config.admin.token.clone()));
    let admin_plane = tokio::spawn(cutover_admin::serve(admin_listener, admin, stop.clone().cancelled_owned()));

    wait_for_signal(&controller).await;
    tracing::info!(deadline = ?config.shutdown_timeout, "shutting down: listeners closed, finishing in-flight requests");
    stop.cancel();
    let _ = data_plane.await;
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
