//! Starting, reloading and stopping a Sluice.
//!
//! [`run`] returns only once every socket is bound, with the real addresses,
//! so tests can start it on `127.0.0.1:0`. The returned [`Running`] is the
//! handle to reload, to begin a graceful shutdown and to wait for the end.
//! [`Control`] is the control plane behind it: reloads (`reload.rs`), DNS
//! discovery updates (`discovery.rs`) and the listeners' lifecycle
//! (`listeners.rs`) all go through its one lock, so they never interleave;
//! the data path never takes it. `watch.rs` watches the config file,
//! `signals.rs` handles SIGHUP and SIGTERM, and `workers.rs` starts the
//! worker threads, each with its own event loop and its own accept loop for
//! every listener.

pub mod busy_poll;
pub mod discovery;
mod listeners;
pub mod reload;
pub mod signals;
mod watch;
pub mod workers;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::admin::metrics::Metrics;
use crate::config::{Config, ListenerConfig, ListenerProtocol};
use crate::proxy::listener::{self, BoundListener, ListenSocket, ListenerControl};
use crate::state::Shared;
use discovery::Discovery;
pub use listeners::BindFailure;
use listeners::{RunningListener, Source};
pub use reload::ReloadError;
use workers::Workers;

/// How long a shutdown waits for the access log to be written out.
const ACCESS_LOG_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Why Sluice could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bind(#[from] BindFailure),
    #[error("cannot start the worker threads")]
    Workers(#[source] std::io::Error),
}

/// A running Sluice.
pub struct Running {
    pub admin: SocketAddr,
    control: Arc<Control>,
    begin_shutdown: CancellationToken,
    done: JoinHandle<()>,
    /// Stopped when this handle goes (after [`Running::wait`], at the end).
    _workers: Workers,
}

impl Running {
    /// The shared state (snapshot, registry, metrics).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.control.shared
    }

    /// The control plane: reloads and the listeners' lifecycle.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Listener names and bound addresses, in config order, as of the last
    /// reload.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.control.listeners()
    }

    /// Address of the listener called `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.control
            .listeners()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// Reloads the config file, as SIGHUP does.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        self.control.reload().await
    }

    /// Applies an already validated config, as a reload would.
    pub async fn apply(&self, config: Config) -> Result<(), ReloadError> {
        self.control.apply(config).await
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

/// The control plane of a running Sluice. Reloads, discovery updates and
/// the start of shutdown take `inner`'s lock, one at a time.
pub struct Control {
    shared: Arc<Shared>,
    inner: tokio::sync::Mutex<Inner>,
    /// Listener names and bound addresses, for synchronous readers.
    addresses: std::sync::Mutex<Vec<(String, SocketAddr)>>,
    /// One runtime handle per worker: each listener accepts on all of them.
    workers: Vec<Handle>,
    /// Every connection task, of current and of removed listeners alike, so
    /// shutdown waits for them all.
    connections: TaskTracker,
    accept_tasks: TaskTracker,
    /// Parents of every listener's tokens.
    stop_accepting: CancellationToken,
    close_connections: CancellationToken,
    /// Parent of the file watcher and the discovery tasks.
    background: CancellationToken,
    me: Weak<Control>,
}

/// What only one reload (or discovery update) at a time may touch.
struct Inner {
    listeners: Vec<RunningListener>,
    discovery: Discovery,
    /// Hash of the file text last tried, good or bad, so the watcher does
    /// not try the same text twice.
    last_tried: Option<String>,
    /// Set when shutdown begins: no reload after that.
    closed: bool,
}

impl Control {
    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Listener names and bound addresses, in config order.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tasks alive on every worker's runtime (worker 0's is the caller's
    /// runtime, with whatever else it runs).
    pub fn alive_tasks(&self) -> usize {
        self.workers
            .iter()
            .map(|h| h.metrics().num_alive_tasks())
            .sum()
    }

    /// How many DNS discovery tasks run (one per discovering upstream).
    pub async fn discovery_tasks(&self) -> usize {
        self.inner.lock().await.discovery.len()
    }

    /// Starts the accept loops (one per worker) of listener `index` of the
    /// current snapshot.
    fn start_listener(
        &self,
        index: usize,
        config: &ListenerConfig,
        socket: Arc<ListenSocket>,
        addr: SocketAddr,
        active: Arc<AtomicUsize>,
    ) -> RunningListener {
        let http = config.protocol == ListenerProtocol::Http;
        if let Err(err) = socket.set_delayed_ack(http) {
            tracing::debug!(listener = %config.name, error = %err, "cannot set the ACK mode");
        }
        let running = RunningListener {
            config: config.clone(),
            addr,
            socket: Arc::clone(&socket),
            active: Arc::clone(&active),
            stop_accepting: self.stop_accepting.child_token(),
            close_connections: self.close_connections.child_token(),
        };
        let bound = BoundListener {
            index,
            name: Arc::from(config.name.as_str()),
            config: config.clone(),
            socket,
            active,
        };
        let control = ListenerControl {
            stop_accepting: running.stop_accepting.clone(),
            close_connections: running.close_connections.clone(),
            tracker: self.connections.clone(),
        };
        listener::start(
            &self.shared,
            bound,
            &control,
            &self.workers,
            &self.accept_tasks,
        );
        running
    }

    fn publish_addresses(&self, listeners: &[RunningListener]) {
        let list = listeners
            .iter()
            .map(|l| (l.config.name.clone(), l.addr))
            .collect();
        *self.addresses.lock().unwrap_or_else(|e| e.into_inner()) = list;
    }

    /// Begins shutdown: no reload or discovery update after this, the
    /// background tasks stop and every listener stops accepting.
    async fn close(&self) {
        let mut inner = self.inner.lock().await;
        inner.closed = true;
        inner.discovery.stop();
        self.background.cancel();
        // The accept loops then hold the last handles to their sockets, so
        // each socket is shut right after its loop has taken what the
        // kernel had queued: with SO_REUSEPORT, connections the kernel
        // queues on a socket that stays open unaccepted are reset when it
        // finally closes instead of going to the process taking over. The
        // handles go before the loops are told to stop, since a loop on
        // another worker may look at once.
        inner.listeners.clear();
        self.stop_accepting.cancel();
        self.accept_tasks.close();
    }
}

/// Binds every listener and the admin socket, then serves in background
/// tasks until [`Running::shutdown`]. Discovering upstreams are resolved
/// once before it returns.
pub async fn run(mut config: Config) -> Result<Running, RunError> {
    let metrics = Metrics::new();
    let admin_addr = config.admin.listen;

    let admin_failure = |source| BindFailure {
        name: "admin".into(),
        addr: admin_addr,
        source,
    };
    let admin_socket = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(admin_failure)?;
    let admin = admin_socket.local_addr().map_err(admin_failure)?;
    let workers =
        Workers::start(workers::resolve(config.runtime.workers)).map_err(RunError::Workers)?;
    if !config.runtime.busy_poll.is_zero() {
        let runtime = &config.runtime;
        workers.busy_poll(runtime.busy_poll, runtime.busy_poll_interval);
    }
    let plan = listeners::plan(&[], &config.listeners, workers.len()).await?;

    let mut discovery = Discovery::default();
    discovery.fill(&mut config, None, &metrics).await;
    let watched = config.source.path.clone();
    let hash = config.source.hash.clone();
    let shared = Arc::new(Shared::new(config, metrics));
    shared.metrics.config_loaded(true, unix_now());
    let snapshot = shared.snapshot.load_full();
    shared.health.reconcile(&snapshot);

    let control = Arc::new_cyclic(|me| Control {
        shared: Arc::clone(&shared),
        inner: tokio::sync::Mutex::new(Inner {
            listeners: Vec::new(),
            discovery: Discovery::default(),
            last_tried: Some(hash),
            closed: false,
        }),
        addresses: std::sync::Mutex::new(Vec::new()),
        workers: workers.handles().to_vec(),
        connections: TaskTracker::new(),
        accept_tasks: TaskTracker::new(),
        stop_accepting: CancellationToken::new(),
        close_connections: CancellationToken::new(),
        background: CancellationToken::new(),
        me: Weak::clone(me),
    });
    {
        let mut inner = control.inner.lock().await;
        for (index, (config, source)) in snapshot
            .config
            .listeners
            .iter()
            .zip(plan.sources)
            .enumerate()
        {
            if let Source::Start {
                socket,
                addr,
                active,
                ..
            } = source
            {
                let running = control.start_listener(index, config, socket, addr, active);
                inner.listeners.push(running);
            }
        }
        control.publish_addresses(&inner.listeners);
        inner.discovery = discovery;
        inner.discovery.reconcile(
            &snapshot.config,
            &control.me,
            &shared.metrics,
            &control.background,
        );
    }

    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::server::serve(
        Arc::clone(&shared),
        admin_socket,
        admin_stop.clone(),
    ));
    if watched.is_file() {
        if let Err(err) = watch::spawn(&control, &watched, control.background.child_token()) {
            tracing::warn!(path = %watched.display(), error = %err, "cannot watch the config file; SIGHUP still reloads it");
        }
    }
    shared.set_ready();

    let begin_shutdown = CancellationToken::new();
    let done = {
        let control = Arc::clone(&control);
        let begin = begin_shutdown.clone();
        tokio::spawn(async move {
            begin.cancelled().await;
            let shared = &control.shared;
            // The settings of the config running now, reloads included.
            let shutdown = shared.snapshot.load().config.shutdown.clone();
            shared.set_draining();
            tracing::info!(drain_delay = ?shutdown.drain_delay, grace = ?shutdown.grace, "shutdown started: draining");
            tokio::time::sleep(shutdown.drain_delay).await;
            control.close().await;
            control.accept_tasks.wait().await;
            control.close_connections.cancel();
            control.connections.close();
            let finished = tokio::time::timeout(shutdown.grace, control.connections.wait()).await;
            match finished {
                Ok(()) => tracing::info!("shutdown complete: every connection finished"),
                Err(_) => tracing::warn!(
                    open = control.connections.len(),
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
        admin,
        control,
        begin_shutdown,
        done,
        _workers: workers,
    })
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
