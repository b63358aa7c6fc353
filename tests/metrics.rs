//! The metric set of SPEC §5 as a running proxy exports it, series that go
//! away with removed backends and upstreams, and /status against its
//! documented schema.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::*;

/// SPEC §5: name, type, label names.
const SPEC_METRICS: &[(&str, &str, &[&str])] = &[
    (
        "sluice_http_requests_total",
        "counter",
        &["listener", "upstream", "code"],
    ),
    (
        "sluice_http_request_duration_seconds",
        "histogram",
        &["listener", "upstream"],
    ),
    (
        "sluice_upstream_requests_total",
        "counter",
        &["upstream", "backend", "outcome"],
    ),
    (
        "sluice_upstream_request_duration_seconds",
        "histogram",
        &["upstream", "backend"],
    ),
    (
        "sluice_upstream_in_flight",
        "gauge",
        &["upstream", "backend"],
    ),
    ("sluice_backend_up", "gauge", &["upstream", "backend"]),
    (
        "sluice_backend_circuit_state",
        "gauge",
        &["upstream", "backend"],
    ),
    (
        "sluice_circuit_transitions_total",
        "counter",
        &["upstream", "backend", "to"],
    ),
    (
        "sluice_health_checks_total",
        "counter",
        &["upstream", "backend", "result"],
    ),
    ("sluice_retries_total", "counter", &["upstream", "reason"]),
    ("sluice_load_shed_total", "counter", &["upstream", "reason"]),
    (
        "sluice_downstream_connections_active",
        "gauge",
        &["listener"],
    ),
    (
        "sluice_downstream_connections_total",
        "counter",
        &["listener", "result"],
    ),
    (
        "sluice_tcp_bytes_total",
        "counter",
        &["listener", "direction"],
    ),
    ("sluice_config_reloads_total", "counter", &["result"]),
    (
        "sluice_config_last_reload_success_timestamp_seconds",
        "gauge",
        &[],
    ),
    ("sluice_build_info", "gauge", &["version"]),
    // Beyond SPEC §5, documented in the README.
    (
        "sluice_downstream_protocol_errors_total",
        "counter",
        &["listener", "kind"],
    ),
    (
        "sluice_tls_certificate_reloads_total",
        "counter",
        &["listener", "result"],
    ),
    ("sluice_config_last_reload_successful", "gauge", &[]),
    ("sluice_access_log_dropped_total", "counter", &[]),
    // The standard process metrics.
    ("process_cpu_seconds_total", "counter", &[]),
    ("process_resident_memory_bytes", "gauge", &[]),
    ("process_open_fds", "gauge", &[]),
    ("process_start_time_seconds", "gauge", &[]),
];

/// `# TYPE` of every family.
fn types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect()
}

