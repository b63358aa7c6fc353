//! The `sluice` binary itself: `check`, signals, and streaming with bounded
//! memory measured on the real process.

mod support;

use std::process::Command;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use nix::sys::signal::Signal;
use support::process::{Proc, BIN};
use support::*;

fn check(config_text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config_text).expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_shipped_example_config() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/sluice.toml");
    let out = Command::new(BIN)
        .args(["check", "--config", path])
        .output()
        .expect("run check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_reports_every_error_with_its_location_and_exits_1() {
    let text = r#"[admin]
listen = "127.0.0.1:9901"

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "apii"
max_conections = 10

[[upstream]]
name = "api"
max_in_flight = "lots"
backends = ["10.0.0.7:80800"]
timeouts = { connect = "5 parsecs" }
"#;
    let (code, err) = check(text);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 5, "one line per problem:\n{err}");
    let expect = [
        ("bad.toml:7:", "listener[0].upstream", "apii"),
        ("bad.toml:8:", "listener[0]", "max_conections"),
        ("bad.toml:12:", "upstream[0].max_in_flight", "integer"),
        ("bad.toml:13:", "upstream[0].backends[0]", "80800"),
        ("bad.toml:14:", "upstream[0].timeouts.connect", "parsecs"),
    ];
    for (loc, path, word) in expect {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(loc) && l.contains(path) && l.contains(word)),
            "no line with {loc} {path} {word} in:\n{err}"
        );
    }
}

#[test]
fn sigterm_drains_lets_in_flight_finish_and_exits_0() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt.block_on(Backend::start("a"));
    let cfg = simple_config(&[&backend], "").replace(
        "[[listener]]",
        "[shutdown]\ndrain_delay = \"300ms\"\ngrace = \"10s\"\n\n[[listener]]",
    );
    let mut proc = Proc::start(&cfg);
    let addr = proc.addr("web");
    let admin = proc.admin;
    let slow = rt.spawn(async move { get(addr, "/sleep/1000").await });
    rt.block_on(backend.wait_hits(1));
    proc.signal(Signal::SIGTERM);
    // Readiness drops at once; requests are still accepted during drain_delay.
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while get(admin, "/readyz").await.status != 503 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz never turned 503"
            );
        }
        assert_eq!(
            get(addr, "/").await.status,
            200,
            "served during drain_delay"
        );
    });
    let answer = rt.block_on(slow).expect("task");
    assert_eq!(answer.status, 200);
    assert_eq!(proc.wait_exit(Duration::from_secs(10)), Some(0));
}

/// Waits until the admin's metrics count a second successful config load
/// (the start, then the reload): the reload has run.
async fn wait_reload_counted(admin: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = get(admin, "/metrics").await.body;
        if m.contains("sluice_config_reloads_total{result=\"success\"} 2") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The threads the process runs now.
fn threads(proc: &Proc) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", proc.child.id()))
        .expect("/proc/PID/task")
        .count()
}

/// `workers = 1` runs every connection, HTTP/1.1 and HTTP/2, on the
/// process's one thread, as HAProxy's `nbthread 1` does; it still reloads
/// and stops gracefully. `workers = 2` runs one worker thread beside the
/// main one (worker 0), and the kernel spreads connections over both.
#[test]
fn one_worker_serves_everything_on_one_thread() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt.block_on(Backend::start("a"));
    let cfg = simple_config(&[&backend], "");
    let mut proc = Proc::start(&with_workers(1, &cfg));
    let addr = proc.addr("web");
    let admin = proc.admin;
    rt.block_on(async {
        assert_eq!(get(addr, "/").await.body, "a");
        let url = format!("http://{addr}/");
        let h2 = h2_client()
            .request(Request::get(&url).body(empty()).expect("request"))
            .await
            .expect("h2 request");
        assert_eq!(h2.version(), http::Version::HTTP_2);
        assert_eq!(h2.status(), 200);
        assert_eq!(get(admin, "/metrics").await.status, 200);
    });
    // Nothing has needed a blocking thread yet (a reload would start one).
    assert_eq!(threads(&proc), 1, "workers = 1 started more threads");

    proc.signal(Signal::SIGHUP);
    rt.block_on(async {
        wait_reload_counted(admin).await;
        assert_eq!(get(addr, "/").await.body, "a");
    });
    proc.signal(Signal::SIGTERM);
    assert_eq!(proc.wait_exit(Duration::from_secs(10)), Some(0));

    let two = Proc::start(&with_workers(2, &cfg));
    const CONNECTIONS: usize = 40;
    let metrics = rt.block_on(async {
        for _ in 0..CONNECTIONS {
            assert_eq!(get(two.addr("web"), "/").await.body, "a");
        }
        get(two.admin, "/metrics").await.body
    });
    assert_eq!(
        threads(&two),
        2,
        "workers = 2: the main thread and one more worker"
    );
    let served = worker_connections(&metrics, 2);
    assert_eq!(served.iter().sum::<f64>(), CONNECTIONS as f64, "{served:?}");
    assert!(
        served.iter().all(|&n| n > 0.0),
        "one worker took every connection: {served:?}"
    );
}

