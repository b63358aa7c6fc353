//! L4 end to end: TCP sessions, failover, half-close, PROXY protocol and
//! TLS passthrough routed by SNI, with real sockets and real TLS.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice::proxy::proxy_protocol::{self, ProxyHeader};
use support::{admin_get, start_proxy, wait_metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP backend: each accepted connection is handed to `serve`.
struct TcpBackend {
    addr: SocketAddr,
    sessions: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpBackend {
    async fn start<F, Fut>(serve: F) -> TcpBackend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let sessions = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&sessions);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = socket.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        TcpBackend {
            addr,
            sessions,
            task,
        }
    }

    /// Echoes every byte back, then closes when the client half-closes.
    async fn echo() -> TcpBackend {
        TcpBackend::start(|mut s: TcpStream| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// Answers `name` then echoes: tells which backend a session reached.
    async fn named(name: &'static str) -> TcpBackend {
        TcpBackend::start(move |mut s: TcpStream| async move {
            let _ = s.write_all(name.as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }
}

fn tcp_config(listener_extra: &str, backends: &[SocketAddr], upstream_extra: &str) -> String {
    let list = backends
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"l4\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n{listener_extra}\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [{list}]\n{upstream_extra}\n"
    )
}

async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    buf
}

#[tokio::test]
async fn bytes_flow_both_ways_and_sessions_are_counted() {
    let echo = TcpBackend::echo().await;
    let proxy = start_proxy(&tcp_config("upstream = \"app\"", &[echo.addr], "")).await;
    let addr = proxy.listener_addr("l4").expect("bound");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"hello over tcp").await.expect("write");
    assert_eq!(read_n(&mut s, 14).await, b"hello over tcp");

    let m = admin_get(&proxy, "/metrics").await.body;
    let in_flight = format!(
        "sluice_upstream_in_flight{{backend=\"{}\",upstream=\"app\"}} 1",
        echo.addr
    );
    assert!(m.contains(&in_flight), "an open session is in flight:\n{m}");

    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("eof");
    assert!(rest.is_empty());
    drop(s);
    // The session ends once both directions have closed.
    let closed = in_flight.replace("} 1", "} 0");
    let m = wait_metrics(&proxy, |m| m.contains(&closed)).await;
    let backend = echo.addr;
    let success = format!(
        "sluice_upstream_requests_total{{backend=\"{backend}\",outcome=\"success\",upstream=\"app\"}} 1"
    );
    for line in [
        "sluice_tcp_bytes_total{direction=\"rx\",listener=\"l4\"} 14",
        "sluice_tcp_bytes_total{direction=\"tx\",listener=\"l4\"} 14",
        &success,
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
}

#[tokio::test]
async fn client_half_close_reaches_the_backend_which_still_answers() {
    // The backend reads to EOF, then answers with the byte count.
    let sink = TcpBackend::start(|mut s: TcpStream| async move {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all).await;
        let _ = s.write_all(format!("got {}", all.len()).as_bytes()).await;
    })
    .await;
    let proxy = start_proxy(&tcp_config("upstream = \"app\"", &[sink.addr], "")).await;
    let mut s = TcpStream::connect(proxy.listener_addr("l4").expect("bound"))
        .await
        .expect("connect");
    s.write_all(&[7u8; 100_000]).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(answer, "got 100000");
}

#[tokio::test]
async fn backend_half_close_reaches_the_client_which_can_still_send() {
    // The backend greets, half-closes, then reads what the client sends.
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&got);
    let backend = TcpBackend::start(move |mut s: TcpStream| {
        let seen = Arc::clone(&seen);
        async move {
            let _ = s.write_all(b"bye").await;
            let _ = s.shutdown().await;
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all).await;
            if let Ok(mut g) = seen.lock() {
                *g = all;
            }
        }
    })
    .await;
    let proxy = start_proxy(&tcp_config("upstream = \"app\"", &[backend.addr], "")).await;
    let mut s = TcpStream::connect(proxy.listener_addr("l4").expect("bound"))
        .await
        .expect("connect");
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut greeting))
        .await
        .expect("EOF passed on")
        .expect("read");
    assert_eq!(greeting, b"bye");
    s.write_all(b"still here").await.expect("write after EOF");
    s.shutdown().await.expect("half-close");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.lock().map(|g| g.is_empty()).unwrap_or(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend never got the late bytes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(&*got.lock().expect("lock"), b"still here");
}

