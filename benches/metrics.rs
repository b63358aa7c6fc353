//! The metric work one HTTP request does on the data path, in ns, to hold
//! against the per-request CPU budget (about 25-30 µs of CPU per proxied
//! request for HAProxy and Sluice on h1-small), and the cost of handing a
//! line to the access log.
//!
//! Per request the data path touches only pre-resolved handles:
//! - `RouteMetrics::record`: one counter (status class) and one histogram
//!   (`sluice_http_request_duration_seconds`);
//! - the backend call's guard: `sluice_upstream_in_flight` up and down, one
//!   outcome counter and one histogram
//!   (`sluice_upstream_request_duration_seconds`).
//!
//! Connection-level metrics (accepted, active) are per connection, not per
//! request, and are left out.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::admin::metrics::{BackendMetrics, Metrics, Outcome, RouteMetrics};
use sluice::config::LogFormat;
use sluice::proxy::access_log::{self, AccessLog, Entry};

/// Exactly the metric calls of one proxied HTTP request.
fn one_request(route: &RouteMetrics, backend: &BackendMetrics, seconds: f64) {
    backend.in_flight.inc();
    backend.in_flight.dec();
    backend.record(Outcome::Success, seconds);
    route.record(200, seconds);
}

fn per_request(c: &mut Criterion) {
    let metrics = Metrics::new();
    let route = metrics.route("web", "app");
    let backend = metrics.backend("app", "10.0.0.1:8080");
    let mut group = c.benchmark_group("metrics");

    group.bench_function("http_request", |b| {
        b.iter(|| one_request(black_box(&route), black_box(&backend), black_box(0.0042)))
    });

    // The same, with the two clock reads and two elapsed() the durations
    // need (the request's and the backend call's).
    group.bench_function("http_request_with_clocks", |b| {
        b.iter(|| {
            let started = tokio::time::Instant::now();
            let call = tokio::time::Instant::now();
            backend.in_flight.inc();
            backend.in_flight.dec();
            backend.record(Outcome::Success, call.elapsed().as_secs_f64());
            route.record(200, started.elapsed().as_secs_f64());
        })
    });

    // Both cores on the same series: the worst case for the shared atomics
    // (every request of one listener/upstream/backend on two workers).
    group.bench_function("http_request_2_threads_same_series", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters {
                            one_request(black_box(&route), black_box(&backend), 0.0042);
                        }
                    });
                }
            });
            // CPU time per request: two threads busy for the elapsed time
            // did `iters` requests each, so 2 x elapsed / (2 x iters).
            start.elapsed()
        })
    });
    group.finish();
}

fn entry() -> Box<Entry> {
    let client: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
    let mut e = Entry::new(
        LogFormat::Json,
        access_log::Kind::Http,
        SystemTime::now(),
        Arc::from("web"),
        client,
    );
    e.method = Some(http::Method::GET);
    e.host = Some("example.com".into());
    e.path = Some("/index.html".into());
    e.status = Some(200);
    e.upstream = Some(Arc::from("app"));
    e.backend = Some(Arc::from("10.0.0.1:8080"));
    e.attempts = 1;
    e.bytes_out = 512;
    e.duration = Duration::from_micros(850);
    Box::new(e)
}

fn access_log(c: &mut Criterion) {
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("access_log");
    // The request's side only: build the entry and queue it (the writer
    // thread formats and writes to a sink that discards).
    let log = AccessLog::new(
        Box::new(std::io::sink()),
        4096,
        metrics.access_log_dropped(),
    );
    group.bench_function("record", |b| b.iter(|| log.record(black_box(entry()))));
    log.close(Duration::from_secs(5));
    // The writer's side: formatting one line.
    let e = entry();
    let mut buf = Vec::with_capacity(512);
    group.bench_function("format_json", |b| {
        b.iter(|| {
            buf.clear();
            access_log::format_entry(black_box(&e), &mut buf);
        })
    });
    group.finish();
}

criterion_group!(benches, per_request, access_log);
criterion_main!(benches);
