//! Balancers end to end: stickiness, removal, and load-aware picking with a
//! slow backend, through the real proxy and real backends.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use sluice::balance::{hash_key, Balancer, ConsistentHash};
use support::*;

fn config(backends: &[&Backend], upstream_extra: &str) -> String {
    simple_config(backends, &format!("max_in_flight = 0\n{upstream_extra}"))
}

async fn get_with(addr: std::net::SocketAddr, header: (&str, &str)) -> Answer {
    let req = Request::get(format!("http://{addr}/"))
        .header(header.0, header.1)
        .body(empty())
        .expect("request");
    send(&h1_client(), req).await
}

#[tokio::test]
async fn sticky_by_header_stays_on_one_backend_and_moves_when_it_is_removed() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let extra = "balancer = \"consistent_hash\"\nhash_key = \"header:x-user\"";
    let proxy = start_proxy(&config(&refs, extra)).await;
    let addr = proxy.listener_addr("web").expect("bound");

    let mut seen = BTreeMap::new();
    for _ in 0..100 {
        let body = get_with(addr, ("x-user", "user-42")).await.body;
        *seen.entry(body).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 1, "one user, one backend: {seen:?}");
    let owner = seen.keys().next().cloned().expect("one backend");

    // Other users spread over the backends.
    let mut users = BTreeMap::new();
    for u in 0..200 {
        let body = get_with(addr, ("x-user", &format!("user-{u}"))).await.body;
        *users.entry(body).or_insert(0) += 1;
    }
    assert_eq!(users.len(), 4, "{users:?}");

    // Remove the owner by reload: the user moves, and sticks to the new one.
    let remaining: Vec<&Backend> = backends.iter().filter(|b| b.name != owner).collect();
    let new = sluice::config::from_str(&config(&remaining, extra), "test.toml").expect("valid");
    proxy.apply(new).await.expect("reloaded");
    let mut after = BTreeMap::new();
    for _ in 0..100 {
        let body = get_with(addr, ("x-user", "user-42")).await.body;
        *after.entry(body).or_insert(0) += 1;
    }
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after.keys().next(), Some(&owner));
}

/// Sends `total` requests from `workers` concurrent clients and returns how
/// many each backend served.
async fn run_load(addr: std::net::SocketAddr, workers: usize, total: usize) {
    let per = total / workers;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            tokio::spawn(async move {
                let client = h1_client();
                for _ in 0..per {
                    let req = Request::get(format!("http://{addr}/"))
                        .body(empty())
                        .expect("request");
                    assert_eq!(send(&client, req).await.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
}

async fn slow_share(balancer: &str) -> f64 {
    let slow = Backend::start_slow("slow", Duration::from_millis(50)).await;
    let f1 = Backend::start("f1").await;
    let f2 = Backend::start("f2").await;
    let proxy = start_proxy(&config(
        &[&slow, &f1, &f2],
        &format!("balancer = \"{balancer}\""),
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("bound");
    run_load(addr, 8, 240).await;
    let total = slow.hits() + f1.hits() + f2.hits();
    assert_eq!(total, 240);
    slow.hits() as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_and_p2c_send_a_slow_backend_clearly_less_than_round_robin() {
    let rr = slow_share("round_robin").await;
    let lc = slow_share("least_conn").await;
    let p2c = slow_share("p2c").await;
    eprintln!(
        "share of 240 requests (8 concurrent clients) sent to the backend slowed by 50 ms: \
         round_robin {:.1}%, least_conn {:.1}%, p2c {:.1}%",
        rr * 100.0,
        lc * 100.0,
        p2c * 100.0
    );
    // Round robin gives every backend a third, whatever its latency.
    assert!((rr - 1.0 / 3.0).abs() < 0.02, "round_robin {rr}");
    assert!(lc < rr / 2.0, "least_conn {lc} vs round_robin {rr}");
    assert!(p2c < rr / 2.0, "p2c {p2c} vs round_robin {rr}");
}

#[tokio::test]
async fn random_and_every_balancer_serve_through_the_proxy() {
    for balancer in [
        "round_robin",
        "least_conn",
        "p2c",
        "consistent_hash",
        "random",
    ] {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let proxy = start_proxy(&config(&[&a, &b], &format!("balancer = \"{balancer}\""))).await;
        let addr = proxy.listener_addr("web").expect("bound");
        for _ in 0..20 {
            assert_eq!(get(addr, "/").await.status, 200, "{balancer}");
        }
        assert_eq!(a.hits() + b.hits(), 20, "{balancer}");
        if balancer != "consistent_hash" {
            // Keyless balancers use both backends over 20 requests.
            assert!(
                a.hits() > 0 && b.hits() > 0,
                "{balancer}: {} / {}",
                a.hits(),
                b.hits()
            );
        }
    }
}

const RING_CHILD: &str = "SLUICE_TEST_RING_CHILD";

/// The backend each of 10,000 keys maps to, printed as `MAP key backend`.
fn print_ring_mapping(reverse: bool) {
    let mut addresses: Vec<String> = (1..=10).map(|i| format!("10.0.0.{i}:8080")).collect();
    if reverse {
        addresses.reverse();
    }
    let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let ring = ConsistentHash::new(&refs, &[1; 10], sluice::config::DEFAULT_VNODES, 0.0, 0);
    let metrics = sluice::admin::metrics::Metrics::new();
    let states: Vec<_> = addresses
        .iter()
        .map(|a| {
            let key = sluice::upstream::backend::BackendKey {
                upstream: Arc::from("u"),
                address: Arc::from(a.as_str()),
            };
            Arc::new(sluice::upstream::backend::BackendState::new(
                key,
                a.parse().expect("address"),
                metrics.backend("u", a),
                sluice::upstream::client::ClientSettings::default(),
            ))
        })
        .collect();
    for k in 0..10_000 {
        let key = format!("user-{k}");
        let i = ring
            .pick(&states, Some(hash_key(key.as_bytes())), &|_| true)
            .expect("a backend");
        println!("MAP {key} {}", addresses[i]);
    }
}

#[test]
fn two_processes_map_ten_thousand_keys_identically() {
    if let Ok(mode) = std::env::var(RING_CHILD) {
        print_ring_mapping(mode == "reverse");
        return;
    }
    let run = |mode: &str| {
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "two_processes_map_ten_thousand_keys_identically",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(RING_CHILD, mode)
            .output()
            .expect("child runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            // libtest may print "test name ... " on the same line first.
            .filter_map(|l| l.find("MAP ").map(|i| l[i..].to_owned()))
            .collect::<Vec<_>>()
    };
    let first = run("forward");
    let second = run("reverse");
    assert_eq!(first.len(), 10_000);
    assert_eq!(
        first, second,
        "same keys, same backends, whatever the process or file order"
    );
}
