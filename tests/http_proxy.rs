//! The HTTP pipeline end to end: real backends, the proxy in-process, real
//! clients over loopback.

mod support;

use std::time::Duration;

use http::Request;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn round_robin_spreads_requests_over_every_backend_evenly() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let proxy = start_proxy(&simple_config(&[&a, &b, &c], "")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut bodies = Vec::new();
    for _ in 0..9 {
        bodies.push(get(addr, "/").await.body);
    }
    let t = tally(&bodies);
    assert_eq!(t.get("a"), Some(&3), "{t:?}");
    assert_eq!(t.get("b"), Some(&3), "{t:?}");
    assert_eq!(t.get("c"), Some(&3), "{t:?}");
}

#[tokio::test]
async fn weighted_round_robin_is_smooth_and_follows_weights() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [{{ address = \"{}\", weight = 5 }}, \"{}\", \"{}\"]\n",
        a.addr, b.addr, c.addr
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut bodies = Vec::new();
    for _ in 0..14 {
        bodies.push(get(addr, "/").await.body);
    }
    // Smooth weighted round robin: the heavy backend is interleaved with the
    // others (a a b a c a a), never sent a burst of five (a a a a a b c).
    let cycle = ["a", "a", "b", "a", "c", "a", "a"];
    let expected: Vec<&str> = cycle.iter().chain(cycle.iter()).copied().collect();
    assert_eq!(bodies, expected);
}

fn routing_config(backends: &[&Backend]) -> String {
    let [def, api, wild, canary, s1, s2] = backends else {
        panic!("six backends")
    };
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
upstream = "default"

[[listener.route]]
headers = {{ "x-canary" = "1" }}
upstream = "canary"

[[listener.route]]
host = "api.example.com"
path_prefix = "/v1/"
upstream = "api"

[[listener.route]]
host = "*.example.com"
upstream = "wild"

[[listener.route]]
path_prefix = "/split/"
split = [{{ upstream = "s1", weight = 3 }}, {{ upstream = "s2", weight = 1 }}]

[[upstream]]
name = "default"
backends = ["{}"]
[[upstream]]
name = "api"
backends = ["{}"]
[[upstream]]
name = "wild"
backends = ["{}"]
[[upstream]]
name = "canary"
backends = ["{}"]
[[upstream]]
name = "s1"
backends = ["{}"]
[[upstream]]
name = "s2"
backends = ["{}"]
"#,
        def.addr, api.addr, wild.addr, canary.addr, s1.addr, s2.addr
    )
}

async fn get_host(
    addr: std::net::SocketAddr,
    host: &str,
    path: &str,
    extra: Option<(&str, &str)>,
) -> Answer {
    let mut req = Request::get(format!("http://{addr}{path}")).header("host", host);
    if let Some((k, v)) = extra {
        req = req.header(k, v);
    }
    send(&h1_client(), req.body(empty()).expect("request")).await
}

#[tokio::test]
async fn routes_by_host_wildcard_path_header_and_split() {
    let mut bs = Vec::new();
    for name in ["default", "api", "wild", "canary", "s1", "s2"] {
        bs.push(Backend::start(name).await);
    }
    let refs: Vec<&Backend> = bs.iter().collect();
    let proxy = start_proxy(&routing_config(&refs)).await;
    let addr = proxy.listener_addr("web").expect("bound");

    assert_eq!(
        get_host(addr, "api.example.com", "/v1/users", None)
            .await
            .body,
        "api"
    );
    assert_eq!(
        get_host(addr, "API.Example.com:8080", "/v1/", None)
            .await
            .body,
        "api"
    );
    // Same host, other path: falls through to the wildcard.
    assert_eq!(
        get_host(addr, "api.example.com", "/v2/", None).await.body,
        "wild"
    );
    assert_eq!(
        get_host(addr, "shop.example.com", "/", None).await.body,
        "wild"
    );
    // The bare domain is not matched by *.example.com.
    assert_eq!(
        get_host(addr, "example.com", "/", None).await.body,
        "default"
    );
    // Header route comes first and wins over host.
    assert_eq!(
        get_host(addr, "api.example.com", "/v1/", Some(("x-canary", "1")))
            .await
            .body,
        "canary"
    );
    assert_eq!(
        get_host(addr, "other", "/", Some(("x-canary", "0")))
            .await
            .body,
        "default"
    );

    let mut bodies = Vec::new();
    for _ in 0..40 {
        bodies.push(get_host(addr, "other", "/split/x", None).await.body);
    }
    let t = tally(&bodies);
    assert_eq!((t.get("s1"), t.get("s2")), (Some(&30), Some(&10)), "{t:?}");
}

#[tokio::test]
async fn no_route_and_no_default_is_404_with_reason() {
    let a = Backend::start("a").await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         [[listener.route]]\npath_prefix = \"/a/\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n",
        a.addr
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    assert_eq!(get(addr, "/a/x").await.body, "a");
    let miss = get(addr, "/b").await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.headers["sluice-error"], "no-route");
}

