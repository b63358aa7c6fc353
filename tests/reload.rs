//! Hot reload end to end: a watched config file (rewritten, renamed over, or
//! swapped the Kubernetes ConfigMap way) and explicit reloads change the
//! backends, balancers and listeners of a proxy, with real clients and
//! backends on loopback, and no request is lost.

mod config_file;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use config_file::*;
use http::Request;
use http_body_util::BodyExt;
use sluice::runtime::ReloadError;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Admin and listener `web` on `:0`, upstream `app` with weighted backends.
fn weighted_config(list: &[(&Backend, u32)], balancer: &str, extra: &str) -> String {
    let items = list
        .iter()
        .map(|(b, w)| format!("{{ address = \"{}\", weight = {w} }}", b.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbalancer = \"{balancer}\"\nbackends = [{items}]\n{extra}\n"
    )
}

/// A `[[listener]]` table sending to `app`.
fn listener(name: &str, listen: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"app\"\n{extra}\n"
    )
}

fn metrics(proxy: &sluice::runtime::Running) -> String {
    proxy.shared().metrics.encode()
}

/// The /status entry of `backend` in upstream `upstream`.
fn status_of(
    proxy: &sluice::runtime::Running,
    upstream: &str,
    backend: SocketAddr,
) -> serde_json::Value {
    let status = sluice::admin::endpoints::status(proxy.shared());
    status["upstreams"]
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == upstream))
        .and_then(|u| u["backends"].as_array())
        .and_then(|bs| bs.iter().find(|b| b["address"] == backend.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("{upstream}/{backend} not in /status: {status}"))
}

async fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_no_request() {
    let (a, b, c, d) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    );
    let balancers = [
        "round_robin",
        "least_conn",
        "p2c",
        "random",
        "consistent_hash",
    ];
    let config = |i: usize| {
        let w = |k: usize| 1 + ((i + k) % 3) as u32;
        let set = if i.is_multiple_of(2) {
            vec![(&a, w(0)), (&b, w(1)), (&c, w(2))]
        } else {
            vec![(&b, w(0)), (&c, w(1)), (&d, w(2))]
        };
        weighted_config(&set, balancers[i % balancers.len()], "")
    };
    let file = ConfigFile::new(&config(0));
    let proxy = file.start().await;
    let addr = proxy.listener_addr("web").expect("bound");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (stop, ok, errors) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&errors));
            tokio::spawn(async move {
                let client = h1_client();
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get(format!("http://{addr}/"))
                        .body(empty())
                        .expect("request");
                    let failure = match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let reason = resp.headers().get("sluice-error").cloned();
                            match resp.into_body().collect().await {
                                Ok(_) if status == 200 => None,
                                Ok(_) => Some(format!("status {status} {reason:?}")),
                                Err(e) => Some(format!("body: {e}")),
                            }
                        }
                        Err(e) => Some(format!("request: {e:?}")),
                    };
                    match failure {
                        None => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(f) => errors.lock().expect("errors").push(f),
                    }
                }
            })
        })
        .collect();

    let started = std::time::Instant::now();
    for i in 1..=20 {
        // Pacing: twenty reloads spread over the run.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = config(i);
        file.replace(&text);
        wait_config(&proxy, &hash_of(&text)).await;
        let snapshot = proxy.shared().snapshot.load();
        let app = &snapshot.upstreams[0];
        assert_eq!(app.backends.len(), 3);
        let first = if i % 2 == 0 { a.addr } else { b.addr };
        assert_eq!(&*app.backends[0].key.address, first.to_string());
    }
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let total = ok.load(Ordering::Relaxed);
    let errors = errors.lock().expect("errors").clone();
    println!(
        "20 reloads under load: {total} requests answered 200 in {:.2}s, {} errors",
        elapsed.as_secs_f64(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(total >= 5000, "only {total} requests in {elapsed:?}");
    assert_eq!(
        reloads(&proxy, "success"),
        21.0,
        "the start and twenty reloads"
    );
    assert_eq!(reloads(&proxy, "failure"), 0.0);
    for backend in [&a, &b, &c, &d] {
        assert!(backend.hits() > 0, "{} got no traffic", backend.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_triggers_exactly_one_reload() {
    use std::os::unix::fs::symlink;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dir = tempfile::tempdir().expect("temp dir");
    // The layout a ConfigMap volume has: sluice.toml -> ..data/sluice.toml,
    // ..data -> a timestamped directory holding the files.
    let first = dir.path().join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir(&first).expect("mkdir");
    std::fs::write(first.join("sluice.toml"), simple_config(&[&a], "")).expect("write");
    symlink("..2026_01_01_00_00_00.000000001", dir.path().join("..data")).expect("link");
    symlink("..data/sluice.toml", dir.path().join("sluice.toml")).expect("link");
    let config = sluice::config::load_file(&dir.path().join("sluice.toml")).expect("valid");
    let proxy = sluice::runtime::run(config).await.expect("proxy starts");
    let addr = proxy.listener_addr("web").expect("bound");
    assert_eq!(get(addr, "/").await.body, "a");

    // An update as the kubelet makes it: a new directory, a ..data_tmp link
    // to it renamed over ..data, then the old directory removed.
    let text = simple_config(&[&b], "");
    let second = dir.path().join("..2026_01_01_00_01_00.000000002");
    std::fs::create_dir(&second).expect("mkdir");
    std::fs::write(second.join("sluice.toml"), &text).expect("write");
    symlink(
        "..2026_01_01_00_01_00.000000002",
        dir.path().join("..data_tmp"),
    )
    .expect("link");
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap");
    std::fs::remove_dir_all(&first).expect("remove old");

    wait_config(&proxy, &hash_of(&text)).await;
    assert_eq!(get(addr, "/").await.body, "b");
    // Events still in flight would reload within a few debounce periods:
    // none may.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        reloads(&proxy, "success"),
        2.0,
        "the start and one reload ({})",
        listing(dir.path())
    );
    assert_eq!(reloads(&proxy, "failure"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_editor_write_and_an_atomic_rename_reload_once_each() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let file = ConfigFile::new(&simple_config(&[&a], ""));
    let proxy = file.start().await;
    let addr = proxy.listener_addr("web").expect("bound");

    // In place, in two writes, as an editor saving over the file does.
    let text = simple_config(&[&b], "");
    {
        let mut f = std::fs::File::create(&file.path).expect("truncate");
        let (head, tail) = text.split_at(text.len() / 2);
        std::io::Write::write_all(&mut f, head.as_bytes()).expect("write");
        std::io::Write::flush(&mut f).expect("flush");
        std::thread::sleep(Duration::from_millis(20));
        std::io::Write::write_all(&mut f, tail.as_bytes()).expect("write");
    }
    wait_config(&proxy, &hash_of(&text)).await;
    assert_eq!(get(addr, "/").await.body, "b");

    // A new file renamed over the old one.
    let text = simple_config(&[&c], "");
    file.replace(&text);
    wait_config(&proxy, &hash_of(&text)).await;
    assert_eq!(get(addr, "/").await.body, "c");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reloads(&proxy, "success"), 3.0, "the start and two reloads");
    assert_eq!(reloads(&proxy, "failure"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_keeps_the_old_backends_serving() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let good = simple_config(&[&a], "");
    let file = ConfigFile::new(&good);
    let proxy = file.start().await;
    let addr = proxy.listener_addr("web").expect("bound");

    // Line 12, column 17: the value of max_in_flight.
    let bad = simple_config(&[&b], "max_in_flight = \"lots\"");
    file.replace(&bad);
    wait_until(Duration::from_secs(10), "a failed reload", || async {
        reloads(&proxy, "failure") == 1.0
    })
    .await;
    assert_eq!(get(addr, "/").await.body, "a");
    let status = sluice::admin::endpoints::status(proxy.shared());
    assert_eq!(status["config"]["hash"], hash_of(&good));

    // SIGHUP's path reports every error with its place, and keeps serving.
    let err = proxy.reload().await.expect_err("invalid");
    let ReloadError::Invalid(errors) = &err else {
        panic!("not a validation error: {err}");
    };
    let first = errors.0[0].to_string();
    assert!(
        first.contains("sluice.toml:12:17: upstream[0].max_in_flight"),
        "{first}"
    );
    assert_eq!(reloads(&proxy, "failure"), 2.0);
    assert_eq!(reloads(&proxy, "success"), 1.0);
    assert_eq!(get(addr, "/").await.body, "a");

    // Fixing the file reloads it.
    let fixed = simple_config(&[&b], "");
    file.replace(&fixed);
    wait_config(&proxy, &hash_of(&fixed)).await;
    assert_eq!(get(addr, "/").await.body, "b");
    let m = metrics(&proxy);
    let stamp = metric(&m, "sluice_config_last_reload_success_timestamp_seconds ");
    assert!(stamp.is_some_and(|s| s > 1.7e9), "{stamp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_to_a_removed_backend_completes() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let file = ConfigFile::new(&simple_config(&[&a], ""));
    let proxy = file.start().await;
    let addr = proxy.listener_addr("web").expect("bound");

    let slow = tokio::spawn(async move { get(addr, "/sleep/1000").await });
    a.wait_hits(1).await;
    file.replace(&simple_config(&[&b], ""));
    proxy.reload().await.expect("reloaded");
    // New requests go to the new set at once...
    assert_eq!(get(addr, "/").await.body, "b");
    // ...while the one in flight on the removed backend finishes there.
    let answer = slow.await.expect("task");
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "a"));
    assert_eq!(a.hits(), 1);
    // Drained: once its last call ended, its pooled connection closed.
    wait_until(
        Duration::from_secs(10),
        "a's connections closed",
        || async { a.conns() > 0 && a.closed() == a.conns() },
    )
    .await;
    // The removed backend's series are gone from /metrics.
    let m = metrics(&proxy);
    assert!(!m.contains(&a.addr.to_string()), "{m}");
    assert!(m.contains(&b.addr.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_changed_moved_and_removed_by_reload() {
    let a = Backend::start_slow("a", Duration::ZERO).await;
    let base = simple_config(&[&a], "");
    let file = ConfigFile::new(&base);
    let proxy = file.start().await;
    let web = proxy.listener_addr("web").expect("bound");

    // Added.
    let text = format!("{base}{}", listener("extra", "127.0.0.1:0", ""));
    file.replace(&text);
    proxy.reload().await.expect("reloaded");
    let extra = proxy.listener_addr("extra").expect("bound by the reload");
    assert_eq!(get(extra, "/").await.body, "a");
    assert_eq!(proxy.listener_addr("web"), Some(web), "web untouched");
    assert_eq!(get(web, "/").await.body, "a");

    // Changed settings, same address: the socket is handed over and the
    // new limit applies.
    let text = format!(
        "{base}{}",
        listener("extra", "127.0.0.1:0", "max_connections = 1")
    );
    file.replace(&text);
    proxy.reload().await.expect("reloaded");
    assert_eq!(proxy.listener_addr("extra"), Some(extra), "same socket");
    let mut held = TcpStream::connect(extra).await.expect("connect");
    held.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let n = held.read(&mut buf).await.expect("answer");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let second = raw_exchange(
        extra,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(second, "", "over max_connections: closed at accept");
    let m = metrics(&proxy);
    assert_eq!(
        metric(
            &m,
            "sluice_downstream_connections_total{listener=\"extra\",result=\"rejected\"} "
        ),
        Some(1.0)
    );
    drop(held);

    // Moved: the new address accepts, the old one refuses.
    let moved_to = free_addr();
    let text = format!("{base}{}", listener("extra", &moved_to.to_string(), ""));
    file.replace(&text);
    proxy.reload().await.expect("reloaded");
    assert_eq!(proxy.listener_addr("extra"), Some(moved_to));
    assert_eq!(get(moved_to, "/").await.body, "a");
    wait_until(Duration::from_secs(5), "the old address refuses", || {
        refused(extra)
    })
    .await;

    // Removed: its request in flight finishes, new connections are refused.
    let slow = tokio::spawn(async move { get(web, "/sleep/800").await });
    let before = a.hits();
    a.wait_hits(before + 1).await;
    let only_extra = text.replacen(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n",
        "",
        1,
    );
    assert!(!only_extra.contains("\"web\""), "{only_extra}");
    file.replace(&only_extra);
    proxy.reload().await.expect("reloaded");
    assert_eq!(proxy.listener_addr("web"), None);
    let answer = slow.await.expect("task");
    assert_eq!((answer.status.as_u16(), answer.body.as_str()), (200, "a"));
    wait_until(
        Duration::from_secs(5),
        "the removed listener refuses",
        || refused(web),
    )
    .await;
    assert_eq!(get(moved_to, "/").await.body, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_bind_changes_nothing() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let file = ConfigFile::new(&simple_config(&[&a], ""));
    let proxy = file.start().await;
    let web = proxy.listener_addr("web").expect("bound");
    let hash = proxy.shared().snapshot.load().config.source.hash.clone();

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    let text = format!(
        "{}{}",
        simple_config(&[&b], ""),
        listener("extra", &taken_addr.to_string(), "")
    );
    let new = sluice::config::from_str(&text, &file.path.display().to_string()).expect("valid");
    let err = proxy.apply(new).await.expect_err("the address is taken");
    match &err {
        ReloadError::Bind(sluice::runtime::BindFailure { name, addr, .. }) => {
            assert_eq!((name.as_str(), *addr), ("extra", taken_addr));
        }
        other => panic!("not a bind error: {other}"),
    }
    assert_eq!(reloads(&proxy, "failure"), 1.0);
    assert_eq!(reloads(&proxy, "success"), 1.0);
    assert_eq!(proxy.shared().snapshot.load().config.source.hash, hash);
    assert_eq!(proxy.listeners(), vec![("web".to_owned(), web)]);
    assert_eq!(get(web, "/").await.body, "a", "the old backends serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_that_stay_keep_health_circuit_counters_and_pooled_connections() {
    let (a, b, d) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("d").await,
    );
    let h = Backend::start("h").await;
    // One worker: its one pool holds every backend connection.
    let config = |app: &str, interval: &str| {
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
             [[listener.route]]\nheaders = {{ \"x-checked\" = \"1\" }}\nupstream = \"checked\"\n\n\
             [[upstream]]\nname = \"app\"\n{app}\n\
             circuit_breaker = {{ consecutive_failures = 2, open_for = \"1m\", open_for_max = \"2m\" }}\n\n\
             [[upstream]]\nname = \"checked\"\nbackends = [\"{}\"]\n\
             health_check = {{ kind = \"http\", path = \"/\", interval = \"{interval}\", healthy_threshold = 1, unhealthy_threshold = 1 }}\n",
            h.addr
        );
        with_workers(1, &text)
    };
    let file = ConfigFile::new(&config(
        &format!("backends = [\"{}\", \"{}\"]", a.addr, b.addr),
        "50ms",
    ));
    let proxy = file.start().await;
    let addr = proxy.listener_addr("web").expect("bound");

    // b fails until its circuit opens; h fails its health checks.
    b.force_status(502);
    h.force_status(500);
    let client = h1_client();
    for _ in 0..6 {
        let req = Request::get(format!("http://{addr}/"))
            .body(empty())
            .expect("request");
        send(&client, req).await;
    }
    assert_eq!(status_of(&proxy, "app", b.addr)["circuit"], "open");
    wait_until(Duration::from_secs(10), "h down", || async {
        status_of(&proxy, "checked", h.addr)["health"] == "down"
    })
    .await;
    b.force_status(0);
    h.force_status(0);
    let a_requests = status_of(&proxy, "app", a.addr)["requests_total"]
        .as_u64()
        .expect("count");
    assert!(a_requests >= 3);
    let a_conns = a.conns();

    // A new backend and balancer, and new check settings beside: all
    // rebuilt. The new checker's first probe is 10 s away, so until then h
    // is up only if the reload forgot that it was down.
    let text = config(
        &format!(
            "balancer = \"least_conn\"\nbackends = [\"{}\", {{ address = \"{}\", weight = 2 }}, \"{}\"]",
            a.addr, b.addr, d.addr
        ),
        "10s",
    );
    file.replace(&text);
    proxy.reload().await.expect("reloaded");
    let snapshot = proxy.shared().snapshot.load();
    assert_eq!(snapshot.upstreams[0].backends.len(), 3);
    drop(snapshot);

    assert_eq!(
        status_of(&proxy, "app", b.addr)["circuit"],
        "open",
        "circuit kept"
    );
    assert_eq!(
        status_of(&proxy, "checked", h.addr)["health"],
        "down",
        "health kept"
    );
    let req = Request::get(format!("http://{addr}/"))
        .header("x-checked", "1")
        .body(empty())
        .expect("request");
    let answer = send(&client, req).await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        proxy.shared().health.len(),
        1,
        "one checker for h, none duplicated"
    );
    let counted = status_of(&proxy, "app", a.addr)["requests_total"]
        .as_u64()
        .expect("count");
    assert!(
        counted >= a_requests,
        "counters kept: {counted} < {a_requests}"
    );

    // Requests go to a and d only (b's circuit is open); a's pooled
    // connection is reused.
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let req = Request::get(format!("http://{addr}/"))
            .body(empty())
            .expect("request");
        bodies.push(send(&client, req).await.body);
    }
    let t = tally(&bodies);
    assert_eq!(t.get("b"), None, "{t:?}");
    assert!(t.contains_key("a") && t.contains_key("d"), "{t:?}");
    assert_eq!(
        a.conns(),
        a_conns,
        "a's pooled connection survived the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checkers_follow_reloads_without_duplicates() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let check = "health_check = { kind = \"tcp\", interval = \"50ms\" }";
    let file = ConfigFile::new(&simple_config(&[&a, &b], check));
    let proxy = file.start().await;
    assert_eq!(proxy.shared().health.len(), 2);
    let sets: [&[&Backend]; 3] = [&[&b, &c], &[&a, &b, &c], &[&c]];
    for round in 0..9 {
        let set = sets[round % sets.len()];
        let text = simple_config(set, check);
        file.replace(&text);
        proxy.reload().await.expect("reloaded");
        assert_eq!(proxy.shared().health.len(), set.len(), "round {round}");
    }
    // The last set is c alone: a and b are no longer probed (after a probe
    // that was already connecting when its checker stopped lands).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (a_probes, b_probes) = (a.conns(), b.conns());
    let c_probes = c.conns();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!((a.conns(), b.conns()), (a_probes, b_probes));
    assert!(c.conns() > c_probes, "c is still probed");

    file.replace(&simple_config(&[&a, &c], ""));
    proxy.reload().await.expect("reloaded");
    assert_eq!(proxy.shared().health.len(), 0, "checks removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_settings_refuse_the_reload_and_the_rest_follows_it() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let base = simple_config(&[&a], "");
    let file = ConfigFile::new(&format!(
        "[shutdown]\ndrain_delay = \"1h\"\ngrace = \"1h\"\n{base}"
    ));
    let proxy = file.start().await;
    let addr = proxy.listener_addr("web").expect("bound");

    let other_admin = simple_config(&[&b], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{}\"", free_addr()),
    );
    for (text, what) in [
        (other_admin, "admin.listen"),
        (
            with_workers(3, &simple_config(&[&b], "")),
            "runtime.workers",
        ),
        (
            with_runtime("busy_poll = \"50us\"", &simple_config(&[&b], "")),
            "runtime.busy_poll",
        ),
        (
            with_runtime(
                "busy_poll = \"1ms\"\nbusy_poll_interval = \"20us\"",
                &simple_config(&[&b], ""),
            ),
            "runtime.busy_poll_interval",
        ),
        (
            format!("[log]\nformat = \"json\"\n{}", simple_config(&[&b], "")),
            "log.format",
        ),
    ] {
        file.replace(&text);
        match proxy.reload().await {
            Err(ReloadError::NeedsRestart(key)) => assert_eq!(key, what),
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(get(addr, "/").await.body, "a", "{what}: nothing changed");
    }
    assert_eq!(reloads(&proxy, "success"), 1.0);

    // [shutdown] is read when shutdown begins: the reloaded values apply.
    file.replace(&format!(
        "[shutdown]\ndrain_delay = \"0s\"\ngrace = \"5s\"\n{}",
        simple_config(&[&b], "")
    ));
    proxy.reload().await.expect("reloaded");
    assert_eq!(get(addr, "/").await.body, "b");
    proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(10), proxy.wait())
        .await
        .expect("shut down with the reloaded drain_delay, not the hour it started with");
}