#[test]
fn sighup_keeps_the_process_serving() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt.block_on(Backend::start("a"));
    let proc = Proc::start(&simple_config(&[&backend], ""));
    let addr = proc.addr("web");
    proc.signal(Signal::SIGHUP);
    let admin = proc.admin;
    rt.block_on(async {
        wait_reload_counted(admin).await;
        assert_eq!(get(addr, "/").await.body, "a");
    });
}

#[test]
fn gigabyte_upload_and_download_stream_with_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt.block_on(Backend::start("a"));
    let proc = Proc::start(&simple_config(
        &[&backend],
        "timeouts = { request = \"120s\", per_try = \"120s\" }",
    ));
    let addr = proc.addr("web");
    rt.block_on(async {
        let req = Request::post(format!("http://{addr}/upload"))
            .body(Zeros::new(GIB).map_err(|e| match e {}).boxed())
            .expect("request");
        let answer = send(&h1_client(), req).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, GIB.to_string(), "backend received every byte");

        let req = Request::get(format!("http://{addr}/download/{GIB}"))
            .body(empty())
            .expect("request");
        let resp = h1_client().request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.expect("frame").data_ref() {
                total += d.len() as u64;
            }
        }
        assert_eq!(total, GIB);
    });
    let peak = proc.peak_rss_kib();
    eprintln!("proxy peak RSS after 1 GiB each way: {peak} KiB");
    assert!(peak < 64 * 1024, "proxy peak RSS {peak} KiB over 64 MiB");
}

/// The 64 KiB block number `i` of the test stream: a fixed pseudo-random
/// block with `i` written into its first bytes, so a lost, duplicated or
/// reordered block is caught.
fn block(base: &[u8], i: u64) -> Vec<u8> {
    let mut b = base.to_vec();
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

#[test]
fn tcp_gigabyte_each_way_arrives_intact_with_bounded_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BLOCK: usize = 64 * 1024;
    const BLOCKS: u64 = (1 << 30) / BLOCK as u64;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let echo = rt.block_on(spawn_tcp_echo());
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"l4\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"echo\"\n\
         [[upstream]]\nname = \"echo\"\nbackends = [\"{echo}\"]\n"
    );
    let proc = Proc::start(&cfg);
    let addr = proc.addr("l4");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let base: Vec<u8> = (0..BLOCK)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut r, mut w) = stream.into_split();
        let sent = base.clone();
        let writer = tokio::spawn(async move {
            for i in 0..BLOCKS {
                w.write_all(&block(&sent, i)).await.expect("write");
            }
            w.shutdown().await.expect("half-close");
        });
        let mut got = vec![0u8; BLOCK];
        for i in 0..BLOCKS {
            r.read_exact(&mut got).await.expect("echoed block");
            assert!(got == block(&base, i), "block {i} differs");
        }
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).await.expect("eof");
        assert!(tail.is_empty(), "nothing after the last block");
        writer.await.expect("writer");
    });
    let peak = proc.peak_rss_kib();
    eprintln!("proxy peak RSS after 1 GiB each way over TCP: {peak} KiB");
    assert!(peak < 64 * 1024, "proxy peak RSS {peak} KiB over 64 MiB");
}