/// The label names and values of every sample of `name` (exactly).
fn samples(text: &str, name: &str) -> Vec<BTreeMap<String, String>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if rest.starts_with(' ') {
                return Some(BTreeMap::new());
            }
            let inner = rest.strip_prefix('{')?.split_once('}')?.0;
            Some(
                inner
                    .split("\",")
                    .filter_map(|kv| kv.split_once("=\""))
                    .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
                    .collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_spec_metric_is_exported_with_its_type_and_labels() {
    let a = Backend::start("a").await;
    let echo = spawn_tcp_echo().await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[listener]]\nname = \"l4\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"echo\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n\
         health_check = {{ kind = \"http\", path = \"/\", interval = \"50ms\" }}\n\
         circuit_breaker = {{ consecutive_failures = 5 }}\n\
         [[upstream]]\nname = \"echo\"\nbackends = [\"{echo}\"]\n",
        a.addr
    );
    let proxy = start_proxy(&cfg).await;
    let web = proxy.listener_addr("web").expect("web");
    for path in ["/", "/status/404", "/status/503"] {
        get(web, path).await;
    }
    let text = admin_get(&proxy, "/metrics").await.body;
    let types = types(&text);
    for (name, kind, labels) in SPEC_METRICS {
        assert_eq!(
            types.get(*name).map(String::as_str),
            Some(*kind),
            "type of {name}"
        );
        let sample = if *kind == "histogram" {
            format!("{name}_count")
        } else {
            (*name).to_owned()
        };
        let found = samples(&text, &sample);
        assert!(!found.is_empty(), "no sample of {sample}:\n{text}");
        let want: BTreeSet<&str> = labels.iter().copied().collect();
        for s in &found {
            let got: BTreeSet<&str> = s.keys().map(String::as_str).collect();
            assert_eq!(got, want, "labels of {sample}");
        }
    }
    // Status classes, outcomes, shed reasons and circuit states are the
    // values SPEC §5 names.
    let values = |name: &str, label: &str| -> BTreeSet<String> {
        samples(&text, name)
            .into_iter()
            .filter_map(|mut s| s.remove(label))
            .collect()
    };
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        values("sluice_http_requests_total", "code"),
        set(&["1xx", "2xx", "3xx", "4xx", "5xx"])
    );
    assert_eq!(
        values("sluice_upstream_requests_total", "outcome"),
        set(&["success", "http_5xx", "connect_failure", "reset", "timeout"])
    );
    assert_eq!(
        values("sluice_load_shed_total", "reason"),
        set(&["overloaded", "no_healthy_backend", "circuit_open"])
    );
    assert_eq!(
        values("sluice_circuit_transitions_total", "to"),
        set(&["closed", "half_open", "open"])
    );
    assert_eq!(
        values("sluice_downstream_connections_total", "result"),
        set(&["accepted", "rejected"])
    );
    assert_eq!(
        values("sluice_tcp_bytes_total", "direction"),
        set(&["rx", "tx"])
    );
    assert_eq!(
        values("sluice_config_reloads_total", "result"),
        set(&["success", "failure"])
    );
    let prefix = |code: &str| {
        format!("sluice_http_requests_total{{code=\"{code}\",listener=\"web\",upstream=\"app\"}} ")
    };
    assert_eq!(metric(&text, &prefix("2xx")), Some(1.0));
    assert_eq!(metric(&text, &prefix("4xx")), Some(1.0));
    assert_eq!(metric(&text, &prefix("5xx")), Some(1.0));
    // Buckets from 0.5 ms to 30 s.
    let les = values("sluice_http_request_duration_seconds_bucket", "le");
    assert_eq!(
        les,
        set(&[
            "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
            "1", "2.5", "5", "10", "30", "+Inf"
        ])
    );
}