#[tokio::test]
async fn a_refusing_backend_fails_over_with_no_client_error() {
    let (_held, dead) = support::dead_addr();
    let echo = TcpBackend::echo().await;
    let proxy = start_proxy(&tcp_config("upstream = \"app\"", &[dead, echo.addr], "")).await;
    let addr = proxy.listener_addr("l4").expect("bound");
    for i in 0..10u8 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&[i; 3]).await.expect("write");
        assert_eq!(read_n(&mut s, 3).await, [i; 3], "session {i} served");
    }
    assert_eq!(echo.sessions(), 10);
    let m = admin_get(&proxy, "/metrics").await.body;
    let failures = format!(
        "sluice_upstream_requests_total{{backend=\"{dead}\",outcome=\"connect_failure\",upstream=\"app\"}} "
    );
    let count: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix(&failures))
        .and_then(|n| n.parse().ok())
        .expect("connect failures counted");
    assert!(
        count >= 1,
        "the dead backend was tried and failed over:\n{m}"
    );
}

#[tokio::test]
async fn least_conn_counts_open_sessions() {
    let (a, b) = (TcpBackend::named("a").await, TcpBackend::named("b").await);
    let proxy = start_proxy(&tcp_config(
        "upstream = \"app\"",
        &[a.addr, b.addr],
        "balancer = \"least_conn\"",
    ))
    .await;
    let addr = proxy.listener_addr("l4").expect("bound");
    let mut held = Vec::new();
    let mut names = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        names.push(String::from_utf8(read_n(&mut s, 1).await).expect("utf8"));
        held.push(s);
    }
    // With every session still open, least_conn alternates: 3 and 3.
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 3, "{names:?}");
    // Close two sessions on a and wait until the proxy has ended them: a
    // then has 1 open and b 3, so the next two sessions both go to a.
    let mut kept = Vec::new();
    let mut closed = 0;
    for (n, s) in names.iter().zip(held) {
        if n == "a" && closed < 2 {
            drop(s);
            closed += 1;
        } else {
            kept.push(s);
        }
    }
    wait_in_flight(&proxy, a.addr, 1).await;
    wait_in_flight(&proxy, b.addr, 3).await;
    let mut again = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        again.push(String::from_utf8(read_n(&mut s, 1).await).expect("utf8"));
        kept.push(s);
    }
    assert_eq!(again, ["a", "a"]);
}

/// Waits until `backend` of upstream "app" has `n` open sessions.
async fn wait_in_flight(proxy: &sluice::runtime::Running, backend: SocketAddr, n: usize) {
    let want = format!("sluice_upstream_in_flight{{backend=\"{backend}\",upstream=\"app\"}} {n}\n");
    wait_metrics(proxy, |m| m.contains(&want)).await;
}