#[tokio::test]
async fn h2c_downstream_is_balanced_per_request_not_per_connection() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let proxy = start_proxy(&simple_config(&[&a, &b, &c], "")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    // One client, one HTTP/2 connection, many streams.
    let client = h2_client();
    let mut bodies = Vec::new();
    for _ in 0..9 {
        let req = Request::get(format!("http://{addr}/"))
            .body(empty())
            .expect("request");
        let answer = send(&client, req).await;
        assert_eq!(answer.status, 200);
        bodies.push(answer.body);
    }
    let t = tally(&bodies);
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t.values().all(|&n| n == 3), "{t:?}");
}

/// The streams of one HTTP/2 connection share its task: a stream whose
/// backend has not answered must not hold up the others.
#[tokio::test]
async fn h2c_streams_are_answered_while_another_waits() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let client = h2_client();
    let slow = {
        let client = client.clone();
        let req = Request::get(format!("http://{addr}/sleep/60000"))
            .body(empty())
            .expect("request");
        tokio::spawn(async move { client.request(req).await.map(|r| r.status()) })
    };
    // Answered while the slow stream is still open on the same connection
    // (hyper's client keeps one HTTP/2 connection per authority). The
    // bound only turns a hang into a failure.
    let quick = async {
        let mut pending = Vec::new();
        for _ in 0..16 {
            let req = Request::get(format!("http://{addr}/"))
                .body(empty())
                .expect("request");
            pending.push(send(&client, req));
        }
        for answer in futures_util::future::join_all(pending).await {
            assert_eq!(answer.status, 200);
            assert_eq!(answer.body, "a");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), quick)
        .await
        .expect("the quick streams were held up by the slow one");
    assert!(!slow.is_finished(), "the slow stream was answered early");
    slow.abort();
}

#[tokio::test]
async fn h2c_both_sides_carries_grpc_trailers() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "protocol = \"h2\"")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let req = Request::post(format!("http://{addr}/trailers"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(empty())
        .expect("request");
    let answer = send(&h2_client(), req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "a");
    let trailers = answer.trailers.expect("trailers passed through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
}

#[tokio::test]
async fn http1_client_gets_trailers_from_an_h2_backend_in_chunked_encoding() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "protocol = \"h2\"")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let raw = raw_exchange(
        addr,
        b"GET /trailers HTTP/1.1\r\nhost: x\r\nte: trailers\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{raw}"
    );
    assert!(raw.contains("grpc-status: 0"), "{raw}");
}

#[tokio::test]
async fn websocket_upgrade_is_proxied_both_ways() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let echoes: [&[u8]; 3] = [b"ping", b"second frame", &[0u8, 255, 10, 13]];
    let head = websocket_echo(&mut stream, "x", &echoes).await;
    assert!(head.contains("upgrade: websocket"), "{head}");
}

