//! Active health checks: one probe task per backend, on its interval with
//! jitter, flipping the backend's health after enough consecutive results.
//!
//! The tasks belong to a [`HealthChecks`] handle in the shared state, keyed
//! by backend identity: each new snapshot (a reload or a discovery update)
//! is reconciled against them, so unchanged backends keep their task, and a
//! reload never leaves a duplicate or orphaned checker. Health itself lives
//! in the backend's long-lived state, so it survives reloads.
//!
//! An upstream with `tls` is checked over TLS (same verification, SNI and
//! client certificate as its traffic, taken from the backend's current
//! client at each probe, so a reload that changes `tls` applies at once):
//! an http check is a GET over HTTP/2 when ALPN picks `h2`, else over
//! HTTP/1.1, and a backend whose certificate is refused fails it. A tcp
//! check stays a plain TCP connect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{HealthCheckConfig, HealthCheckKind};
use crate::state::Snapshot;
use crate::upstream::backend::{BackendKey, BackendState};

/// Consecutive results of one backend's checks and its current verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    up: bool,
    successes: u32,
    failures: u32,
}

impl Thresholds {
    /// Starts in state `up`.
    pub fn new(up: bool) -> Self {
        Thresholds {
            up,
            successes: 0,
            failures: 0,
        }
    }

    /// Counts one check; returns the new state when it flips.
    pub fn record(&mut self, ok: bool, healthy: u32, unhealthy: u32) -> Option<bool> {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if !self.up && self.successes >= healthy {
                self.up = true;
                return Some(true);
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.up && self.failures >= unhealthy {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// The running health-check tasks, one per checked backend of the current
/// snapshot.
#[derive(Default)]
pub struct HealthChecks {
    checkers: Mutex<HashMap<BackendKey, Checker>>,
}

/// One backend's probe task; dropping it stops the task.
struct Checker {
    backend: Arc<BackendState>,
    check: HealthCheckConfig,
    _stop: DropGuard,
}

impl HealthChecks {
    /// Makes the running checkers match `snapshot`: a backend whose state
    /// and check settings are unchanged keeps its task (and its count of
    /// consecutive results); removed backends' tasks stop; new or changed
    /// ones start. Never two tasks for one backend. Needs a tokio runtime.
    pub fn reconcile(&self, snapshot: &Snapshot) {
        let mut checkers = self.checkers.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::with_capacity(checkers.len());
        for upstream in &snapshot.upstreams {
            if upstream.config.health_check.is_none() && checkers.is_empty() {
                // Nothing to start, and nothing of its to stop.
                continue;
            }
            for backend in &upstream.backends {
                let old = checkers.remove(&backend.key);
                let Some(check) = &upstream.config.health_check else {
                    if old.is_some() {
                        // Checks removed by a reload: nothing holds it down now.
                        backend.set_healthy(true);
                    }
                    continue;
                };
                let checker = match old {
                    Some(c) if Arc::ptr_eq(&c.backend, backend) && c.check == *check => c,
                    _ => {
                        let stop = CancellationToken::new();
                        tokio::spawn(run(Arc::clone(backend), check.clone(), stop.clone()));
                        Checker {
                            backend: Arc::clone(backend),
                            check: check.clone(),
                            _stop: stop.drop_guard(),
                        }
                    }
                };
                next.insert(backend.key.clone(), checker);
            }
        }
        // What is left belongs to removed backends: dropping stops them.
        *checkers = next;
    }

    /// How many checker tasks run.
    pub fn len(&self) -> usize {
        self.checkers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no checker runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every checker.
    pub fn stop(&self) {
        self.checkers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Checks one backend until cancelled.
async fn run(backend: Arc<BackendState>, check: HealthCheckConfig, stop: CancellationToken) {
    let mut state = Thresholds::new(backend.is_healthy());
    loop {
        // Up to 10% early or late, so checks of many backends spread out.
        let jitter = 0.9 + fastrand::f64() * 0.2;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(check.interval.mul_f64(jitter)) => {}
        }
        let ok = tokio::select! {
            _ = stop.cancelled() => return,
            ok = probe(&backend, &check) => ok,
        };
        backend.record_health_check(ok);
        if let Some(up) = state.record(ok, check.healthy_threshold, check.unhealthy_threshold) {
            backend.set_healthy(up);
            if up {
                tracing::info!(backend = %backend.key, "backend is up: health checks pass");
            } else {
                tracing::warn!(backend = %backend.key, "backend is down: health checks fail");
            }
        }
    }
}

/// One probe within `check.timeout`.
async fn probe(backend: &BackendState, check: &HealthCheckConfig) -> bool {
    let tls = backend.client().tls().cloned();
    let attempt = async {
        let stream = TcpStream::connect(backend.addr).await.ok()?;
        let HealthCheckKind::Http {
            path,
            host,
            expect_status,
        } = &check.kind
        else {
            return Some(true);
        };
        let host = host.as_deref().unwrap_or(backend.authority.as_str());
        let status = match tls {
            None => http1_status(TokioIo::new(stream), path, host).await?,
            Some(tls) => {
                let stream = tls.connect(stream).await.ok()?;
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    h2_status(TokioIo::new(stream), path, host).await?
                } else {
                    http1_status(TokioIo::new(stream), path, host).await?
                }
            }
        };
        Some((expect_status.0..=expect_status.1).contains(&status))
    };
    matches!(
        tokio::time::timeout(check.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// The status of `GET path` over HTTP/1.1 on `io`.
async fn http1_status<T>(io: T, path: &str, host: &str) -> Option<u16>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
    let driver = tokio::spawn(conn);
    let request = check_request(path, host, true)?;
    let response = sender.send_request(request).await.ok();
    driver.abort();
    Some(response?.status().as_u16())
}

/// The status of `GET path` over HTTP/2 on `io`.
async fn h2_status<T>(io: T, path: &str, host: &str) -> Option<u16>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .ok()?;
    let driver = tokio::spawn(conn);
    let request = check_request(path, host, false)?;
    let response = sender.send_request(request).await.ok();
    driver.abort();
    Some(response?.status().as_u16())
}

/// `GET path` for `host`: over HTTP/1.1 with a Host header and
/// `connection: close`, over HTTP/2 (always TLS here) with the host as the
/// `:authority`.
fn check_request(path: &str, host: &str, http1: bool) -> Option<http::Request<Empty<Bytes>>> {
    let request = if http1 {
        http::Request::get(path)
            .header(http::header::HOST, host)
            .header(http::header::CONNECTION, "close")
    } else {
        http::Request::get(format!("https://{host}{path}"))
    };
    request
        .header(http::header::USER_AGENT, "sluice-health-check")
        .body(Empty::<Bytes>::new())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_down_after_unhealthy_threshold_and_up_after_healthy_threshold() {
        let mut t = Thresholds::new(true);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), Some(false));
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), Some(true));
        assert_eq!(t.record(true, 2, 3), None);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut t = Thresholds::new(true);
        for _ in 0..10 {
            assert_eq!(t.record(false, 2, 3), None);
            assert_eq!(t.record(false, 2, 3), None);
            assert_eq!(t.record(true, 2, 3), None);
        }
    }
}