#[tokio::test]
async fn idle_sessions_are_closed_after_the_idle_timeout() {
    let echo = TcpBackend::echo().await;
    let proxy = start_proxy(&tcp_config(
        "upstream = \"app\"\ntimeouts = { idle = \"300ms\" }",
        &[echo.addr],
        "",
    ))
    .await;
    let mut s = TcpStream::connect(proxy.listener_addr("l4").expect("bound"))
        .await
        .expect("connect");
    s.write_all(b"x").await.expect("write");
    assert_eq!(read_n(&mut s, 1).await, b"x");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed by the proxy")
        .expect("read");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

/// A backend that reads a PROXY header, then answers with the client
/// address it names.
async fn proxy_aware_backend() -> TcpBackend {
    TcpBackend::start(|mut s: TcpStream| async move {
        let answer = match proxy_protocol::read_header(&mut s, Duration::from_secs(5)).await {
            Ok(ProxyHeader::Proxied { source, .. }) => format!("client {source}"),
            Ok(ProxyHeader::Local) => "local".to_owned(),
            Err(e) => format!("error {e}"),
        };
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn proxy_protocol_round_trip_v1_in_v2_out_and_v2_in_v1_out() {
    let backend = proxy_aware_backend().await;
    let client: SocketAddr = "203.0.113.7:4242".parse().expect("addr");
    let dest: SocketAddr = "198.51.100.1:5432".parse().expect("addr");
    for (incoming, outgoing) in [
        (proxy_protocol::encode_v1(client, dest), "v2"),
        (proxy_protocol::encode_v2(client, dest), "v1"),
    ] {
        let proxy = start_proxy(&tcp_config(
            "upstream = \"app\"\nproxy_protocol = true",
            &[backend.addr],
            &format!("send_proxy_protocol = \"{outgoing}\""),
        ))
        .await;
        let mut s = TcpStream::connect(proxy.listener_addr("l4").expect("bound"))
            .await
            .expect("connect");
        s.write_all(&incoming).await.expect("write header");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(answer, "client 203.0.113.7:4242", "sent {outgoing}");
    }
}

#[tokio::test]
async fn http_listener_uses_the_proxy_protocol_client_for_forwarded_for() {
    let backend = support::Backend::start("a").await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\nproxy_protocol = true\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n",
        backend.addr
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("bound");
    let header = proxy_protocol::encode_v1(
        "192.0.2.33:1111".parse().expect("addr"),
        "192.0.2.1:80".parse().expect("addr"),
    );
    let mut bytes = header;
    bytes.extend_from_slice(b"GET /headers HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let raw = support::raw_exchange(addr, &bytes, Duration::from_secs(5)).await;
    assert!(raw.contains("x-forwarded-for: 192.0.2.33\n"), "{raw}");
}

#[tokio::test]
async fn malformed_proxy_headers_close_the_connection_and_are_counted() {
    let echo = TcpBackend::echo().await;
    let proxy = start_proxy(&tcp_config(
        "upstream = \"app\"\nproxy_protocol = true\ntimeouts = { client_header = \"300ms\", idle = \"10s\" }",
        &[echo.addr],
        "",
    ))
    .await;
    let addr = proxy.listener_addr("l4").expect("bound");
    let v2 = proxy_protocol::encode_v2(
        "10.0.0.1:1".parse().expect("a"),
        "10.0.0.2:2".parse().expect("a"),
    );
    let mut bad_v2_version = v2.clone();
    bad_v2_version[12] = 0x11;
    let mut bad_v2_command = v2.clone();
    bad_v2_command[12] = 0x22;
    let mut bad_v2_family = v2.clone();
    bad_v2_family[13] = 0x41;
    let mut bad_v2_short = v2.clone();
    bad_v2_short[15] = 4;
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n".to_vec(),
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n".to_vec(),
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n".to_vec(),
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 extra\r\n".to_vec(),
        [b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".as_slice(), &[b' '; 100]].concat(),
        b"PROXY\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n".to_vec(),
        bad_v2_version,
        bad_v2_command,
        bad_v2_family,
        bad_v2_short,
        b"\r\n\r\n\0\r\nQUIT\x0b".to_vec(),
        b"PROXY TCP4 1.2.3.4".to_vec(), // truncated: times out
    ];
    for (i, case) in cases.iter().enumerate() {
        let raw = support::raw_exchange(addr, case, Duration::from_secs(5)).await;
        assert_eq!(raw, "", "case {i}: closed without an answer");
    }
    assert_eq!(echo.sessions(), 0, "no malformed header reached a backend");
    let m = admin_get(&proxy, "/metrics").await.body;
    let line = format!(
        "sluice_downstream_protocol_errors_total{{kind=\"proxy_protocol\",listener=\"l4\"}} {}",
        cases.len()
    );
    assert!(m.contains(&line), "missing {line}:\n{m}");
}

// ---------------------------------------------------------------------------
// TLS passthrough

/// A TLS server with a certificate for `name`, answering `name` inside TLS.
async fn tls_backend(
    name: &'static str,
) -> (TcpBackend, rustls::pki_types::CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert");
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let backend = TcpBackend::start(move |s: TcpStream| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok(mut tls) = acceptor.accept(s).await {
                let _ = tls.write_all(name.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        }
    })
    .await;
    (backend, cert)
}

async fn tls_get(
    addr: SocketAddr,
    server_name: &str,
    trust: &[rustls::pki_types::CertificateDer<'static>],
) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for c in trust {
        roots.add(c.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("name");
    let mut tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, stream))
        .await
        .expect("handshake in time")
        .expect("handshake verifies the backend's own certificate");
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    answer
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni_to_backends_with_their_own_certificates() {
    let (one, cert_one) = tls_backend("one.example.com").await;
    let (two, cert_two) = tls_backend("two.db.example.com").await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ntls_passthrough = true\nupstream = \"one\"\n\
         [[listener.route]]\nsni = \"*.db.example.com\"\nupstream = \"two\"\n\
         [[upstream]]\nname = \"one\"\nbackends = [\"{}\"]\n[[upstream]]\nname = \"two\"\nbackends = [\"{}\"]\n",
        one.addr, two.addr
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("tls").expect("bound");
    let trust = [cert_one, cert_two];
    assert_eq!(
        tls_get(addr, "two.db.example.com", &trust).await,
        "two.db.example.com"
    );
    assert_eq!(
        tls_get(addr, "one.example.com", &trust).await,
        "one.example.com"
    );
    assert_eq!((one.sessions(), two.sessions()), (1, 1));
}

#[tokio::test]
async fn a_client_hello_split_into_tiny_segments_still_routes_and_arrives_untouched() {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    let recorder = TcpBackend::start(move |mut s: TcpStream| {
        let sink = Arc::clone(&sink);
        async move {
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all).await;
            if let Ok(mut g) = sink.lock() {
                *g = all;
            }
        }
    })
    .await;
    let other = TcpBackend::echo().await;
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ntls_passthrough = true\nupstream = \"other\"\n\
         [[listener.route]]\nsni = \"split.example.com\"\nupstream = \"rec\"\n\
         [[upstream]]\nname = \"rec\"\nbackends = [\"{}\"]\n[[upstream]]\nname = \"other\"\nbackends = [\"{}\"]\n",
        recorder.addr, other.addr
    );
    let proxy = start_proxy(&cfg).await;
    // A real ClientHello from rustls.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("split.example.com").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("client hello");

    let mut s = TcpStream::connect(proxy.listener_addr("tls").expect("bound"))
        .await
        .expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for chunk in hello.chunks(3) {
        s.write_all(chunk).await.expect("write");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.shutdown().await.expect("half-close");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while received.lock().map(|g| g.is_empty()).unwrap_or(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the recorder got nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        *received.lock().expect("lock"),
        hello,
        "bytes reach the backend untouched"
    );
    assert_eq!(other.sessions(), 0);
}

#[tokio::test]
async fn a_non_tls_client_on_a_passthrough_listener_is_closed_and_counted() {
    let echo = TcpBackend::echo().await;
    let cfg = tcp_config(
        "tls_passthrough = true\nupstream = \"app\"",
        &[echo.addr],
        "",
    );
    let proxy = start_proxy(&cfg).await;
    let raw = support::raw_exchange(
        proxy.listener_addr("l4").expect("bound"),
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(raw, "");
    assert_eq!(echo.sessions(), 0);
    let m = admin_get(&proxy, "/metrics").await.body;
    assert!(
        m.contains(
            "sluice_downstream_protocol_errors_total{kind=\"client_hello\",listener=\"l4\"} 1"
        ),
        "{m}"
    );
}