#[tokio::test]
async fn a_reload_that_removes_a_backend_or_an_upstream_removes_its_series() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = start_proxy(&simple_config(&[&a, &b], "")).await;
    let web = proxy.listener_addr("web").expect("web");
    for _ in 0..4 {
        assert_eq!(get(web, "/").await.status, 200);
    }
    let served = |backend: &Backend| {
        format!(
            "sluice_upstream_requests_total{{backend=\"{}\",outcome=\"success\",upstream=\"app\"}} ",
            backend.addr
        )
    };
    let text = admin_get(&proxy, "/metrics").await.body;
    assert_eq!(metric(&text, &served(&b)), Some(2.0), "{text}");

    let without_b =
        sluice::config::from_str(&simple_config(&[&a], ""), "test.toml").expect("valid config");
    proxy.apply(without_b).await.expect("reload");
    let b_label = format!("backend=\"{}\"", b.addr);
    let text = wait_metrics(&proxy, |m| !m.contains(&b_label)).await;
    // The surviving backend keeps its series and its counts.
    assert_eq!(metric(&text, &served(&a)), Some(2.0), "{text}");
    assert!(text.contains(&format!(
        "sluice_backend_up{{backend=\"{}\",upstream=\"app\"}} 1",
        a.addr
    )));

    // Renaming the upstream takes every series of the old name with it.
    let renamed = simple_config(&[&a], "").replace("\"app\"", "\"main\"");
    let renamed = sluice::config::from_str(&renamed, "test.toml").expect("valid config");
    proxy.apply(renamed).await.expect("reload");
    let text = wait_metrics(&proxy, |m| !m.contains("upstream=\"app\"")).await;
    assert!(
        text.contains(
            "sluice_http_requests_total{code=\"2xx\",listener=\"web\",upstream=\"main\"} 0"
        ),
        "{text}"
    );
    assert!(text.contains("sluice_load_shed_total{reason=\"overloaded\",upstream=\"main\"} 0"));
    assert_eq!(get(web, "/").await.status, 200);
    let text = admin_get(&proxy, "/metrics").await.body;
    assert!(
        text.contains(
            "sluice_http_requests_total{code=\"2xx\",listener=\"web\",upstream=\"main\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn with_every_circuit_open_requests_are_shed_as_circuit_open() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    a.force_status(500);
    b.force_status(500);
    let proxy = start_proxy(&simple_config(
        &[&a, &b],
        "circuit_breaker = { consecutive_failures = 2, open_for = \"1m\" }",
    ))
    .await;
    let web = proxy.listener_addr("web").expect("web");
    for _ in 0..4 {
        assert_eq!(get(web, "/").await.status, 500);
    }
    let answer = get(web, "/").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["sluice-error"], "circuit-open");
    let text = admin_get(&proxy, "/metrics").await.body;
    let shed =
        |reason: &str| format!("sluice_load_shed_total{{reason=\"{reason}\",upstream=\"app\"}} ");
    assert_eq!(metric(&text, &shed("circuit_open")), Some(1.0), "{text}");
    assert_eq!(metric(&text, &shed("no_healthy_backend")), Some(0.0));
    for backend in [&a, &b] {
        let state = format!(
            "sluice_backend_circuit_state{{backend=\"{}\",upstream=\"app\"}} ",
            backend.addr
        );
        assert_eq!(metric(&text, &state), Some(2.0), "{text}");
    }
}

#[tokio::test]
async fn requests_the_codec_refuses_are_counted() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "")).await;
    let web = proxy.listener_addr("web").expect("web");
    let refused = raw_exchange(
        web,
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    let text = admin_get(&proxy, "/metrics").await.body;
    assert_eq!(
        metric(
            &text,
            "sluice_http_requests_total{code=\"4xx\",listener=\"web\",upstream=\"\"} "
        ),
        Some(1.0),
        "{text}"
    );
}

/// Every path of a JSON document: `a.b`, `a[].c` for arrays of objects.
fn paths(value: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(path.clone());
                paths(v, &path, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[tokio::test]
async fn status_matches_its_documented_schema() {
    let a = Backend::start("a").await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbalancer = \"least_conn\"\nbackends = [\"{}\"]\n\
         health_check = {{ kind = \"tcp\", interval = \"50ms\" }}\n\
         circuit_breaker = {{ consecutive_failures = 5 }}\n",
        a.addr
    );
    let proxy = start_proxy(&cfg).await;
    let web = proxy.listener_addr("web").expect("web");
    assert_eq!(get(web, "/").await.status, 200);
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(&proxy, "/status").await.body).expect("json");
    let mut got = BTreeSet::new();
    paths(&status, "", &mut got);

    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/status.md"))
        .expect("docs/status.md");
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(path, _)| path.to_owned())
        .collect();
    assert_eq!(got, documented, "/status and docs/status.md differ");

    let upstream = &status["upstreams"][0];
    assert_eq!(upstream["balancer"], "least_conn");
    assert_eq!(upstream["eligible_backends"], 1);
    let backend = &upstream["backends"][0];
    assert_eq!(backend["address"], a.addr.to_string());
    assert_eq!(backend["health"], "up");
    assert_eq!(backend["circuit"], "closed");
    assert_eq!(backend["eligible"], true);
    assert_eq!(backend["requests_total"], 1);
    assert_eq!(status["listeners"][0]["protocol"], "http");
    assert_eq!(status["ready"], true);
}
