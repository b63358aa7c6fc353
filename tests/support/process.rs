//! The real `sluice` binary as a child process: started from config text,
//! its `ready` event parsed for the bound addresses, its logs collected,
//! signalled and waited for.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A running `sluice run` process and the addresses from its `ready` event.
pub struct Proc {
    pub child: Child,
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    /// Every stderr line after the ready event.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Every stdout line (the access log).
    pub access: Arc<Mutex<Vec<String>>>,
    /// Holds the config file written by [`Proc::start`].
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts on `config` text, written to a file of its own.
    pub fn start(config: &str) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, config).expect("write config");
        let mut proc = Proc::start_file(&path);
        proc._dir = Some(dir);
        proc
    }

    /// Starts on the config file at `path` (files it names relative to
    /// itself are found beside it).
    pub fn start_file(path: &std::path::Path) -> Proc {
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "run", "--config"])
            .arg(path)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        let access = Arc::new(Mutex::new(Vec::new()));
        let access_sink = Arc::clone(&access);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut lines) = access_sink.lock() {
                    lines.push(line);
                }
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["fields"]["message"] == "ready" {
                            let _ = tx.send(v["fields"].clone());
                            sent = true;
                        }
                    }
                } else if let Ok(mut lines) = sink.lock() {
                    lines.push(line);
                }
            }
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("ready event");
        let listeners = ready["listeners"]
            .as_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().expect("listener address")))
            .collect();
        let admin = ready["admin"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("admin address");
        Proc {
            child,
            listeners,
            admin,
            log,
            access,
            _dir: None,
        }
    }

    /// The first JSON line of `lines` (`log` or `access`) that `want`
    /// accepts, within 10 s.
    pub fn wait_json(
        &self,
        lines: &Arc<Mutex<Vec<String>>>,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = lines.lock().map(|l| l.clone()).unwrap_or_default();
            let found = seen
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| want(v));
            if let Some(v) = found {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no such line in:\n{}",
                seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the access log has `n` lines, and returns them.
    pub fn wait_access(&self, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.access.lock().map(|l| l.clone()).unwrap_or_default();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "wanted {n} access log lines, have {lines:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("listener")
    }

    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        kill(pid, sig).expect("signal delivered");
    }
    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}
