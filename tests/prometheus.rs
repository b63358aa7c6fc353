//! Sluice checked by Prometheus's own tools: `promtool check metrics` on the
//! /metrics of a proxy that served traffic, `promtool check rules` and
//! `promtool test rules` on deploy/prometheus, and a real Prometheus server
//! scraping Sluice on loopback, queried through its HTTP API, which also
//! evaluates every query of the Grafana dashboard.
//!
//! promtool and prometheus come from Debian's `prometheus` package;
//! `.ci/install-tools` installs it. Without them these tests fail (they do
//! not skip) and say so.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Where `.ci/install-tools` gets promtool and prometheus from.
const PROMETHEUS_PACKAGE: &str = "Debian's `prometheus` package";

/// Runs `promtool args...` with `stdin`, returning (exit code, stdout+stderr).
fn promtool(args: &[&str], stdin: &str, dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(tool("promtool", PROMETHEUS_PACKAGE))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A proxy with an http and a tcp listener, one live and one dead backend
/// (health-checked), after some traffic: 5 requests answered 2xx, one 5xx.
struct Served {
    proxy: sluice::runtime::Running,
    live: Backend,
    dead: SocketAddr,
    /// Keeps `dead` refusing: bound, never listening.
    _dead_socket: tokio::net::TcpSocket,
}

async fn served_proxy() -> Served {
    let live = Backend::start("live").await;
    let (dead_socket, dead) = dead_addr();
    let echo = spawn_tcp_echo().await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[listener]]\nname = \"l4\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"echo\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\", \"{dead}\"]\n\
         health_check = {{ kind = \"tcp\", interval = \"50ms\", unhealthy_threshold = 1 }}\n\
         circuit_breaker = {{ consecutive_failures = 5 }}\n\
         retry = {{ attempts = 2 }}\n\
         [[upstream]]\nname = \"echo\"\nbackends = [\"{echo}\"]\n",
        live.addr
    );
    let proxy = start_proxy(&cfg).await;
    wait_backend_up(&proxy, dead, 0.0).await;
    let web = proxy.listener_addr("web").expect("web");
    for _ in 0..5 {
        assert_eq!(get(web, "/").await.status, 200);
    }
    assert_eq!(get(web, "/status/500").await.status, 500);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l4 = proxy.listener_addr("l4").expect("l4");
        let mut s = tokio::net::TcpStream::connect(l4).await.expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.expect("echo");
    }
    Served {
        proxy,
        live,
        dead,
        _dead_socket: dead_socket,
    }
}

#[tokio::test]
async fn promtool_accepts_the_metrics_of_a_proxy_that_served_traffic() {
    let served = served_proxy().await;
    let text = admin_get(&served.proxy, "/metrics").await.body;
    let (code, out) = promtool(&["check", "metrics"], &text, Path::new(ROOT));
    // promtool exits 1 on a parse or format error and 3 when it only has
    // lint findings; Sluice should have neither.
    assert_eq!(
        code,
        Some(0),
        "promtool check metrics:\n{out}\n--- input:\n{text}"
    );
}

#[test]
fn promtool_accepts_the_alert_rules_and_their_unit_tests_pass() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    let (code, out) = promtool(&["check", "rules", "alerts.yml"], "", &dir);
    assert_eq!(code, Some(0), "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let (code, out) = promtool(&["test", "rules", "alerts.test.yml"], "", &dir);
    assert_eq!(code, Some(0), "promtool test rules:\n{out}");
}

