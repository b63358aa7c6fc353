//! DNS service discovery end to end: a real DNS server in the test process
//! (hickory-server on a loopback UDP port) answers A records that the test
//! changes, the proxy resolves them every `refresh`, and requests follow.
//! Backends listen on one port at different loopback addresses, as pods of
//! a headless Service do.

mod dns_server;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dns_server::{Answer, DnsServer};
use sluice::runtime::Running;
use support::*;

fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Backends named `names` on one port at 127.0.0.1, .2, .3, ...
async fn pods(names: &[&str]) -> (u16, Vec<Backend>) {
    let port = free_addr().port();
    let mut backends = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let addr = SocketAddr::new(loopback(i as u8 + 1), port);
        backends.push(Backend::start_at(name, addr).await);
    }
    (port, backends)
}

fn config(dns: SocketAddr, port: u16, refresh: &str, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[runtime]\ndns_servers = [\"{dns}\"]\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\ndiscovery = {{ dns = \"app.test:{port}\", refresh = \"{refresh}\" }}\n{extra}\n"
    )
}

/// The addresses of upstream `app`'s backends, sorted.
fn backends_of(proxy: &Running) -> Vec<SocketAddr> {
    let snapshot = proxy.shared().snapshot.load();
    let mut addrs: Vec<SocketAddr> = snapshot
        .upstream("app")
        .map(|u| u.backends.iter().map(|b| b.addr).collect())
        .unwrap_or_default();
    addrs.sort();
    addrs
}

