//! `pick` per balancer at 3, 100 and 10,000 backends, routing a request to
//! its upstream, and config parsing.

use std::hint::black_box;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice::admin::metrics::Metrics;
use sluice::balance::{self, Balancer, ConsistentHash};
use sluice::config::{BalancerKind, DEFAULT_VNODES};
use sluice::proxy::route::Router;
use sluice::upstream::backend::{BackendKey, BackendState};
use sluice::upstream::client::ClientSettings;

fn backends(n: usize, metrics: &Metrics) -> Vec<Arc<BackendState>> {
    (0..n)
        .map(|i| {
            let addr = format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255);
            let key = BackendKey {
                upstream: Arc::from("bench"),
                address: Arc::from(addr.as_str()),
            };
            let sock = addr.parse().expect("valid address");
            Arc::new(BackendState::new(
                key,
                sock,
                metrics.backend("bench", &addr),
                ClientSettings::default(),
            ))
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("pick");
    for n in [3usize, 100, 10_000] {
        let list = backends(n, &metrics);
        let addresses: Vec<&str> = list.iter().map(|b| &*b.key.address).collect();
        let ring = BalancerKind::ConsistentHash {
            vnodes: DEFAULT_VNODES,
            bounded_load: 0.0,
        };
        let bounded = BalancerKind::ConsistentHash {
            vnodes: DEFAULT_VNODES,
            bounded_load: 1.25,
        };
        for (name, kind, weights) in [
            ("round_robin", BalancerKind::RoundRobin, vec![1u32; n]),
            (
                "round_robin_weighted",
                BalancerKind::RoundRobin,
                (0..n).map(|i| 1 + (i % 5) as u32).collect(),
            ),
            ("least_conn", BalancerKind::LeastConn, vec![1u32; n]),
            ("p2c", BalancerKind::P2c, vec![1u32; n]),
            ("random", BalancerKind::Random, vec![1u32; n]),
            ("consistent_hash", ring, vec![1u32; n]),
            ("consistent_hash_bounded", bounded, vec![1u32; n]),
        ] {
            // As in an upstream: bounded load reads the upstream's in-flight
            // total, here one request (the one being placed).
            let total = Arc::new(AtomicUsize::new(1));
            let balancer: Box<dyn Balancer> =
                balance::build(kind, &weights, &addresses, 42, Some(total));
            let mut key = 0u64;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    key = key.wrapping_add(1);
                    black_box(balancer.pick(&list, black_box(Some(key)), &|_| true))
                })
            });
        }
    }
    group.finish();
}

fn ring_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring_build");
    group.sample_size(10);
    for n in [3usize, 100, 10_000] {
        let addresses: Vec<String> = (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i >> 8, i & 255))
            .collect();
        let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
        let weights = vec![1u32; n];
        group.bench_with_input(BenchmarkId::new("consistent_hash", n), &n, |b, _| {
            b.iter(|| {
                black_box(ConsistentHash::new(
                    black_box(&addresses),
                    &weights,
                    DEFAULT_VNODES,
                    0.0,
                    1,
                ))
            })
        });
    }
    group.finish();
}

fn config_parse(c: &mut Criterion) {
    let text = include_str!("../config/sluice.toml");
    c.bench_function("config_parse_and_validate_example", |b| {
        b.iter(|| black_box(sluice::config::from_str(black_box(text), "sluice.toml")))
    });
}

/// A config whose one listener has `routes` (TOML `[[listener.route]]`
/// tables) over the upstreams `api`, `static`, `web` and `default`.
fn config_with_routes(routes: &str) -> sluice::config::Config {
    let upstreams: String = ["api", "static", "web", "default"]
        .iter()
        .map(|u| format!("[[upstream]]\nname = \"{u}\"\nbackends = [\"127.0.0.1:9000\"]\n"))
        .collect();
    let text = format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8080\"\nprotocol = \"http\"\n\
         upstream = \"default\"\n{routes}\n{upstreams}"
    );
    sluice::config::from_str(&text, "bench.toml").expect("a valid config")
}

/// `Router::route` for a request that ends at the last candidate: no routes
/// (the listener's default), path prefixes, and hosts.
fn route(c: &mut Criterion) {
    let request = http::Request::get("/web/index.html")
        .header("host", "www.example.com:8080")
        .body(())
        .expect("valid request")
        .into_parts()
        .0;
    let route = |key: &str, value: &str, upstream: &str| {
        format!("[[listener.route]]\n{key} = \"{value}\"\nupstream = \"{upstream}\"\n")
    };
    let cases = [
        ("no_routes", String::new()),
        (
            "path_prefixes",
            route("path_prefix", "/api/", "api")
                + &route("path_prefix", "/static/", "static")
                + &route("path_prefix", "/web/", "web"),
        ),
        (
            "hosts",
            route("host", "api.example.com", "api")
                + &route("host", "*.cdn.example.com", "static")
                + &route("host", "www.example.com", "web"),
        ),
    ];
    let mut group = c.benchmark_group("route");
    for (name, routes) in cases {
        let config = config_with_routes(&routes);
        let index_of = |n: &str| config.upstreams.iter().position(|u| u.name == n);
        let listener = &config.listeners[0];
        let router = Router::new(&listener.routes, listener.upstream.as_deref(), &index_of);
        let want = index_of(if routes.is_empty() { "default" } else { "web" });
        assert_eq!(router.route(&request), want, "{name}");
        group.bench_function(name, |b| b.iter(|| router.route(black_box(&request))));
    }
    group.finish();
}

criterion_group!(benches, pick, route, ring_build, config_parse);
criterion_main!(benches);
