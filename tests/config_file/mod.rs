//! Test support for reloads: a config file in a temp dir that the proxy
//! watches, replaced the way deployment tools do it, and polling helpers.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice::config;
use sluice::runtime::{self, Running};

/// A config file in its own temp dir (removed on drop).
pub struct ConfigFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    /// `sluice.toml` with `text` in a fresh temp dir.
    pub fn new(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, text).expect("write config");
        ConfigFile { dir, path }
    }

    /// Replaces the file atomically (a new file renamed over it), as
    /// deployment tools and many editors do.
    pub fn replace(&self, text: &str) {
        let tmp = self.dir.path().join(".sluice.toml.tmp");
        std::fs::write(&tmp, text).expect("write new config");
        std::fs::rename(&tmp, &self.path).expect("rename over config");
    }

    /// Starts the proxy from the file, as `sluice run --config` does (the
    /// file is watched).
    pub async fn start(&self) -> Running {
        let config = config::load_file(&self.path).unwrap_or_else(|e| panic!("config: {e}"));
        runtime::run(config).await.expect("proxy starts")
    }
}

/// The hash the running config reports for `text`.
pub fn hash_of(text: &str) -> String {
    config::content_hash(text)
}

/// `sluice_config_reloads_total{result}` (the start counts as a success).
pub fn reloads(running: &Running, result: &str) -> f64 {
    let text = running.shared().metrics.encode();
    let prefix = format!("sluice_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `condition` every 10 ms until it holds; panics naming `what`
/// after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the running config is the one with `hash`.
pub async fn wait_config(running: &Running, hash: &str) {
    wait_until(
        Duration::from_secs(10),
        &format!("config {hash} running"),
        || {
            let now = running.shared().snapshot.load().config.source.hash.clone();
            async move { now == hash }
        },
    )
    .await;
}

/// The text of `path`'s parent dir listing, for failure messages.
pub fn listing(path: &Path) -> String {
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}
