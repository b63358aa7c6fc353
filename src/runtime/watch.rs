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

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Control;

/// Quiet time after the last event before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// The name a Kubernetes ConfigMap volume swaps to publish new contents.
const CONFIGMAP_DATA: &str = "..data";

/// Starts watching `path` until `stop` is cancelled.
pub(super) fn spawn(
    control: &Arc<Control>,
    path: &Path,
    stop: CancellationToken,
) -> Result<(), notify::Error> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(OsString::from)
        .ok_or_else(|| notify::Error::generic("the config path names no file"))?;
    let changed = Arc::new(Notify::new());
    let mut watcher = {
        let changed = Arc::clone(&changed);
        notify::recommended_watcher(move |event: notify::Result<Event>| match event {
            Ok(event) if is_relevant(&event, &name) => changed.notify_one(),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "config file watch failed"),
        })?
    };
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(path = %path.display(), "watching the config file for changes");
    let control = Arc::downgrade(control);
    tokio::spawn(async move {
        // The watch lasts as long as this task.
        let _watcher = watcher;
        run(control, changed, stop).await;
    });
    Ok(())
}

async fn run(control: Weak<Control>, changed: Arc<Notify>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.notified() => {}
        }
        // Wait for the burst of events of one change to end.
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed.notified() => continue,
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

/// Whether `event` may have changed the file called `name`: any change to
/// that name or to a ConfigMap's `..data`, but not mere reads (Sluice's own
/// among them).
fn is_relevant(event: &Event, name: &OsString) -> bool {
    let kind = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    kind && event.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| n == name.as_os_str() || n == CONFIGMAP_DATA)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn changes_to_the_file_or_to_configmap_data_count_and_reads_do_not() {
        let name = OsString::from("sluice.toml");
        let relevant = [
            event(
                EventKind::Modify(ModifyKind::Any),
                "/etc/sluice/sluice.toml",
            ),
            event(
                EventKind::Create(CreateKind::File),
                "/etc/sluice/sluice.toml",
            ),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/etc/sluice/..data",
            ),
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/etc/sluice/sluice.toml",
            ),
        ];
        for e in &relevant {
            assert!(is_relevant(e, &name), "{e:?}");
        }
        let ignored = [
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                "/etc/sluice/sluice.toml",
            ),
            event(
                EventKind::Access(AccessKind::Any),
                "/etc/sluice/sluice.toml",
            ),
            event(EventKind::Modify(ModifyKind::Any), "/etc/sluice/other.toml"),
            event(
                EventKind::Create(CreateKind::Folder),
                "/etc/sluice/..2026_01_01_00_00_00.1",
            ),
        ];
        for e in &ignored {
            assert!(!is_relevant(e, &name), "{e:?}");
        }
    }
}