async fn wait_backends(proxy: &Running, want: &[SocketAddr]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = backends_of(proxy);
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backends {now:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn discovery_metric(proxy: &Running, name: &str) -> Option<f64> {
    let m = proxy.shared().metrics.encode();
    metric(&m, &format!("{name}{{upstream=\"app\"}} "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_changing_records_and_keeps_the_last_good_set() {
    let (port, pods) = pods(&["a", "b", "c"]).await;
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let dns = DnsServer::start(vec![a.addr.ip(), b.addr.ip()]).await;
    let text = config(
        dns.addr,
        port,
        "1s",
        "health_check = { kind = \"tcp\", interval = \"100ms\" }",
    );
    let cfg = sluice::config::from_str(&text, "test.toml").expect("valid");
    let proxy = sluice::runtime::run(cfg).await.expect("proxy starts");
    let addr = proxy.listener_addr("web").expect("bound");

    // Resolved before the proxy is ready; health checks cover them.
    assert_eq!(backends_of(&proxy), vec![a.addr, b.addr]);
    assert_eq!(proxy.shared().health.len(), 2);
    assert_eq!(
        discovery_metric(&proxy, "sluice_discovery_backends"),
        Some(2.0)
    );
    let bodies = [get(addr, "/").await.body, get(addr, "/").await.body];
    assert_eq!(tally(&bodies).len(), 2, "{bodies:?}");

    // A slow request on each backend; then a goes away and c comes.
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(addr, "/sleep/2500").await }))
        .collect();
    a.wait_hits(2).await;
    b.wait_hits(2).await;
    let b_state = {
        let snapshot = proxy.shared().snapshot.load();
        let app = snapshot.upstream("app").expect("app");
        app.backends
            .iter()
            .find(|s| s.addr == b.addr)
            .cloned()
            .expect("b")
    };
    dns.set(Answer::Records(vec![c.addr.ip(), b.addr.ip()]));
    wait_backends(&proxy, &[b.addr, c.addr]).await;
    for task in slow {
        let answer = task.await.expect("task");
        assert_eq!(
            answer.status, 200,
            "in flight on a drained backend: {}",
            answer.body
        );
    }
    let b_now = {
        let snapshot = proxy.shared().snapshot.load();
        let app = snapshot.upstream("app").expect("app");
        app.backends
            .iter()
            .find(|s| s.addr == b.addr)
            .cloned()
            .expect("b")
    };
    assert!(Arc::ptr_eq(&b_state, &b_now), "b kept its state");
    assert_eq!(proxy.shared().health.len(), 2);
    let mut bodies = Vec::new();
    for _ in 0..10 {
        bodies.push(get(addr, "/").await.body);
    }
    let t = tally(&bodies);
    assert_eq!(
        (t.get("b"), t.get("c"), t.get("a")),
        (Some(&5), Some(&5), None),
        "{t:?}"
    );
    let m = proxy.shared().metrics.encode();
    assert!(
        !m.contains(&a.addr.to_string()),
        "a's series are gone:\n{m}"
    );

    // SERVFAIL, then an empty answer: each counted, the set kept.
    dns.set(Answer::Fail);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while discovery_metric(&proxy, "sluice_discovery_failures_total") < Some(1.0) {
        assert!(tokio::time::Instant::now() < deadline, "no failure counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dns.set(Answer::Records(Vec::new()));
    while discovery_metric(&proxy, "sluice_discovery_failures_total") < Some(2.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no second failure counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backends_of(&proxy), vec![b.addr, c.addr]);
    assert_eq!(get(addr, "/").await.status, 200);

    // Back to a alone.
    dns.set(Answer::Records(vec![a.addr.ip()]));
    wait_backends(&proxy, &[a.addr]).await;
    assert_eq!(get(addr, "/").await.body, "a");
    assert_eq!(
        discovery_metric(&proxy, "sluice_discovery_backends"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_resolve_at_start_serves_503_until_it_does() {
    let (port, pods) = pods(&["a"]).await;
    let dns = DnsServer::start(Vec::new()).await;
    dns.set(Answer::Fail);
    let text = config(dns.addr, port, "1s", "");
    let cfg = sluice::config::from_str(&text, "test.toml").expect("valid");
    let proxy = sluice::runtime::run(cfg).await.expect("proxy starts");
    let addr = proxy.listener_addr("web").expect("bound");

    assert_eq!(backends_of(&proxy), Vec::<SocketAddr>::new());
    let answer = get(addr, "/").await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.headers.get("sluice-error").map(|v| v.as_bytes()),
        Some(&b"no-healthy-backend"[..])
    );
    assert!(discovery_metric(&proxy, "sluice_discovery_failures_total") >= Some(1.0));

    dns.set(Answer::Records(vec![pods[0].addr.ip()]));
    wait_backends(&proxy, &[pods[0].addr]).await;
    assert_eq!(get(addr, "/").await.body, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_tasks_follow_reloads() {
    let (port, pods) = pods(&["a", "b"]).await;
    let dns = DnsServer::start(vec![pods[0].addr.ip()]).await;
    let text = config(dns.addr, port, "1s", "");
    let cfg = sluice::config::from_str(&text, "test.toml").expect("valid");
    let proxy = sluice::runtime::run(cfg).await.expect("proxy starts");
    let addr = proxy.listener_addr("web").expect("bound");
    assert_eq!(proxy.control().discovery_tasks().await, 1);

    // New refresh: the task restarts, one still; the set is kept as is.
    let apply = |text: String| {
        let proxy = &proxy;
        async move {
            let cfg = sluice::config::from_str(&text, "test.toml").expect("valid");
            proxy.apply(cfg).await.expect("reloaded");
        }
    };
    apply(config(dns.addr, port, "2s", "")).await;
    assert_eq!(proxy.control().discovery_tasks().await, 1);
    assert_eq!(backends_of(&proxy), vec![pods[0].addr]);

    // Static backends instead: no task, no discovery series.
    apply(simple_config(&[&pods[1]], "")).await;
    assert_eq!(proxy.control().discovery_tasks().await, 0);
    assert_eq!(discovery_metric(&proxy, "sluice_discovery_backends"), None);
    assert_eq!(get(addr, "/").await.body, "b");

    // Discovery again: resolved by the reload itself, before it returns.
    dns.set(Answer::Records(vec![pods[0].addr.ip(), pods[1].addr.ip()]));
    apply(config(dns.addr, port, "1s", "")).await;
    assert_eq!(proxy.control().discovery_tasks().await, 1);
    assert_eq!(backends_of(&proxy), vec![pods[0].addr, pods[1].addr]);
    let bodies = [get(addr, "/").await.body, get(addr, "/").await.body];
    assert_eq!(tally(&bodies).len(), 2, "{bodies:?}");
}
