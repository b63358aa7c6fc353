//! Starting and stopping a Sluice: bind everything, serve, shut down.
//!
//! [`run`] returns only once every socket is bound, with the real addresses,
//! so tests can start it on `127.0.0.1:0`. The returned [`Running`] is the
//! handle to reload, to begin a graceful shutdown and to wait for the end.

pub mod reload;
pub mod signals;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::admin::metrics::Metrics;
use crate::config::Config;
use crate::proxy::listener::{accept_loop, BoundListener, ListenerControl};
use crate::state::Shared;

/// How long a shutdown waits for the access log to be written out.
const ACCESS_LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Why Sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot bind listener {name} on {addr}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A running Sluice.
pub struct Running {
    /// Listener name and bound address, in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    shared: Arc<Shared>,
    begin_shutdown: CancellationToken,
    done: JoinHandle<()>,
}

impl Running {
    /// The shared state (snapshot, registry, metrics).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Address of the listener called `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// Starts a graceful shutdown (idempotent): /readyz turns 503 at once,
    /// listeners close after `shutdown.drain_delay`, in-flight work gets
    /// `shutdown.grace` to finish.
    pub fn shutdown(&self) {
        self.begin_shutdown.cancel();
    }

    /// A token that starts the graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.begin_shutdown.clone()
    }

    /// Resolves when the shutdown has finished.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Binds every listener and the admin socket, then serves in background
/// tasks until [`Running::shutdown`].
pub async fn run(config: Config) -> Result<Running, RunError> {
    let metrics = Metrics::new();
    let admin_addr = config.admin.listen;
    let shutdown = config.shutdown.clone();
    let listener_configs = config.listeners.clone();

    let admin_socket = TcpListener::bind(admin_addr)
        .await
        .map_err(|source| RunError::Bind {
            name: "admin".into(),
            addr: admin_addr,
            source,
        })?;
    let mut bound = Vec::new();
    for (i, l) in listener_configs.iter().enumerate() {
        let b = BoundListener::bind(i, l)
            .await
            .map_err(|source| RunError::Bind {
                name: l.name.clone(),
                addr: l.listen,
                source,
            })?;
        bound.push(b);
    }

    let shared = Arc::new(Shared::new(config, metrics));
    shared.metrics.config_loaded(true, unix_now());
    shared.health.restart(&shared.snapshot.load());
    let admin = admin_socket.local_addr().map_err(|source| RunError::Bind {
        name: "admin".into(),
        addr: admin_addr,
        source,
    })?;
    let mut listeners = Vec::new();
    for b in &bound {
        let addr = b.local_addr().map_err(|source| RunError::Bind {
            name: b.name.to_string(),
            addr: b.config.listen,
            source,
        })?;
        listeners.push((b.name.to_string(), addr));
    }

    let control = ListenerControl {
        stop_accepting: CancellationToken::new(),
        close_connections: CancellationToken::new(),
        tracker: TaskTracker::new(),
    };
    let accept_tasks = TaskTracker::new();
    for b in bound {
        accept_tasks.spawn(accept_loop(Arc::clone(&shared), b, control.clone()));
    }
    accept_tasks.close();
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::server::serve(
        Arc::clone(&shared),
        admin_socket,
        admin_stop.clone(),
    ));
    shared.set_ready();

    let begin_shutdown = CancellationToken::new();
    let done = {
        let shared = Arc::clone(&shared);
        let begin = begin_shutdown.clone();
        tokio::spawn(async move {
            begin.cancelled().await;
            shared.set_draining();
            tracing::info!(drain_delay = ?shutdown.drain_delay, grace = ?shutdown.grace, "shutdown started: draining");
            tokio::time::sleep(shutdown.drain_delay).await;
            control.stop_accepting.cancel();
            accept_tasks.wait().await;
            control.close_connections.cancel();
            control.tracker.close();
            let finished = tokio::time::timeout(shutdown.grace, control.tracker.wait()).await;
            match finished {
                Ok(()) => tracing::info!("shutdown complete: every connection finished"),
                Err(_) => tracing::warn!(
                    open = control.tracker.len(),
                    "shutdown grace expired with connections still open"
                ),
            }
            shared.health.stop();
            admin_stop.cancel();
            let _ = admin_task.await;
            // Every request has been logged by now; write out the queue.
            let log = Arc::clone(&shared.access_log);
            let _ = tokio::task::spawn_blocking(move || log.close(ACCESS_LOG_FLUSH)).await;
        })
    };

    Ok(Running {
        listeners,
        admin,
        shared,
        begin_shutdown,
        done,
    })
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
