//! Watching the config file: a change reloads it, like SIGHUP.
//!
//! The watch is on the file's directory, not the file: editors and
//! deployment tools replace files by renaming a new one over them (a new
//! inode that a watch on the old one would never see), and a Kubernetes
//! ConfigMap volume swaps a `..data` symlink to a new directory in one
//! rename. Events on the file's name or on `..data` count; after
//! [`DEBOUNCE`] without another one the file is read, and reloaded only if
//! its text differs from the running config's (and from the last text
//! tried), so one change gives exactly one reload.
//!
//! The directory is watched with inotify for files written and closed,
//! renamed in and created ([`WATCHED`]), not for every write: a busy file
//! beside the config (a log written line by line) would otherwise cost its
//! writer an event per `write(2)` and Sluice a wake-up to read it. A file
//! edited in place counts when it is closed.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::Control;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// The name a Kubernetes ConfigMap volume swaps to publish new contents.
const CONFIGMAP_DATA: &str = "..data";

/// What a change to the config file can look like in its directory.
const WATCHED: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_CREATE);

/// An inotify instance the reactor can wait on.
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Starts watching `path` until `stop` is cancelled.
pub(super) fn spawn(
    control: &Arc<Control>,
    path: &Path,
    stop: CancellationToken,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(OsString::from)
        .ok_or_else(|| io::Error::other("the config path names no file"))?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(&dir, WATCHED)?;
    // `AsyncFd::new` is deprecated for lack of I/O safety; `Watch` owns its
    // descriptor for the whole registration (as `proxy::park` argues), and
    // the safe crate cannot call the `unsafe` replacement.
    #[allow(deprecated)]
    let watch = AsyncFd::new(Watch(inotify))?;
    tracing::info!(path = %path.display(), "watching the config file for changes");
    let control = Arc::downgrade(control);
    tokio::spawn(run(control, watch, name, stop));
    Ok(())
}

async fn run(
    control: Weak<Control>,
    watch: AsyncFd<Watch>,
    name: OsString,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = next_change(&watch, &name) => {
                if let Err(err) = changed {
                    tracing::warn!(error = %err, "config file watch failed; SIGHUP still reloads it");
                    return;
                }
            }
        }
        // Wait for the burst of events of one change to end.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = next_change(&watch, &name) => continue,
                _ = tokio::time::sleep(DEBOUNCE) => break,
            }
        }
        let Some(control) = control.upgrade() else {
            return;
        };
        if control.reload_if_changed().await.is_none() {
            tracing::debug!("config file touched, its text is unchanged");
        }
    }
}

/// Waits for an event that may have changed the file called `name`.
async fn next_change(watch: &AsyncFd<Watch>, name: &OsStr) -> io::Result<()> {
    loop {
        let mut ready = watch.readable().await?;
        match ready.try_io(|w| w.get_ref().0.read_events().map_err(io::Error::from)) {
            Ok(Ok(events)) => {
                if events.iter().any(|e| is_relevant(e, name)) {
                    return Ok(());
                }
            }
            Ok(Err(err)) => return Err(err),
            Err(_would_block) => {}
        }
    }
}

/// Whether `event` may have changed the file called `name`: one on that
/// name or on a ConfigMap's `..data`, or a lost-events overflow.
fn is_relevant(event: &InotifyEvent, name: &OsStr) -> bool {
    event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
        || event
            .name
            .as_deref()
            .is_some_and(|n| n == name || n == CONFIGMAP_DATA)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn drain(inotify: &Inotify) -> Vec<InotifyEvent> {
        let mut all = Vec::new();
        while let Ok(events) = inotify.read_events() {
            all.extend(events);
        }
        all
    }

    /// The watch sees a file written in place, renamed over, and a
    /// ConfigMap's `..data` swap, but no event per write of a busy file
    /// beside it until that file is closed.
    #[test]
    fn changes_count_and_writes_to_other_files_make_no_events() {
        let dir = tempfile::tempdir().unwrap();
        let name = OsStr::new("sluice.toml");
        let config = dir.path().join(name);
        std::fs::write(&config, "a").unwrap();
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        inotify.add_watch(dir.path(), WATCHED).unwrap();

        let mut log = std::fs::File::create(dir.path().join("requests.log")).unwrap();
        drain(&inotify);
        for _ in 0..100 {
            log.write_all(b"a line\n").unwrap();
        }
        assert!(drain(&inotify).is_empty(), "writes made events");
        drop(log);
        let closed = drain(&inotify);
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert!(!is_relevant(&closed[0], name));

        std::fs::write(&config, "b").unwrap();
        assert!(
            drain(&inotify).iter().any(|e| is_relevant(e, name)),
            "edit in place"
        );

        let new = dir.path().join("sluice.toml.new");
        std::fs::write(&new, "c").unwrap();
        drain(&inotify);
        std::fs::rename(&new, &config).unwrap();
        assert!(
            drain(&inotify).iter().any(|e| is_relevant(e, name)),
            "rename over"
        );

        let link = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink("..2026_01_01", &link).unwrap();
        drain(&inotify);
        std::fs::rename(&link, dir.path().join(CONFIGMAP_DATA)).unwrap();
        assert!(
            drain(&inotify).iter().any(|e| is_relevant(e, name)),
            "..data swap"
        );
    }
}