#[test]
fn access_log_has_one_json_line_per_tcp_session_and_per_http_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let http_backend = rt.block_on(Backend::start("a"));
    let echo = rt.block_on(spawn_tcp_echo());
    let (_held, dead) = dead_addr();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\naccess_log = true\n\
         [[listener]]\nname = \"l4\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"echo\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"echo\"\nbackends = [\"{echo}\"]\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{dead}\", \"{}\"]\nbalancer = \"round_robin\"\n\
         retry = {{ attempts = 2 }}\n",
        http_backend.addr
    );
    let proc = Proc::start(&cfg);
    let l4 = proc.addr("l4");
    rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(l4).await.expect("connect");
        s.write_all(b"12345").await.expect("write");
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.expect("echo");
        s.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("eof");
    });
    let lines = proc.wait_access(1);
    let session: serde_json::Value = serde_json::from_str(&lines[0]).expect("a JSON line");
    assert_eq!(session["kind"], "tcp");
    assert_eq!(session["listener"], "l4");
    assert_eq!(session["upstream"], "echo");
    assert_eq!(session["backend"], echo.to_string());
    assert_eq!(session["attempts"], 1);
    assert_eq!(session["bytes_in"], 5);
    assert_eq!(session["bytes_out"], 5);
    assert_eq!(session["close"], "closed");
    assert_eq!(session["error"], serde_json::Value::Null);
    assert!(session["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    assert!(session["duration_ms"].as_f64().is_some());
    assert!(session["time"].as_str().is_some_and(|t| t.ends_with('Z')));

    // Round robin sends the first request to the dead backend: a connect
    // failure, then a retry to the live one.
    let web = proc.addr("web");
    let req = Request::put(format!("http://{web}/upload?x=1"))
        .header("host", "shop.example")
        .body(
            http_body_util::Full::new(bytes::Bytes::from_static(b"0123456789"))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("request");
    let answer = rt.block_on(send(&h1_client(), req));
    let lines = proc.wait_access(2);
    let request: serde_json::Value = serde_json::from_str(&lines[1]).expect("a JSON line");
    assert_eq!(request["kind"], "http");
    assert_eq!(request["listener"], "web");
    assert_eq!(request["method"], "PUT");
    assert_eq!(request["host"], "shop.example");
    assert_eq!(request["path"], "/upload");
    assert_eq!(request["status"], answer.status.as_u16());
    assert_eq!(request["upstream"], "app");
    assert!(request["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    assert!(request["duration_ms"].as_f64().is_some());
    assert_eq!(request["bytes_out"], answer.body.len());
    assert_eq!(request["close"], serde_json::Value::Null);
    // A request with a body is not retried: it failed on the dead backend,
    // or went to the live one.
    if answer.status == 200 {
        assert_eq!(request["backend"], http_backend.addr.to_string());
        assert_eq!(request["bytes_in"], 10);
        assert_eq!(request["error"], serde_json::Value::Null);
    } else {
        assert_eq!(request["backend"], dead.to_string());
        assert_eq!(request["error"], "connect-failure");
    }
    assert_eq!(request["attempts"], 1);

    // An idempotent request that meets the dead backend is retried.
    let mut saw_retry = false;
    for i in 0..2 {
        let answer = rt.block_on(get(web, "/status/201"));
        assert_eq!(answer.status, 201);
        let lines = proc.wait_access(3 + i);
        let request: serde_json::Value = serde_json::from_str(&lines[2 + i]).expect("JSON");
        assert_eq!(request["status"], 201);
        assert_eq!(request["backend"], http_backend.addr.to_string());
        saw_retry |= request["attempts"] == 2;
    }
    assert!(saw_retry, "one of two requests met the dead backend first");

    // A request the codec refuses is logged too, with its reason.
    let refused = rt.block_on(raw_exchange(
        web,
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        Duration::from_secs(5),
    ));
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    let lines = proc.wait_access(5);
    let request: serde_json::Value = serde_json::from_str(&lines[4]).expect("JSON");
    assert_eq!(request["status"], 400);
    assert!(request["error"].as_str().is_some(), "{request}");
    assert!(
        proc.log
            .lock()
            .expect("lock")
            .iter()
            .all(|l| !l.contains("\"kind\":\"http\"")),
        "access lines are on stdout, not stderr"
    );
}

#[test]
fn access_log_in_text_format_is_one_key_value_line_per_request() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt.block_on(Backend::start("a"));
    let cfg = simple_config(&[&backend], "").replace(
        "[[listener]]",
        "[log]\nformat = \"text\"\naccess_log = true\n\n[[listener]]",
    );
    let proc = Proc::start(&cfg);
    let web = proc.addr("web");
    assert_eq!(rt.block_on(get(web, "/x%20y")).status, 200);
    let lines = proc.wait_access(1);
    let line = &lines[0];
    for want in [
        " kind=http ",
        " listener=web ",
        " method=GET ",
        " path=/x%20y ",
        " status=200 ",
        " upstream=app ",
        &format!(" backend={} ", backend.addr),
        " attempts=1 ",
        " bytes_in=0 ",
        " bytes_out=1 ",
        " error=- ",
    ] {
        assert!(line.contains(want), "{want:?} missing from {line}");
    }
    assert!(line.starts_with("time=20"), "{line}");
}

#[test]
fn overload_sheds_thousands_of_excess_requests_with_bounded_memory() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let slow = rt.block_on(Backend::start_slow("slow", Duration::from_millis(500)));
    let proc = Proc::start(&simple_config(&[&slow], "max_in_flight = 10"));
    let addr = proc.addr("web");
    let (shed, ok) = rt.block_on(async {
        let tasks: Vec<_> = (0..2000)
            .map(|_| tokio::spawn(async move { get(addr, "/").await.status.as_u16() }))
            .collect();
        let (mut shed, mut ok) = (0, 0);
        for t in tasks {
            match t.await.expect("task") {
                503 => shed += 1,
                200 => ok += 1,
                other => panic!("unexpected status {other}"),
            }
        }
        (shed, ok)
    });
    let peak = proc.peak_rss_kib();
    eprintln!(
        "overload: 2000 concurrent requests, {ok} served, {shed} shed; proxy peak RSS {peak} KiB"
    );
    assert!(shed >= 1000, "most of the excess is shed: {shed}");
    assert!(ok >= 10);
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}
