//! The running listeners and how a new config's listeners map onto them.
//!
//! A reload first makes a [`ListenerPlan`]: each new listener either keeps
//! its running accept loop (same name, address and accept settings), takes
//! over a running socket with a new accept loop (same address, new
//! settings; or the address of a listener that is going away), or binds a
//! new socket. Every bind happens while planning, so a reload that cannot
//! bind fails before anything changed. Committing the plan then starts and
//! stops accept loops; connections of a stopped loop finish their in-flight
//! work, and those of a removed or moved listener close once idle.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::proxy::listener::{listen_shared, ListenSocket};

/// One running listener: its accept loops (one per worker) and its sockets.
pub(super) struct RunningListener {
    pub config: ListenerConfig,
    /// The address actually bound.
    pub addr: SocketAddr,
    pub socket: Arc<ListenSocket>,
    /// Open connections, across hand-overs to a new accept loop.
    pub active: Arc<AtomicUsize>,
    /// Cancelled to stop this listener's accept loops.
    pub stop_accepting: CancellationToken,
    /// Cancelled to close this listener's connections once idle.
    pub close_connections: CancellationToken,
}

impl RunningListener {
    /// Stops accepting; with `close`, its connections also close once
    /// their request in progress is answered. Its handle to the socket
    /// group goes first: each accept loop tells from the handles left
    /// whether the group closes with the loops (then each empties and shuts
    /// its socket) or lives on in a successor's loops.
    pub fn stop(self, close: bool) {
        tracing::info!(listener = %self.config.name, addr = %self.addr, "listener stopped; its connections finish their requests");
        let RunningListener {
            socket,
            stop_accepting,
            close_connections,
            ..
        } = self;
        drop(socket);
        stop_accepting.cancel();
        if close {
            close_connections.cancel();
        }
    }
}

/// What becomes of one listener of the new config.
pub(super) enum Source {
    /// Its accept loop goes on untouched (index into the old list).
    Keep(usize),
    /// A new accept loop on this socket.
    Start {
        socket: Arc<ListenSocket>,
        addr: SocketAddr,
        active: Arc<AtomicUsize>,
        /// The old listener whose loop this replaces, if any, and whether
        /// that one's connections should close once idle.
        replaces: Option<(usize, bool)>,
    },
}

/// How the new config's listeners map onto the running ones.
pub(super) struct ListenerPlan {
    /// One per new listener, in config order.
    pub sources: Vec<Source>,
    /// Old listeners that end: index, and whether their connections close
    /// once idle (removed or moved: yes; same socket, new settings: no).
    pub stopped: Vec<(usize, bool)>,
}

/// A listener (or the admin) address that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind listener {name} on {addr}")]
pub struct BindFailure {
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Maps `new` onto `old`, binding every address that needs it (a group of
/// `members` sockets, one per worker). On a bind failure the sockets bound
/// so far close and nothing else has changed.
pub(super) async fn plan(
    old: &[RunningListener],
    new: &[ListenerConfig],
    members: usize,
) -> Result<ListenerPlan, BindFailure> {
    let mut claimed = vec![false; old.len()];
    let mut sources: Vec<Option<Source>> = Vec::with_capacity(new.len());
    // Same name and address: the socket stays.
    for l in new {
        let same = old
            .iter()
            .position(|o| o.config.name == l.name && o.config.listen == l.listen);
        let source = same.map(|i| {
            claimed[i] = true;
            if old[i].config.accepts_like(l) {
                Source::Keep(i)
            } else {
                Source::Start {
                    socket: Arc::clone(&old[i].socket),
                    addr: old[i].addr,
                    active: Arc::clone(&old[i].active),
                    replaces: Some((i, false)),
                }
            }
        });
        sources.push(source);
    }
    // The rest: a socket another listener leaves behind at exactly this
    // address (a rename, or two listeners trading addresses), else a bind.
    // Port 0 asks for a fresh port, so it never matches.
    for (l, source) in new.iter().zip(sources.iter_mut()) {
        if source.is_some() {
            continue;
        }
        let free = (0..old.len())
            .find(|&i| !claimed[i] && l.listen.port() != 0 && old[i].config.listen == l.listen);
        let (socket, addr) = match free {
            Some(i) => {
                claimed[i] = true;
                (Arc::clone(&old[i].socket), old[i].addr)
            }
            None => {
                let bind = |source| BindFailure {
                    name: l.name.clone(),
                    addr: l.listen,
                    source,
                };
                let socket = listen_shared(l.listen, members).map_err(bind)?;
                let addr = socket.local_addr().map_err(bind)?;
                (Arc::new(socket), addr)
            }
        };
        let replaces = old
            .iter()
            .position(|o| o.config.name == l.name)
            .map(|i| (i, true));
        *source = Some(Source::Start {
            socket,
            addr,
            active: Arc::new(AtomicUsize::new(0)),
            replaces,
        });
    }
    let sources: Vec<Source> = sources.into_iter().flatten().collect();
    let mut stopped = Vec::new();
    for i in 0..old.len() {
        let kept = sources
            .iter()
            .any(|s| matches!(s, Source::Keep(k) if *k == i));
        if kept {
            continue;
        }
        let replaced = sources.iter().find_map(|s| match s {
            Source::Start {
                replaces: Some((r, close)),
                ..
            } if *r == i => Some(*close),
            _ => None,
        });
        // Not in the new config at all: removed, its connections close.
        stopped.push((i, replaced.unwrap_or(true)));
    }
    Ok(ListenerPlan { sources, stopped })
}
