//! Fault injection: backends that die, fail, hang or are overloaded, under
//! real load through the proxy. Each test prints the figure it measured.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use support::*;

/// `workers` clients sending GETs until `stop`; returns (ok, failed).
fn steady_load(
    addr: SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(usize, usize)>> {
    (0..workers)
        .map(|_| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let client = h1_client();
                let (mut ok, mut failed) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get(format!("http://{addr}/"))
                        .body(empty())
                        .expect("request");
                    match client.request(req).await {
                        Ok(resp) if resp.status() == 200 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_no_client_error_and_rejoins() {
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    ];
    let victim_addr = backends[2].addr;
    let refs: Vec<&Backend> = backends.iter().collect();
    let cfg = simple_config(
        &refs,
        "max_in_flight = 0\nretry = { on = [\"connect-failure\", \"reset\"], budget = 1 }\n\
         health_check = { path = \"/\", interval = \"100ms\", timeout = \"100ms\", healthy_threshold = 2, unhealthy_threshold = 2 }",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(addr, 4, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed_at = Instant::now();
    backends[2].kill();
    let down_at = wait_backend_up(&proxy, victim_addr, 0.0).await;
    let hits_when_down = backends[2].hits();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let restarted = Backend::start_at("c2", victim_addr).await;
    let restarted_at = Instant::now();
    let up_at = wait_backend_up(&proxy, victim_addr, 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for task in load {
        let (o, f) = task.await.expect("worker");
        ok += o;
        failed += f;
    }
    let out_after = down_at - killed_at;
    let back_after = up_at - restarted_at;
    eprintln!(
        "killed backend: {ok} requests ok, {failed} failed; marked down {out_after:?} after the \
         kill (limit 2 x 100 ms + 100 ms), back {back_after:?} after restart (limit 2 x 100 ms + slack); \
         restarted backend served {} requests",
        restarted.hits()
    );
    assert_eq!(failed, 0, "no client-visible error");
    assert!(ok > 100, "load ran: {ok}");
    assert!(
        out_after <= Duration::from_millis(300) + Duration::from_millis(150),
        "{out_after:?}"
    );
    assert!(
        back_after <= Duration::from_millis(200) + Duration::from_millis(250),
        "{back_after:?}"
    );
    assert_eq!(
        backends[2].hits(),
        hits_when_down,
        "no traffic reached the dead backend"
    );
    assert!(restarted.hits() > 0, "back in rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_503_costs_clients_nothing_and_its_circuit_recovers() {
    let (bad, a, b) = (
        Backend::start("bad").await,
        Backend::start("a").await,
        Backend::start("b").await,
    );
    bad.force_status(503);
    let cfg = simple_config(
        &[&bad, &a, &b],
        "max_in_flight = 0\nretry = { on = [\"503\"], budget = 1 }\n\
         circuit_breaker = { consecutive_failures = 5, open_for = \"300ms\" }",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut five_xx = 0;
    for _ in 0..200 {
        if get(addr, "/").await.status.is_server_error() {
            five_xx += 1;
        }
    }
    let bad_hits = bad.hits();
    let m = admin_get(&proxy, "/metrics").await.body;
    let opened = format!(
        "sluice_circuit_transitions_total{{backend=\"{}\",to=\"open\",upstream=\"app\"}} ",
        bad.addr
    );
    let opens = metric(&m, &opened).unwrap_or(0.0);
    // Recovery: half-open probes (one per open_for, which doubles while
    // the backend still fails) find it healthy and close the circuit.
    bad.force_status(0);
    let state = format!(
        "sluice_backend_circuit_state{{backend=\"{}\",upstream=\"app\"}} ",
        bad.addr
    );
    let recovered = Instant::now();
    let deadline = recovered + Duration::from_secs(10);
    loop {
        assert_eq!(get(addr, "/").await.status, 200);
        let m = admin_get(&proxy, "/metrics").await.body;
        if metric(&m, &state) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "circuit never closed:\n{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "503 backend: {five_xx} of 200 client requests saw a 5xx (retries on); the failing backend \
         got {bad_hits} calls (5 to open the circuit, then one half-open probe per re-open; {opens} \
         opens); closed {:?} after it recovered",
        recovered.elapsed()
    );
    assert_eq!(five_xx, 0);
    assert!(
        bad_hits >= 5 && bad_hits as f64 <= 5.0 + opens,
        "{bad_hits} calls, {opens} opens"
    );
    assert!(bad.hits() > bad_hits, "back in rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_is_bounded_by_per_try_and_retried() {
    // Accepts and reads, never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hole_addr = black_hole.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = black_hole.accept().await {
            held.push(s);
        }
    });
    let good = Backend::start("good").await;
    let cfg = simple_config(&[&good], "max_in_flight = 0\n\
         retry = { on = [\"timeout\"], backoff_base = \"10ms\", backoff_max = \"20ms\", budget = 1 }\n\
         timeouts = { connect = \"1s\", per_try = \"200ms\", request = \"2s\" }")
    .replace("backends = [", &format!("backends = [\"{hole_addr}\", "));
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let answer = get(addr, "/").await;
        worst = worst.max(started.elapsed());
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "good")
        );
    }
    eprintln!("never-answering backend: worst request {worst:?} (per_try 200 ms + backoff <= 20 ms + another try)");
    assert!(
        worst < Duration::from_millis(200 + 20 + 200 + 150),
        "{worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_503_at_once() {
    let slow = Backend::start_slow("slow", Duration::from_millis(1000)).await;
    let proxy = start_proxy(&simple_config(&[&slow], "max_in_flight = 5")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let held: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { get(addr, "/").await.status }))
        .collect();
    slow.wait_hits(5).await;
    let shed = Arc::new(AtomicUsize::new(0));
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let started = Instant::now();
        let answer = get(addr, "/").await;
        worst = worst.max(started.elapsed());
        if answer.status == 503 && answer.headers["sluice-error"] == "overloaded" {
            shed.fetch_add(1, Ordering::Relaxed);
        }
    }
    eprintln!(
        "overload: {} of 50 excess requests shed, slowest answer {worst:?}",
        shed.load(Ordering::Relaxed)
    );
    assert_eq!(shed.load(Ordering::Relaxed), 50);
    // Measured in single milliseconds; the bound leaves room for a loaded
    // machine while still proving nothing waits for the slow backend (1 s).
    assert!(worst < Duration::from_millis(250), "{worst:?}");
    for h in held {
        assert_eq!(h.await.expect("held"), 200);
    }
}
