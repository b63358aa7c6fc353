//! The `sluice` command: parses the command line, sets up logging, calls the
//! library and maps the result to the exit codes of SPEC §1 (0 clean, 1
//! config error, 2 bind or runtime failure).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use sluice::config::{self, LogFormat};
use sluice::runtime;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "L4/L7 reverse-proxy load balancer")]
struct Cli {
    /// Log line format on stderr; defaults to `log.format` of the config.
    #[arg(long, global = true, value_enum)]
    log_format: Option<FormatArg>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground.
    Run {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG", default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0, or print every error and exit 1.
    Check {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG", default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Start three demo backends and the proxy on 127.0.0.1:8080 (admin on
    /// 127.0.0.1:9901), and print what to try.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load_file(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(1)
            }
        },
        Command::Run { config } => {
            let config = match config::load_file(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(1);
                }
            };
            init_tracing(cli.log_format, config.log.format);
            let rt = match build_runtime() {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the runtime");
                    return ExitCode::from(2);
                }
            };
            rt.block_on(serve(config))
        }
        Command::Demo => {
            init_tracing(cli.log_format, LogFormat::Text);
            let rt = match build_runtime() {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the runtime");
                    return ExitCode::from(2);
                }
            };
            match rt.block_on(sluice::demo::run()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("demo failed: {err:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

async fn serve(config: config::Config) -> ExitCode {
    let running = match runtime::run(config).await {
        Ok(r) => r,
        Err(err) => {
            let source = std::error::Error::source(&err).map(|s| s.to_string());
            tracing::error!(error = %err, cause = source.as_deref().unwrap_or("-"), "cannot start");
            return ExitCode::from(2);
        }
    };
    let signals = match runtime::signals::Signals::install() {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, "cannot install signal handlers");
            return ExitCode::from(2);
        }
    };
    let signals =
        tokio::spawn(signals.run(Arc::clone(running.control()), running.shutdown_token()));
    announce_ready(&running);
    running.wait().await;
    signals.abort();
    ExitCode::SUCCESS
}

/// The single `ready` event, listing the bound addresses (tests wait on it).
fn announce_ready(running: &runtime::Running) {
    let listeners = running
        .listeners()
        .iter()
        .map(|(name, addr)| format!("{name}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    tracing::info!(listeners = %listeners, admin = %running.admin, "ready");
}

/// The main thread's runtime: worker 0, which also runs the control plane.
/// `runtime::run` starts the other workers, each on a thread of its own
/// with its own single-threaded runtime (see `sluice::runtime::workers`).
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn init_tracing(flag: Option<FormatArg>, from_config: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match flag {
        Some(FormatArg::Json) => true,
        Some(FormatArg::Text) => false,
        None => from_config == LogFormat::Json,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