/// The metric names a PromQL text refers to (`sluice_*` and `process_*`).
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &promql[i..];
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (rest.starts_with("sluice_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..len].to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

/// Every `expr` of every panel (rows' panels included) and every templating
/// query of the dashboard.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<String>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_owned());
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn load_dashboard() -> serde_json::Value {
    let path = Path::new(ROOT).join("deploy/grafana/sluice.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/sluice.json");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

#[tokio::test]
async fn the_dashboard_and_alerts_use_only_metrics_sluice_exports() {
    let dashboard = load_dashboard();
    assert_eq!(dashboard["schemaVersion"], 39);
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let queries = dashboard_queries(&dashboard);
    let titles: BTreeSet<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Request rate",
        "Error ratio (5xx)",
        "Latency p50 / p99",
        "Backend health",
        "Circuit state",
        "Retries",
        "Shed load",
    ] {
        assert!(titles.contains(want), "no panel {want:?}: {titles:?}");
    }
    let alerts = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");

    let served = served_proxy().await;
    let text = admin_get(&served.proxy, "/metrics").await.body;
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let mut used = BTreeSet::new();
    for q in &queries {
        used.extend(metric_names(q));
    }
    used.extend(metric_names(&alerts));
    assert!(used.len() > 10, "{used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");
}

/// A Prometheus server on loopback, killed on drop.
struct PromServer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for PromServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PromServer {
    /// Starts Prometheus scraping `target` every second, with the
    /// recommended alert rules loaded.
    fn start(target: SocketAddr) -> PromServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let rules = Path::new(ROOT).join("deploy/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let addr = free_addr();
        let child = Command::new(tool("prometheus", PROMETHEUS_PACKAGE))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn prometheus");
        PromServer {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until /-/ready answers 200.
    async fn wait_ready(&mut self, deadline: Instant) {
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{}", self.log());
            }
            if let Some(200) = try_get(self.addr, "/-/ready").await.map(|(s, _)| s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never became ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query through the HTTP API.
    async fn query(&self, promql: &str) -> serde_json::Value {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let (status, body) = try_get(self.addr, &path)
            .await
            .unwrap_or_else(|| panic!("prometheus did not answer {path}"));
        let value: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("query {promql}: {e}: {body}"));
        assert_eq!(status, 200, "query {promql}: {body}");
        assert_eq!(value["status"], "success", "query {promql}: {body}");
        value
    }
}

/// A GET that returns `None` when the connection fails (the server may not
/// be up yet).
async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(empty())
        .ok()?;
    let resp = h1_client().request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The (labels, value) pairs of an instant vector result.
fn vector(result: &serde_json::Value) -> Vec<(serde_json::Value, String)> {
    result["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["metric"].clone(),
                r["value"][1].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_sluice_and_answers_queries() {
    let served = served_proxy().await;
    let mut prom = PromServer::start(served.proxy.admin);
    let deadline = Instant::now() + Duration::from_secs(30);
    prom.wait_ready(deadline).await;
    let instance = served.proxy.admin.to_string();

    // The 2xx count of the traffic above, once a scrape has landed.
    let requests = loop {
        let result = prom
            .query("sluice_http_requests_total{listener=\"web\",upstream=\"app\",code=\"2xx\"}")
            .await;
        let found = vector(&result);
        if found.iter().any(|(_, v)| v == "5") {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no scraped sluice_http_requests_total = 5: {result}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (labels, _) = &requests[0];
    assert_eq!(labels["job"], "sluice");
    assert_eq!(labels["instance"], instance.as_str());
    assert_eq!(labels["__name__"], "sluice_http_requests_total");

    let up = vector(&prom.query("sluice_backend_up{upstream=\"app\"}").await);
    let by_backend: std::collections::BTreeMap<String, String> = up
        .iter()
        .map(|(l, v)| (l["backend"].as_str().unwrap_or("").to_owned(), v.clone()))
        .collect();
    assert_eq!(
        by_backend
            .get(&served.live.addr.to_string())
            .map(String::as_str),
        Some("1"),
        "{up:?}"
    );
    assert_eq!(
        by_backend.get(&served.dead.to_string()).map(String::as_str),
        Some("0"),
        "{up:?}"
    );
    let five_xx = vector(
        &prom
            .query("sum(sluice_http_requests_total{upstream=\"app\",code=\"5xx\"})")
            .await,
    );
    assert_eq!(five_xx.first().map(|(_, v)| v.as_str()), Some("1"));

    // Every dashboard query parses and evaluates on real data (Grafana's
    // variables replaced as it would for "All").
    for q in dashboard_queries(&load_dashboard()) {
        let q = q
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$upstream", ".*");
        prom.query(&q).await;
    }
    // The alert rules loaded, and with a backend down for less than their
    // `for`, the backend-down alert is pending or (later) firing.
    let rules = try_get(prom.addr, "/api/v1/rules")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(rules.contains("SluiceBackendDown"), "{rules}");
    let alerts = loop {
        let alerts = vector(&prom.query("ALERTS{alertname=\"SluiceBackendDown\"}").await);
        if !alerts.is_empty() {
            break alerts;
        }
        assert!(Instant::now() < deadline, "SluiceBackendDown never pending");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alerts[0].0["backend"], served.dead.to_string().as_str());
}