#[tokio::test]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_removed() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let req = Request::get(format!("http://{addr}/headers"))
        .header("host", "shop.example.com")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("x-end-to-end", "kept")
        .body(empty())
        .expect("request");
    let seen = send(&h1_client(), req).await.body;
    // Untrusted peer: a client-supplied X-Forwarded-For is replaced.
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(
        seen.contains("x-forwarded-host: shop.example.com\n"),
        "{seen}"
    );
    assert!(seen.contains("host: shop.example.com\n"), "{seen}");
    assert!(seen.contains("x-end-to-end: kept\n"), "{seen}");
    assert!(!seen.contains("x-private"), "{seen}");
    assert!(!seen.contains("keep-alive"), "{seen}");
}

#[tokio::test]
async fn trusted_proxies_get_their_forwarded_for_appended_to() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let req = Request::get(format!("http://{addr}/headers"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .body(empty())
        .expect("request");
    let seen = send(&h1_client(), req).await.body;
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
}

#[tokio::test]
async fn upstream_request_timeout_answers_504() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(
        &[&a],
        "timeouts = { connect = \"1s\", request = \"300ms\", per_try = \"300ms\" }",
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("bound");
    let answer = get(addr, "/sleep/3000").await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.headers["sluice-error"], "upstream-timeout");
    assert_eq!(answer.body, "504 upstream-timeout\n");
}

/// Each try's limit counts from its own start: the timer a finished try
/// left behind (armed for that try's deadline) does not end a later one.
#[tokio::test]
async fn per_try_limit_counts_from_each_try() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(
        &[&a],
        "timeouts = { connect = \"1s\", request = \"10s\", per_try = \"1s\" }",
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("bound");
    assert_eq!(get(addr, "/").await.status, 200);
    // The second try starts 600 ms after the first and its answer comes
    // 700 ms later: past the first try's deadline, within its own.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let answer = get(addr, "/sleep/700").await;
    assert_eq!(answer.status, 200, "{:?}", answer.headers);
    assert_eq!(get(addr, "/sleep/3000").await.status, 504);
}

#[tokio::test]
async fn refused_connection_answers_502_connect_failure() {
    let (_held, dead) = dead_addr();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{dead}\"]\n"
    );
    let proxy = start_proxy(&cfg).await;
    let answer = get(proxy.listener_addr("web").expect("bound"), "/").await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.headers["sluice-error"], "connect-failure");
}

