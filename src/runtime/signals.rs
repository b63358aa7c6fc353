//! Process signals: SIGHUP reloads, SIGTERM/SIGINT shut down gracefully, and
//! a second SIGTERM/SIGINT exits at once.

use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::Control;

/// Exit code of a forced exit on a second shutdown signal.
pub const FORCED_EXIT_CODE: i32 = 2;

/// Installed signal handlers. Install them before announcing readiness: until
/// then SIGHUP and SIGTERM still have their default action (terminate).
pub struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Registers the handlers (needs a running tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Handles signals until the process ends. `shutdown` starts the
    /// graceful shutdown.
    pub async fn run(mut self, control: Arc<Control>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    // The outcome is logged and counted by the reload itself.
                    let _ = control.reload().await;
                }
                _ = self.term.recv() => on_stop(&shutdown, "SIGTERM"),
                _ = self.int.recv() => on_stop(&shutdown, "SIGINT"),
            }
        }
    }
}

fn on_stop(shutdown: &CancellationToken, name: &str) {
    if shutdown.is_cancelled() {
        tracing::warn!("second {name}: exiting now");
        std::process::exit(FORCED_EXIT_CODE);
    }
    tracing::info!("{name}: graceful shutdown");
    shutdown.cancel();
}
