//! A thousand reloads in a loop leak neither memory nor tasks: every reload
//! changes backends, health checks, a listener and a DNS-discovering
//! upstream, so leaked checkers, accept loops or discovery tasks would show
//! in the task count of the two workers, and leaked state in the resident
//! set.
//!
//! Alone in its test binary: the resident set is the whole process's.

mod config_file;
mod dns_server;
mod support;

use std::time::Duration;

use config_file::*;
use dns_server::DnsServer;
use support::*;

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// The task count of every worker (the test's own runtime is worker 0)
/// once it holds still for 300 ms (stopped tasks end when next polled, not
/// at once), or the last one seen after 10 s.
async fn settled_tasks(proxy: &sluice::runtime::Running) -> usize {
    let alive_tasks = || proxy.control().alive_tasks();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = alive_tasks();
    let mut same = 0;
    while same < 6 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = alive_tasks();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_reloads_leak_neither_memory_nor_tasks() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let dns = DnsServer::start(vec![a.addr.ip()]).await;
    let head = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[runtime]\nworkers = 2\ndns_servers = [\"{}\"]\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n",
        dns.addr
    );
    let extra_listener =
        "\n[[listener]]\nname = \"extra\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n";
    let pods = |refresh: &str| {
        format!(
            "\n[[upstream]]\nname = \"pods\"\ndiscovery = {{ dns = \"pods.test:{}\", refresh = \"{refresh}\" }}\n\
             health_check = {{ kind = \"tcp\", interval = \"1s\" }}\n",
            a.addr.port()
        )
    };
    // Four shapes in turn; the last one is the measuring point.
    let config = |i: usize| -> String {
        let app = |backends: &[&Backend], extra: &str| {
            let list = backends
                .iter()
                .map(|b| format!("\"{}\"", b.addr))
                .collect::<Vec<_>>()
                .join(", ");
            format!("\n[[upstream]]\nname = \"app\"\nbackends = [{list}]\n{extra}\n")
        };
        match i % 4 {
            0 => format!(
                "{head}{extra_listener}{}{}",
                app(
                    &[&a, &b],
                    "health_check = { kind = \"tcp\", interval = \"1s\" }"
                ),
                pods("1s")
            ),
            1 => format!(
                "{head}{}{}",
                app(&[&b, &c], "balancer = \"least_conn\""),
                pods("2s")
            ),
            2 => format!(
                "{head}{extra_listener}{}",
                app(
                    &[&a, &c],
                    "health_check = { kind = \"tcp\", interval = \"500ms\" }"
                )
            ),
            _ => format!("{head}{}", app(&[&a, &b, &c], "balancer = \"p2c\"")),
        }
    };
    let file = ConfigFile::new(&config(3));
    let proxy = file.start().await;
    let addr = proxy.listener_addr("web").expect("bound");

    let round = |i: usize| {
        let text = config(i);
        let file = &file;
        let proxy = &proxy;
        async move {
            file.replace(&text);
            proxy.reload().await.expect("reloaded");
        }
    };
    // Warm up: allocator pools, metric families, lazily built parts.
    for i in 0..40 {
        round(i).await;
    }
    // Requests on both measuring sides, over enough client connections
    // that both workers take some.
    let requests = || async {
        for _ in 0..32 {
            assert_eq!(get(addr, "/").await.status, 200);
        }
    };
    requests().await;
    let tasks_before = settled_tasks(&proxy).await;
    let rss_before = rss_kib();

    let started = std::time::Instant::now();
    for i in 0..1000 {
        round(i).await;
    }
    let elapsed = started.elapsed();
    requests().await;
    let tasks_after = settled_tasks(&proxy).await;
    let rss_after = rss_kib();
    println!(
        "1000 reloads in {:.2}s ({:.2} ms each): RSS {rss_before} KiB -> {rss_after} KiB ({:+.1}%), alive tasks {tasks_before} -> {tasks_after}; health checkers {}, discovery tasks {}",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / 1000.0,
        (rss_after as f64 / rss_before as f64 - 1.0) * 100.0,
        proxy.shared().health.len(),
        proxy.control().discovery_tasks().await,
    );
    // Each worker's pool of each of the three backends runs a sweeper
    // while it holds an idle connection, and which of those six pairs hold
    // one depends on where the kernel and the balancer sent the requests.
    // A leak of one task per reload would be a thousand.
    let sweepers = 2 * 3;
    assert!(
        tasks_after <= tasks_before + sweepers,
        "tasks leaked: {tasks_before} -> {tasks_after}"
    );
    assert!(
        rss_after as f64 <= rss_before as f64 * 1.10,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The measuring point's shape: no checks, no discovery, one listener.
    assert_eq!(proxy.shared().health.len(), 0);
    assert_eq!(proxy.control().discovery_tasks().await, 0);
    assert_eq!(proxy.listeners().len(), 1);
    assert!(reloads(&proxy, "success") >= 1041.0);
}
