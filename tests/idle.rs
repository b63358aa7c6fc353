//! Idle keep-alive HTTP/1 connections: parked off the runtime after a short
//! wait, and served again, closed at their idle timeout, or closed at
//! shutdown, exactly as if they had stayed on their own tasks.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sluice::runtime::Running;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one response with a `content-length` body from `stream`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// Opens `n` connections that each carry one request and then stay open.
async fn idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let resp = read_response(&mut s).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        conns.push(s);
    }
    conns
}

/// A metric of the listener `web`.
async fn web_metric(proxy: &Running, name: &str) -> f64 {
    let text = admin_get(proxy, "/metrics").await.body;
    metric(&text, &format!("{name}{{listener=\"web\"}} ")).unwrap_or(0.0)
}

/// Polls until the listener has `n` parked connections.
async fn wait_parked(proxy: &Running, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let parked = web_metric(proxy, "sluice_downstream_connections_parked").await;
        if parked == n as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{parked} connections parked, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn parked_connections_serve_their_next_requests() {
    let a = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&a], "")).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut conns = idle_connections(addr, 20).await;
    wait_parked(&proxy, 20).await;
    assert_eq!(
        web_metric(&proxy, "sluice_downstream_connections_active").await,
        20.0,
        "parked connections are still open connections"
    );

    for round in 0..2 {
        for s in &mut conns {
            s.write_all(b"GET /headers HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("write");
            let resp = read_response(s).await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
            assert!(resp.contains("x-forwarded-for: 127.0.0.1"), "{resp}");
        }
        // Served again, they go idle and park again.
        wait_parked(&proxy, 20).await;
        assert_eq!(a.hits(), 20 + 20 * (round + 1));
    }

    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(10);
    while web_metric(&proxy, "sluice_downstream_connections_active").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "closed clients left open connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_parked(&proxy, 0).await;
}

#[tokio::test]
async fn a_parked_connection_closes_at_its_idle_timeout() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\ntimeouts = { idle = \"1s\" }\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut conns = idle_connections(addr, 1).await;
    let answered = Instant::now();
    wait_parked(&proxy, 1).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), conns[0].read(&mut buf))
        .await
        .expect("closed by the proxy in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without another byte");
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?}");
    wait_parked(&proxy, 0).await;
    assert_eq!(
        web_metric(&proxy, "sluice_downstream_connections_active").await,
        0.0
    );
}

#[tokio::test]
async fn shutdown_closes_parked_connections_and_finishes() {
    let a = Backend::start("a").await;
    let cfg = format!(
        "{}\n[shutdown]\ndrain_delay = \"0s\"\ngrace = \"10s\"\n",
        simple_config(&[&a], "")
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut conns = idle_connections(addr, 5).await;
    wait_parked(&proxy, 5).await;
    proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(5), proxy.wait())
        .await
        .expect("shutdown finished without waiting for parked connections");
    for s in &mut conns {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}

#[tokio::test]
async fn the_proxy_protocol_client_survives_parking() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\nproxy_protocol = true\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 80\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    wait_parked(&proxy, 1).await;
    s.write_all(b"GET /headers HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let resp = read_response(&mut s).await;
    assert!(resp.contains("x-forwarded-for: 203.0.113.7"), "{resp}");
}

#[tokio::test]
async fn parked_connections_count_against_max_connections() {
    let a = Backend::start("a").await;
    let cfg = simple_config(&[&a], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\nmax_connections = 3\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let _conns = idle_connections(addr, 3).await;
    wait_parked(&proxy, 3).await;
    // The fourth is accepted and closed at once.
    let refused = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        refused, "",
        "a connection over max_connections got an answer"
    );
    assert_eq!(a.hits(), 3);
}