#[tokio::test]
async fn connect_timeout_answers_502_connect_failure_within_the_limit() {
    // A listener whose accept queue is full drops further SYNs, so a
    // connect to it hangs until the connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let full = socket.listen(1).expect("listen");
    let target = full.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(target),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{target}\"]\ntimeouts = {{ connect = \"200ms\", request = \"10s\", per_try = \"10s\" }}\n"
    );
    let proxy = start_proxy(&cfg).await;
    let started = std::time::Instant::now();
    let answer = get(proxy.listener_addr("web").expect("bound"), "/").await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.headers["sluice-error"], "connect-failure");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let metrics = admin_get(&proxy, "/metrics").await.body;
    assert!(
        metrics.contains(&format!(
            "sluice_upstream_requests_total{{backend=\"{target}\",outcome=\"connect_failure\",upstream=\"app\"}} 3"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn slow_request_head_gets_408_after_client_header_timeout() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\ntimeouts = { client_header = \"300ms\", idle = \"10s\" }\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    // Half a request head, then nothing (slowloris).
    let raw = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 408"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("sluice-error: request-timeout"),
        "{raw}"
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\ntimeouts = { client_header = \"5s\", idle = \"300ms\" }\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.expect("response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed by the proxy in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed without another byte");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn max_in_flight_sheds_the_excess_at_once_with_503_overloaded() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "max_in_flight = 2")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let slow1 = tokio::spawn(async move { get(addr, "/sleep/1500").await });
    let slow2 = tokio::spawn(async move { get(addr, "/sleep/1500").await });
    a.wait_hits(2).await;
    let started = std::time::Instant::now();
    let shed = get(addr, "/").await;
    let took = started.elapsed();
    assert_eq!(shed.status, 503);
    assert_eq!(shed.headers["sluice-error"], "overloaded");
    assert!(
        took < Duration::from_millis(500),
        "shed answer took {took:?}"
    );
    assert_eq!(a.hits(), 2, "the shed request never reached the backend");
    assert_eq!(slow1.await.expect("task").status, 200);
    assert_eq!(slow2.await.expect("task").status, 200);
    let metrics = admin_get(&proxy, "/metrics").await.body;
    assert!(
        metrics.contains("sluice_load_shed_total{reason=\"overloaded\",upstream=\"app\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn max_connections_closes_the_excess_at_accept() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\nmax_connections = 2\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let raw = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(raw, "", "third connection closed without an answer");
    let metrics = admin_get(&proxy, "/metrics").await.body;
    assert!(
        metrics.contains(
            "sluice_downstream_connections_total{listener=\"web\",result=\"rejected\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_downstream_connections_active{listener=\"web\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_endpoints_answer_and_metrics_count_per_backend() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = start_proxy(&simple_config(&[&a, &b], "")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    for _ in 0..4 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert_eq!(get(addr, "/status/503").await.status, 503);
    assert_eq!(admin_get(&proxy, "/healthz").await.status, 200);
    assert_eq!(admin_get(&proxy, "/readyz").await.status, 200);
    let m = admin_get(&proxy, "/metrics").await.body;
    for (backend, n) in [(a.addr, 2), (b.addr, 2)] {
        let line = format!("sluice_upstream_requests_total{{backend=\"{backend}\",outcome=\"success\",upstream=\"app\"}} {n}");
        assert!(m.contains(&line), "missing {line} in\n{m}");
    }
    assert!(
        m.contains("outcome=\"http_5xx\",upstream=\"app\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sluice_http_requests_total{code=\"2xx\",listener=\"web\",upstream=\"app\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("sluice_http_requests_total{code=\"5xx\",listener=\"web\",upstream=\"app\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(
            "sluice_http_request_duration_seconds_count{listener=\"web\",upstream=\"app\"} 5"
        ),
        "{m}"
    );
    assert!(m.contains("sluice_upstream_in_flight{"), "{m}");
    assert!(
        m.contains("sluice_downstream_connections_active{listener=\"web\"}"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "sluice_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{m}"
    );

    let status: serde_json::Value =
        serde_json::from_str(&admin_get(&proxy, "/status").await.body).expect("json");
    let backends = status["upstreams"][0]["backends"]
        .as_array()
        .expect("backends");
    assert_eq!(backends.len(), 2);
    let total: u64 = backends
        .iter()
        .map(|b| b["requests_total"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 5);
    assert_eq!(status["config"]["hash"].as_str().map(str::len), Some(16));
}

#[tokio::test]
async fn status_requires_the_admin_token_when_set() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "listen = \"127.0.0.1:0\"\n\n[[listener]]",
        "listen = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n\n[[listener]]",
    );
    let proxy = start_proxy(&cfg).await;
    assert_eq!(admin_get(&proxy, "/status").await.status, 401);
    let req = Request::get(format!("http://{}/status", proxy.admin))
        .header("authorization", "Bearer s3cret")
        .body(empty())
        .expect("request");
    assert_eq!(send(&h1_client(), req).await.status, 200);
    assert_eq!(admin_get(&proxy, "/metrics").await.status, 200);
    assert_eq!(admin_get(&proxy, "/readyz").await.status, 200);
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "[[listener]]",
        "[shutdown]\ndrain_delay = \"0s\"\ngrace = \"10s\"\n\n[[listener]]",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let admin = proxy.admin;
    let slow = tokio::spawn(async move { get(addr, "/sleep/800").await });
    a.wait_hits(1).await;
    proxy.shutdown();
    assert_eq!(get(admin, "/readyz").await.status, 503);
    let answer = slow.await.expect("task");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, "a");
    tokio::time::timeout(Duration::from_secs(5), proxy.wait())
        .await
        .expect("shut down in time");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn demo_config_serves_three_distinct_backends() {
    let mut addrs = Vec::new();
    for n in 1..=3 {
        addrs.push(sluice::demo::spawn_backend(n).await.expect("backend"));
    }
    let text = sluice::demo::render_config("127.0.0.1:0", "127.0.0.1:0", &addrs);
    let proxy = start_proxy(&text).await;
    let addr = proxy.listener_addr("demo").expect("bound");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let body = get(addr, "/").await.body;
        seen.insert(body.split(' ').nth(2).unwrap_or("").to_owned());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let m = admin_get(&proxy, "/metrics").await.body;
    for a in &addrs {
        assert!(
            m.contains(&format!(
                "backend=\"{a}\",outcome=\"success\",upstream=\"demo\"}} 2"
            )),
            "{m}"
        );
    }
}

#[tokio::test]
async fn backend_connections_are_kept_alive_and_reused() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&with_workers(1, &simple_config(&[&a], ""))).await;
    let addr = proxy.listener_addr("web").expect("bound");
    for _ in 0..20 {
        // A new client connection each time: the backend side is pooled.
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert_eq!(a.hits(), 20);
    assert_eq!(
        a.conns(),
        1,
        "one pooled backend connection served every request"
    );
}

/// With two workers, client connections are spread over both, and each
/// worker keeps its own pooled backend connection: two at most, however
/// many requests.
#[tokio::test]
async fn each_worker_reuses_its_own_backend_connections() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&with_workers(2, &simple_config(&[&a], ""))).await;
    let addr = proxy.listener_addr("web").expect("bound");
    for _ in 0..40 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert_eq!(a.hits(), 40);
    let conns = a.conns();
    assert!((1..=2).contains(&conns), "{conns} backend connections");
    let m = admin_get(&proxy, "/metrics").await.body;
    let served = worker_connections(&m, 2);
    assert!(served.iter().all(|&n| n > 0.0), "{served:?}\n{m}");
}

#[tokio::test]
async fn pool_idle_timeout_closes_idle_backend_connections() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(
        &[&a],
        "pool = { max_idle_per_backend = 4, idle_timeout = \"200ms\" }",
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("bound");
    assert_eq!(get(addr, "/").await.status, 200);
    assert_eq!(a.conns(), 1);
    // The proxy closes the idle pooled connection after idle_timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.closed() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle backend connection never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(addr, "/").await.status, 200);
    assert_eq!(
        a.conns(),
        2,
        "a new connection after the idle one was closed"
    );
}

#[tokio::test]
async fn pool_of_zero_idle_connections_opens_one_per_request() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(
        &[&a],
        "pool = { max_idle_per_backend = 0, idle_timeout = \"90s\" }",
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("bound");
    for _ in 0..5 {
        assert_eq!(get(addr, "/").await.status, 200);
    }
    assert_eq!(a.conns(), 5);
}

#[tokio::test]
async fn a_full_backend_bulkhead_makes_it_ineligible_until_it_has_room() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = start_proxy(&simple_config(
        &[&a, &b],
        "max_in_flight = 0\nmax_in_flight_per_backend = 1",
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("bound");
    let slow1 = tokio::spawn(async move { get(addr, "/sleep/2000").await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.hits() + b.hits() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "slow request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (busy, free) = if a.hits() == 1 {
        ("a", "b")
    } else {
        ("b", "a")
    };
    // Round robin would alternate; the full backend is skipped instead.
    for _ in 0..6 {
        assert_eq!(get(addr, "/").await.body, free, "{busy} is full");
    }
    let slow2 = tokio::spawn(async move { get(addr, "/sleep/2000").await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.hits() + b.hits() < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "second slow request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let none = get(addr, "/").await;
    assert_eq!(none.status, 503);
    assert_eq!(none.headers["sluice-error"], "no-healthy-backend");
    // Shed at once, not queued for a slot: both slow requests still run.
    assert!(
        !slow1.is_finished() && !slow2.is_finished(),
        "the 503 waited"
    );
    assert_eq!(slow1.await.expect("task").status, 200);
    assert_eq!(slow2.await.expect("task").status, 200);
    // With room again, both take requests.
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(get(addr, "/").await.body);
    }
    assert_eq!(tally(&bodies).len(), 2, "{bodies:?}");
}

#[tokio::test]
async fn health_checks_take_a_dead_backend_out_and_bring_it_back() {
    let live = Backend::start("live").await;
    let (held, dead_addr) = dead_addr();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{dead_addr}\", \"{}\"]\n\
         health_check = {{ path = \"/\", interval = \"50ms\", timeout = \"200ms\", healthy_threshold = 2, unhealthy_threshold = 2 }}\n",
        live.addr
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    wait_backend_up(&proxy, dead_addr, 0.0).await;
    for _ in 0..10 {
        let answer = get(addr, "/").await;
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "live")
        );
    }
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(&proxy, "/status").await.body).expect("json");
    assert_eq!(status["upstreams"][0]["backends"][0]["health"], "down");

    // The backend comes back on its address: it rejoins after two passes.
    drop(held);
    let revived = Backend::start_at("revived", dead_addr).await;
    wait_backend_up(&proxy, dead_addr, 1.0).await;
    let mut bodies = Vec::new();
    for _ in 0..10 {
        bodies.push(get(addr, "/").await.body);
    }
    assert_eq!(tally(&bodies).get("revived"), Some(&5), "{bodies:?}");
    let m = admin_get(&proxy, "/metrics").await.body;
    let failures = format!(
        "sluice_health_checks_total{{backend=\"{dead_addr}\",result=\"failure\",upstream=\"app\"}} "
    );
    assert!(metric(&m, &failures).is_some_and(|n| n >= 2.0), "{m}");
    drop(revived);
}

#[tokio::test]
async fn tcp_health_checks_mark_a_refusing_backend_down() {
    let live = Backend::start("live").await;
    let (_held, dead_addr) = dead_addr();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{dead_addr}\", \"{}\"]\n\
         health_check = {{ kind = \"tcp\", interval = \"50ms\", unhealthy_threshold = 1 }}\n",
        live.addr
    );
    let proxy = start_proxy(&cfg).await;
    wait_backend_up(&proxy, dead_addr, 0.0).await;
    wait_backend_up(&proxy, live.addr, 1.0).await;
}

#[tokio::test]
async fn a_failing_backend_trips_its_circuit_and_a_half_open_probe_closes_it() {
    let (bad, good) = (Backend::start("bad").await, Backend::start("good").await);
    bad.force_status(503);
    let cfg = simple_config(
        &[&bad, &good],
        "circuit_breaker = { consecutive_failures = 3, open_for = \"300ms\", open_for_max = \"5s\" }",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut codes = Vec::new();
    for _ in 0..20 {
        codes.push(get(addr, "/").await.status.as_u16());
    }
    // Three failures open the circuit; everything after goes to "good".
    assert_eq!(bad.hits(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 503).count(), 3);
    let m = admin_get(&proxy, "/metrics").await.body;
    let state = format!(
        "sluice_backend_circuit_state{{backend=\"{}\",upstream=\"app\"}} ",
        bad.addr
    );
    assert_eq!(metric(&m, &state), Some(2.0), "{m}");

    // The backend recovers; once open_for has passed, one probe closes it.
    bad.force_status(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        get(addr, "/").await;
        let m = admin_get(&proxy, "/metrics").await.body;
        if metric(&m, &state) == Some(0.0) {
            let closed = format!(
                "sluice_circuit_transitions_total{{backend=\"{}\",to=\"closed\",upstream=\"app\"}} ",
                bad.addr
            );
            assert_eq!(metric(&m, &closed), Some(1.0), "{m}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "circuit never closed:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(get(addr, "/").await.body);
    }
    assert_eq!(
        tally(&bodies).len(),
        2,
        "both backends serve again: {bodies:?}"
    );
}

fn retry_config(backends: &[&Backend], retry: &str) -> String {
    simple_config(backends, &format!("max_in_flight = 0\n{retry}"))
}

#[tokio::test]
async fn idempotent_requests_are_retried_on_another_backend() {
    let (_held, dead) = dead_addr();
    let (bad, good) = (Backend::start("bad").await, Backend::start("good").await);
    bad.force_status(503);
    // The default policy retries connect failures; this one 503s too.
    let cfg = retry_config(
        &[&bad, &good],
        // A generous budget: this test is about where retries go.
        "retry = { on = [\"connect-failure\", \"503\"], budget = 10 }",
    )
    .replace("backends = [", &format!("backends = [\"{dead}\", "));
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    for _ in 0..30 {
        let answer = get(addr, "/").await;
        assert_eq!(
            (answer.status.as_u16(), answer.body.as_str()),
            (200, "good")
        );
    }
    let m = admin_get(&proxy, "/metrics").await.body;
    for reason in ["connect-failure", "503"] {
        let line = format!("sluice_retries_total{{reason=\"{reason}\",upstream=\"app\"}} ");
        assert!(
            metric(&m, &line).is_some_and(|n| n >= 1.0),
            "{reason}:\n{m}"
        );
    }
}

#[tokio::test]
async fn non_idempotent_requests_are_not_retried() {
    let (bad, good) = (Backend::start("bad").await, Backend::start("good").await);
    bad.force_status(503);
    let proxy = start_proxy(&retry_config(&[&bad, &good], "retry = { on = [\"503\"] }")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let req = Request::post(format!("http://{addr}/"))
            .body(empty())
            .expect("request");
        statuses.push(send(&h1_client(), req).await.status.as_u16());
    }
    // Round robin: every other POST reaches "bad" and its 503 comes back.
    assert_eq!(
        statuses.iter().filter(|&&s| s == 503).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(bad.hits(), 5);
    // With an Idempotency-Key the client allows a retry.
    for _ in 0..10 {
        let req = Request::post(format!("http://{addr}/"))
            .header("idempotency-key", "k")
            .body(empty())
            .expect("request");
        assert_eq!(send(&h1_client(), req).await.status, 200);
    }
}

#[tokio::test]
async fn the_retry_budget_caps_amplification_when_every_backend_fails() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    a.force_status(503);
    b.force_status(503);
    let proxy = start_proxy(&retry_config(
        &[&a, &b],
        "retry = { attempts = 5, on = [\"503\"], backoff_base = \"1ms\", backoff_max = \"2ms\", budget = 0.2 }",
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("bound");
    let requests = 200;
    for _ in 0..requests {
        assert_eq!(get(addr, "/").await.status, 503);
    }
    let hits = a.hits() + b.hits();
    let cap = requests + requests / 5 + sluice::resilience::retry::MIN_RETRIES_PER_WINDOW as usize;
    eprintln!("{requests} requests, every backend failing: {hits} backend hits (cap {cap})");
    assert!(hits <= cap, "{hits} backend hits for {requests} requests");
    assert!(hits > requests, "some retries happened");
}

#[tokio::test]
async fn with_every_backend_down_the_answer_is_an_immediate_503() {
    let (_held, dead): (Vec<_>, Vec<_>) = (0..2).map(|_| dead_addr()).unzip();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\", \"{}\"]\n\
         health_check = {{ kind = \"tcp\", interval = \"50ms\", unhealthy_threshold = 1 }}\n",
        dead[0], dead[1]
    );
    let proxy = start_proxy(&cfg).await;
    for addr in &dead {
        wait_backend_up(&proxy, *addr, 0.0).await;
    }
    let answer = get(proxy.listener_addr("web").expect("bound"), "/").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["sluice-error"], "no-healthy-backend");
    let m = admin_get(&proxy, "/metrics").await.body;
    // Answered without trying a backend that is known to be down.
    for addr in &dead {
        let tries: Vec<&str> = m
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "sluice_upstream_requests_total{{backend=\"{addr}\""
                ))
            })
            .collect();
        assert!(
            !tries.is_empty() && tries.iter().all(|l| l.ends_with(" 0")),
            "{tries:?}"
        );
    }
    assert!(
        m.contains("sluice_load_shed_total{reason=\"no_healthy_backend\",upstream=\"app\"} 1"),
        "{m}"
    );
}

#[tokio::test]
async fn a_backend_back_from_down_ramps_up_under_slow_start() {
    let steady = Backend::start("steady").await;
    let returning = free_addr();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{returning}\", \"{}\"]\nslow_start = \"20s\"\n\
         health_check = {{ kind = \"tcp\", interval = \"50ms\", healthy_threshold = 1, unhealthy_threshold = 1 }}\n",
        steady.addr
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    wait_backend_up(&proxy, returning, 0.0).await;
    let back = Backend::start_at("returning", returning).await;
    wait_backend_up(&proxy, returning, 1.0).await;
    let mut bodies = Vec::new();
    for _ in 0..100 {
        bodies.push(get(addr, "/").await.body);
    }
    // Round robin alone would send it 50; seconds into a 20 s ramp it
    // gets a few percent.
    let share = tally(&bodies).get("returning").copied().unwrap_or(0);
    eprintln!("share of a backend 0-1 s into a 20 s slow start: {share}/100");
    assert!(share < 20, "{share} of 100 requests");
    drop(back);
}

#[tokio::test]
async fn first_bytes_arriving_in_pieces_still_pick_the_protocol() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");

    // HTTP/1.1: one byte, then the rest.
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"G").await.expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    conn.write_all(b"ET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    conn.read_to_string(&mut text).await.expect("read");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("a"), "{text}");

    // h2c: half the preface, then the rest and an empty SETTINGS frame;
    // the proxy answers with its own SETTINGS frame.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(&preface[..10]).await.expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    conn.write_all(&preface[10..]).await.expect("write");
    conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("write");
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut frame))
        .await
        .expect("answered")
        .expect("read");
    assert_eq!(frame[3], 4, "a SETTINGS frame: {frame:?}");
}

/// The worker's poller turns (`runtime.busy_poll`) while `during` elapses.
/// The proxy runs on the test's thread: one worker, the test's runtime.
async fn poller_turns_during(during: Duration) -> u64 {
    let before = sluice::runtime::busy_poll::turns();
    tokio::time::sleep(during).await;
    sluice::runtime::busy_poll::turns() - before
}

#[tokio::test]
async fn with_busy_poll_the_worker_polls_after_requests_and_sleeps_when_quiet() {
    let a = Backend::start("a").await;
    let runtime = "workers = 1\nbusy_poll = \"100ms\"";
    let proxy = start_proxy(&with_runtime(runtime, &simple_config(&[&a], ""))).await;
    let addr = proxy.listener_addr("web").expect("bound");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(poller_turns_during(Duration::from_millis(100)).await, 0);
    for _ in 0..2 {
        assert_eq!(get(addr, "/").await.body, "a");
        assert!(
            poller_turns_during(Duration::from_millis(30)).await > 0,
            "a request starts the polling"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            poller_turns_during(Duration::from_millis(100)).await,
            0,
            "a quiet window ends it"
        );
    }
}

/// With `busy_poll_interval` the worker polls at most once per interval
/// between requests, answers them all the same, and still stops polling
/// once a window passes without one.
#[tokio::test]
async fn with_a_busy_poll_interval_the_worker_sleeps_between_polls() {
    let a = Backend::start("a").await;
    let runtime = "workers = 1\nbusy_poll = \"200ms\"\nbusy_poll_interval = \"10ms\"";
    let proxy = start_proxy(&with_runtime(runtime, &simple_config(&[&a], ""))).await;
    let addr = proxy.listener_addr("web").expect("bound");
    for _ in 0..2 {
        assert_eq!(get(addr, "/").await.body, "a");
        let started = std::time::Instant::now();
        let turns = poller_turns_during(Duration::from_millis(50)).await;
        // A sleep is never shorter than asked; 2 for the turns at the ends.
        let most = started.elapsed().as_millis() as u64 / 10 + 2;
        assert!(turns > 0 && turns <= most, "{turns} turns, at most {most}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            poller_turns_during(Duration::from_millis(100)).await,
            0,
            "a quiet window ends it"
        );
    }
}
