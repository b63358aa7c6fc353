//! `pick` per balancer at 3, 100 and 10,000 backends, and config parsing.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice::admin::metrics::Metrics;
use sluice::balance::{self, Balancer};
use sluice::config::BalancerKind;
use sluice::upstream::backend::{BackendKey, BackendState};

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
            ))
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("pick");
    for n in [3usize, 100, 10_000] {
        let list = backends(n, &metrics);
        for (name, kind, weights) in [
            ("round_robin", BalancerKind::RoundRobin, vec![1u32; n]),
            (
                "round_robin_weighted",
                BalancerKind::RoundRobin,
                (0..n).map(|i| 1 + (i % 5) as u32).collect(),
            ),
        ] {
            let balancer: Box<dyn Balancer> = balance::build(kind, &weights);
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| black_box(balancer.pick(&list, black_box(None), &|_| true)))
            });
        }
    }
    group.finish();
}

fn config_parse(c: &mut Criterion) {
    let text = include_str!("../config/sluice.toml");
    c.bench_function("config_parse_and_validate_example", |b| {
        b.iter(|| black_box(sluice::config::from_str(black_box(text), "sluice.toml")))
    });
}

criterion_group!(benches, pick, config_parse);
criterion_main!(benches);
