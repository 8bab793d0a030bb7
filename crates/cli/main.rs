//! The `cutover` binary: `serve`, `check`, `demo` and `ctl`.
//! Wiring, signals and the shutdown sequence only; the work is in the crates.

mod ctl;
mod demo;
mod fd_limit;
mod serve;
mod workers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// jemalloc, not the system allocator: tokio allocates each connection's task and IO
/// registration cache-line aligned, which glibc serves on a slow path (benches/README.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// An HTTP reverse proxy for zero-downtime blue-green releases.
#[derive(Debug, Parser)]
#[command(name = "cutover", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    #[command(version)]
    Serve {
        /// Configuration file [default: $CUTOVER_CONFIG, then ./cutover.yaml].
        #[arg(long, env = "CUTOVER_CONFIG", default_value = "cutover.yaml")]
        config: PathBuf,
        /// Move an existing state file aside and start from the configuration.
        #[arg(long)]
        reset_state: bool,
    },
    /// Validate a configuration: print every error and exit 1, or exit 0.
    #[command(version)]
    Check {
        /// Configuration file [default: $CUTOVER_CONFIG, then ./cutover.yaml].
        #[arg(long, env = "CUTOVER_CONFIG", default_value = "cutover.yaml")]
        config: PathBuf,
    },
    /// A self-contained tour: two demo releases behind the proxy on 127.0.0.1.
    #[command(version)]
    Demo(demo::DemoArgs),
    /// Drive a running cutover through its admin API.
    #[command(version)]
    Ctl(ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match cutover_config::load(&config) {
            Ok(c) => {
                println!("{}: valid ({} site(s))", config.display(), c.sites.len());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("{} error(s) in {}", errors.errors.len(), config.display());
                ExitCode::FAILURE
            }
        },
        Command::Serve { config, reset_state } => {
            serve::init_logging(cli.log_format);
            // Validate before anything is bound.
            let cfg = match cutover_config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("cutover: refusing to start: {} error(s) in {}", errors.errors.len(), config.display());
                    return ExitCode::FAILURE;
                }
            };
            serve::run(cfg, Some(config), reset_state, None)
        }
        Command::Demo(args) => {
            serve::init_logging(cli.log_format);
            demo::run(args)
        }
        Command::Ctl(args) => ctl::run(args),
    }
}
