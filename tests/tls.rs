//! TLS: termination on listeners (SNI certificates, ALPN, TLS 1.2 and 1.3,
//! client certificates, certificate reload) and TLS to backends
//! (verification, SNI, ALPN, client certificates, health checks), with
//! certificates made in each test, real sockets, curl and rustls clients.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::version::{TLS12, TLS13};
use rustls::ClientConfig;
use sluice::runtime::Running;
use support::pki::{any_cert_client, tls_backend, tls_connect, Issued, Pki, Sender, TlsAnswer};
use support::process::Proc;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `[{ cert = "...", key = "..." }, ...]`.
fn certs(list: &[&Issued]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|i| format!("{{ cert = {:?}, key = {:?} }}", path(&i.cert), path(&i.key)))
        .collect();
    format!("[{}]", items.join(", "))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// One TLS listener `web` with `tls`, in front of `backend`.
fn tls_config(backend: &Backend, tls: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\ntls = {tls}\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n",
        backend.addr
    )
}

/// The listener `web` of [`tls_config`] with one certificate for
/// `site.test` and the `extra` listener keys, in front of backend `b1`.
struct Site {
    backend: Backend,
    pki: Pki,
    proxy: Running,
    addr: SocketAddr,
}

async fn site(extra: &str) -> Site {
    let backend = Backend::start("b1").await;
    let pki = Pki::new("Sluice Test CA");
    let cert = pki.server("site", &["site.test"], "site.test");
    let text = tls_config(
        &backend,
        &format!("{{ certificates = {} }}", certs(&[&cert])),
    )
    .replace("tls = ", &format!("{extra}\ntls = "));
    let proxy = start_proxy(&text).await;
    let addr = proxy.listener_addr("web").expect("web");
    Site {
        backend,
        pki,
        proxy,
        addr,
    }
}

/// One plain listener `web` in front of one backend at `backend`, whose
/// upstream has the `extra` keys (`tls = ...`, `protocol = ...`).
fn upstream_config(backend: SocketAddr, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{backend}\"]\n{extra}\n"
    )
}

/// The server certificate a handshake with `sni` gets.
async fn served_cert(addr: SocketAddr, sni: &str) -> Vec<u8> {
    let stream = tls_connect(
        addr,
        sni,
        any_cert_client(&["http/1.1"], rustls::ALL_VERSIONS),
    )
    .await
    .unwrap_or_else(|e| panic!("handshake with sni {sni}: {e}"));
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificates");
    certs[0].to_vec()
}

/// A TLS connection and one `GET path`, or why it failed.
async fn exchange(
    addr: SocketAddr,
    sni: &str,
    config: ClientConfig,
    path: &str,
) -> Result<TlsAnswer, String> {
    let stream = tls_connect(addr, sni, config)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut sender = Sender::over(stream)
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    sender
        .get(sni, path)
        .await
        .map_err(|e| format!("request: {e}"))
}

async fn metrics(proxy: &Running) -> String {
    admin_get(proxy, "/metrics").await.body
}

/// Polls `f` every 20 ms until it returns `Some`, for at most 10 s.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Termination

/// `curl` on PATH, or a failure that says how to install it.
fn curl_bin() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("curl"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`curl` not found on PATH: run .ci/install-tools (it installs Debian's `curl` package)"
        )
    })
}

/// Runs curl against `https://<name>:<port><path>` resolved to `addr`,
/// trusting `ca`; returns the body and the HTTP version it used.
async fn curl(ca: &Path, addr: SocketAddr, name: &str, path: &str, flag: &str) -> (String, String) {
    let args = vec![
        "-sS".to_owned(),
        "--max-time".to_owned(),
        "10".to_owned(),
        flag.to_owned(),
        "--cacert".to_owned(),
        ca.display().to_string(),
        "--resolve".to_owned(),
        format!("{name}:{}:127.0.0.1", addr.port()),
        "-w".to_owned(),
        "\n%{http_version}".to_owned(),
        format!("https://{name}:{}{path}", addr.port()),
    ];
    let bin = curl_bin();
    let out = tokio::task::spawn_blocking(move || Command::new(bin).args(&args).output())
        .await
        .expect("curl task")
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {flag} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, version) = stdout.rsplit_once('\n').expect("version line");
    (body.to_owned(), version.to_owned())
}

#[tokio::test]
async fn curl_gets_answers_over_http1_and_http2_through_a_tls_listener() {
    let Site {
        backend,
        pki,
        proxy: _proxy,
        addr,
    } = site("").await;

    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let (body, used) = curl(&pki.ca_path, addr, "site.test", "/headers", flag).await;
        assert_eq!(used, version, "curl {flag}");
        assert!(body.contains("x-forwarded-proto: https"), "{body}");
        assert!(body.contains("host: site.test:"), "{body}");
    }
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn each_handshake_gets_the_certificate_its_sni_names() {
    let backend = Backend::start("b1").await;
    let pki = Pki::new("Sluice Test CA");
    let default = pki.server("default", &["default.test"], "default");
    let wildcard = pki.server("wildcard", &["*.example.test"], "wildcard");
    let exact = pki.server("exact", &["api.example.test"], "exact");
    let tls = format!(
        "{{ certificates = {} }}",
        certs(&[&default, &wildcard, &exact])
    );
    let proxy = start_proxy(&tls_config(&backend, &tls)).await;
    let addr = proxy.listener_addr("web").expect("web");

    let cases: [(&str, &Issued); 8] = [
        ("api.example.test", &exact),
        ("API.Example.Test", &exact),
        ("www.example.test", &wildcard),
        ("default.test", &default),
        // A wildcard covers exactly one label.
        ("a.b.example.test", &default),
        ("example.test", &default),
        ("unknown.test", &default),
        // An IP address is not sent as SNI: no name at all.
        ("127.0.0.1", &default),
    ];
    for (sni, want) in cases {
        assert_eq!(served_cert(addr, sni).await, want.der.to_vec(), "sni {sni}");
    }
}

#[tokio::test]
async fn a_rustls_client_negotiates_alpn_over_tls_1_2_and_1_3() {
    let backend = Backend::start("b1").await;
    let pki = Pki::new("Sluice Test CA");
    let site = pki.server("site", &["site.test"], "site.test");
    let list = certs(&[&site]);
    let text = format!(
        "{}\n[[listener]]\nname = \"h1only\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         tls = {{ certificates = {list}, alpn = [\"http/1.1\"] }}\n",
        tls_config(&backend, &format!("{{ certificates = {list} }}"))
    );
    let proxy = start_proxy(&text).await;
    let web = proxy.listener_addr("web").expect("web");
    let h1only = proxy.listener_addr("h1only").expect("h1only");

    let cases = [
        (
            web,
            &["h2", "http/1.1"][..],
            Some(&b"h2"[..]),
            http::Version::HTTP_2,
        ),
        (
            web,
            &["http/1.1"][..],
            Some(&b"http/1.1"[..]),
            http::Version::HTTP_11,
        ),
        (web, &[][..], None, http::Version::HTTP_11),
        (
            h1only,
            &["h2", "http/1.1"][..],
            Some(&b"http/1.1"[..]),
            http::Version::HTTP_11,
        ),
    ];
    for version in [&TLS12, &TLS13] {
        for (addr, offer, alpn, http_version) in cases {
            let mut config = ClientConfig::builder_with_provider(support::pki::provider())
                .with_protocol_versions(&[version])
                .expect("versions")
                .with_root_certificates(pki.roots())
                .with_no_client_auth();
            config.alpn_protocols = offer.iter().map(|a| a.as_bytes().to_vec()).collect();
            let stream = tls_connect(addr, "site.test", config)
                .await
                .expect("handshake");
            let session = stream.get_ref().1;
            assert_eq!(session.protocol_version(), Some(version.version));
            assert_eq!(session.alpn_protocol(), alpn, "offered {offer:?}");
            let mut sender = Sender::over(stream).await.expect("http handshake");
            let answer = sender.get("site.test", "/headers").await.expect("answer");
            assert_eq!(answer.status, 200);
            assert_eq!(answer.version, http_version);
            assert!(
                answer.body.contains("x-forwarded-proto: https"),
                "{}",
                answer.body
            );
        }
    }
}

#[tokio::test]
async fn pipelined_requests_decrypted_in_one_read_are_all_answered() {
    let Site {
        backend,
        pki,
        proxy: _proxy,
        addr,
    } = site("").await;

    let mut stream = tls_connect(addr, "site.test", pki.client_config(&["http/1.1"]))
        .await
        .expect("handshake");
    // Two TLS records sent in one write: the server decrypts both in one
    // read, and the second request waits in rustls's plaintext buffer, not
    // in the socket, while the first is answered.
    let request = b"GET / HTTP/1.1\r\nhost: site.test\r\n\r\n";
    {
        use std::io::Write;
        let session = stream.get_mut().1;
        session.writer().write_all(request).expect("first record");
        session.writer().write_all(request).expect("second record");
    }
    stream.flush().await.expect("flush");
    let mut seen = Vec::new();
    let read_both = async {
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&seen)
            .matches("HTTP/1.1 200 OK")
            .count()
            < 2
        {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_both)
        .await
        .expect("both answers arrive");
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn a_proxy_protocol_header_comes_before_the_tls_handshake() {
    let Site {
        backend: _backend,
        pki,
        proxy: _proxy,
        addr,
    } = site("proxy_protocol = true").await;

    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n")
        .await
        .expect("proxy header");
    let name = rustls::pki_types::ServerName::try_from("site.test").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(pki.client_config(&["h2"])))
        .connect(name, tcp)
        .await
        .expect("handshake after the header");
    let mut sender = Sender::over(tls).await.expect("http handshake");
    let answer = sender.get("site.test", "/headers").await.expect("answer");
    assert!(
        answer.body.contains("x-forwarded-for: 203.0.113.7"),
        "{}",
        answer.body
    );
    assert!(
        answer.body.contains("x-forwarded-proto: https"),
        "{}",
        answer.body
    );
}

#[tokio::test]
async fn a_websocket_upgrade_runs_over_the_tls_connection() {
    let Site {
        backend: _backend,
        pki,
        proxy: _proxy,
        addr,
    } = site("").await;

    let mut stream = tls_connect(addr, "site.test", pki.client_config(&["http/1.1"]))
        .await
        .expect("handshake");
    websocket_echo(&mut stream, "site.test", &[b"ping", b"second frame"]).await;
}

#[tokio::test]
async fn a_silent_client_is_closed_after_client_header_and_counted() {
    let Site {
        backend,
        pki: _pki,
        proxy,
        addr,
    } = site("timeouts = { client_header = \"200ms\" }").await;

    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");

    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("200"),
        "plaintext was served"
    );

    let proxy = &proxy;
    let errors = eventually("handshake errors counted", || async move {
        let m = metrics(proxy).await;
        let n = metric(
            &m,
            "sluice_downstream_protocol_errors_total{kind=\"tls_handshake\",listener=\"web\"} ",
        )?;
        (n >= 2.0).then_some(n)
    })
    .await;
    assert_eq!(errors, 2.0);
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_is_served_to_the_next_handshake() {
    let backend = Backend::start("b1").await;
    let pki = Pki::new("Sluice Test CA");
    let first = pki.server("site", &["site.test"], "first");
    let proxy = start_proxy(&tls_config(
        &backend,
        &format!("{{ certificates = {} }}", certs(&[&first])),
    ))
    .await;
    let addr = proxy.listener_addr("web").expect("web");

    // A connection made before the swap keeps working, with its certificate.
    let stream = tls_connect(addr, "site.test", pki.client_config(&["http/1.1"]))
        .await
        .expect("handshake");
    assert_eq!(
        stream.get_ref().1.peer_certificates().expect("certs")[0],
        first.der
    );
    let mut early = Sender::over(stream).await.expect("http handshake");
    assert_eq!(
        early.get("site.test", "/").await.expect("answer").status,
        200
    );

    // Renamed into place, as certbot or a Kubernetes secret update does.
    let second = pki.server("next", &["site.test"], "second");
    std::fs::rename(&second.cert, &first.cert).expect("swap cert");
    std::fs::rename(&second.key, &first.key).expect("swap key");
    let want = second.der.to_vec();
    let want = &want;
    eventually("the new certificate is served", || async move {
        (served_cert(addr, "site.test").await == *want).then_some(())
    })
    .await;
    let proxy = &proxy;
    let m = metrics(proxy).await;
    assert_eq!(
        metric(
            &m,
            "sluice_tls_certificate_reloads_total{listener=\"web\",result=\"success\"} "
        ),
        Some(1.0)
    );
    assert_eq!(
        early.get("site.test", "/").await.expect("answer").status,
        200
    );
    assert_eq!(
        exchange(addr, "site.test", pki.client_config(&["h2"]), "/")
            .await
            .expect("a new client trusts the new certificate")
            .status,
        200
    );

    // A broken key is refused; the certificate in use stays.
    std::fs::write(
        &first.key,
        "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    )
    .expect("break key");
    eventually("the broken key is counted", || async move {
        let m = metrics(proxy).await;
        metric(
            &m,
            "sluice_tls_certificate_reloads_total{listener=\"web\",result=\"failure\"} ",
        )
        .filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(served_cert(addr, "site.test").await, second.der.to_vec());
    let m = metrics(proxy).await;
    assert_eq!(
        metric(
            &m,
            "sluice_tls_certificate_reloads_total{listener=\"web\",result=\"failure\"} "
        ),
        Some(1.0),
        "the same broken file is reported once"
    );
}

#[tokio::test]
async fn mutual_tls_accepts_a_good_client_and_rejects_missing_or_unknown_ones() {
    let backend = Backend::start("b1").await;
    let pki = Pki::new("Sluice Test CA");
    let site = pki.server("site", &["site.test"], "site.test");
    let alice = pki.client("alice", "alice");
    let stranger_ca = Pki::new("Someone Else's CA");
    let mallory = stranger_ca.client("mallory", "mallory");
    let list = certs(&[&site]);
    let ca = path(&pki.ca_path);
    let text = format!(
        "{}\n[[listener]]\nname = \"optional\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         tls = {{ certificates = {list}, client_ca = {ca:?}, client_auth = \"optional\" }}\n",
        tls_config(
            &backend,
            &format!("{{ certificates = {list}, client_ca = {ca:?} }}")
        )
    );
    let proxy = start_proxy(&text).await;
    let required = proxy.listener_addr("web").expect("web");
    let optional = proxy.listener_addr("optional").expect("optional");

    for addr in [required, optional] {
        for alpn in [&["http/1.1"][..], &["h2"][..]] {
            let good = exchange(
                addr,
                "site.test",
                pki.client_config_with_cert(alpn, &alice),
                "/",
            )
            .await;
            assert_eq!(good.expect("alice gets in").status, 200);
        }
        let unknown = exchange(
            addr,
            "site.test",
            pki.client_config_with_cert(&["http/1.1"], &mallory),
            "/",
        )
        .await;
        assert!(unknown.is_err(), "a certificate from another CA is refused");
    }
    let missing = exchange(required, "site.test", pki.client_config(&["http/1.1"]), "/").await;
    assert!(missing.is_err(), "no certificate is refused when required");
    let anonymous = exchange(optional, "site.test", pki.client_config(&["http/1.1"]), "/").await;
    assert_eq!(anonymous.expect("optional lets it in").status, 200);

    assert_eq!(backend.hits(), 5);
    let m = metrics(&proxy).await;
    let refused = |l: &str| {
        metric(&m, &format!("sluice_downstream_protocol_errors_total{{kind=\"tls_handshake\",listener=\"{l}\"}} "))
    };
    assert_eq!(refused("web"), Some(2.0));
    assert_eq!(refused("optional"), Some(1.0));
}

// ---------------------------------------------------------------------------
// TLS to backends

#[tokio::test]
async fn upstream_tls_verifies_the_backend_and_refuses_it_with_502_connect_failure() {
    let pki = Pki::new("Sluice Test CA");
    let named = pki.server("named", &["backend.test"], "backend.test");
    let by_ip = pki.server("by-ip", &["127.0.0.1"], "by ip");
    let stranger_ca = Pki::new("Someone Else's CA");
    let stranger = stranger_ca.server("stranger", &["backend.test"], "backend.test");
    let named_addr = tls_backend("named", &named, &["http/1.1"], None).await;
    let ip_addr = tls_backend("by-ip", &by_ip, &["http/1.1"], None).await;
    let stranger_addr = tls_backend("stranger", &stranger, &["http/1.1"], None).await;
    let ca = path(&pki.ca_path);

    let cases = [
        (
            named_addr,
            format!("tls = {{ sni = \"backend.test\", ca = {ca:?} }}"),
            Ok("named HTTP/1.1"),
        ),
        // Without sni the backend's address is the name: its IP SAN matches.
        (
            ip_addr,
            format!("tls = {{ ca = {ca:?} }}"),
            Ok("by-ip HTTP/1.1"),
        ),
        (
            named_addr,
            format!("tls = {{ sni = \"other.test\", ca = {ca:?} }}"),
            Err(()),
        ),
        (named_addr, format!("tls = {{ ca = {ca:?} }}"), Err(())),
        (
            stranger_addr,
            format!("tls = {{ sni = \"backend.test\", ca = {ca:?} }}"),
            Err(()),
        ),
        (
            stranger_addr,
            "tls = { verify = false }".to_owned(),
            Ok("stranger HTTP/1.1"),
        ),
    ];
    for (backend, tls, want) in cases {
        let proxy = start_proxy(&upstream_config(backend, &tls)).await;
        let answer = get(proxy.listener_addr("web").expect("web"), "/").await;
        match want {
            Ok(body) => {
                assert_eq!(answer.status, 200, "{tls}: {}", answer.body);
                assert_eq!(answer.body, body);
            }
            Err(()) => {
                assert_eq!(answer.status, 502, "{tls}");
                assert_eq!(answer.headers["sluice-error"], "connect-failure", "{tls}");
                let m = metrics(&proxy).await;
                let failures = format!(
                    "sluice_upstream_requests_total{{backend=\"{backend}\",outcome=\"connect_failure\",upstream=\"app\"}} "
                );
                assert!(
                    metric(&m, &failures).is_some_and(|n| n >= 1.0),
                    "{tls}:\n{m}"
                );
            }
        }
    }
}

#[tokio::test]
async fn upstream_protocol_follows_alpn_with_auto() {
    let pki = Pki::new("Sluice Test CA");
    let cert = pki.server("backend", &["backend.test"], "backend.test");
    let both = tls_backend("both", &cert, &["h2", "http/1.1"], None).await;
    let h1 = tls_backend("h1", &cert, &["http/1.1"], None).await;
    let tls = format!(
        "tls = {{ sni = \"backend.test\", ca = {:?} }}",
        path(&pki.ca_path)
    );

    let cases = [
        (both, "auto", "both HTTP/2.0"),
        (h1, "auto", "h1 HTTP/1.1"),
        (both, "h2", "both HTTP/2.0"),
        (both, "http1", "both HTTP/1.1"),
    ];
    for (backend, protocol, body) in cases {
        let proxy = start_proxy(&upstream_config(
            backend,
            &format!("protocol = \"{protocol}\"\n{tls}"),
        ))
        .await;
        let web = proxy.listener_addr("web").expect("web");
        for _ in 0..3 {
            let answer = get(web, "/").await;
            assert_eq!(answer.status, 200, "{protocol}: {}", answer.body);
            assert_eq!(answer.body, body, "protocol {protocol}");
        }
    }
}

#[tokio::test]
async fn upstream_tls_presents_its_client_certificate() {
    let pki = Pki::new("Sluice Test CA");
    let cert = pki.server("backend", &["backend.test"], "backend.test");
    let client = pki.client("proxy", "sluice");
    let strict = tls_backend("strict", &cert, &["http/1.1"], Some(&pki)).await;
    let ca = path(&pki.ca_path);

    let with_cert = format!(
        "tls = {{ sni = \"backend.test\", ca = {ca:?}, cert = {:?}, key = {:?} }}",
        path(&client.cert),
        path(&client.key)
    );
    let proxy = start_proxy(&upstream_config(strict, &with_cert)).await;
    let answer = get(proxy.listener_addr("web").expect("web"), "/").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.headers.contains_key("x-client"));

    let without = format!("tls = {{ sni = \"backend.test\", ca = {ca:?} }}");
    let proxy = start_proxy(&upstream_config(strict, &without)).await;
    let answer = get(proxy.listener_addr("web").expect("web"), "/").await;
    assert_eq!(answer.status, 502);
}

#[tokio::test]
async fn health_checks_of_a_tls_upstream_run_over_tls() {
    let pki = Pki::new("Sluice Test CA");
    let cert = pki.server("backend", &["backend.test"], "backend.test");
    let h1 = tls_backend("h1", &cert, &["http/1.1"], None).await;
    let h2 = tls_backend("h2", &cert, &["h2"], None).await;
    let stranger_ca = Pki::new("Someone Else's CA");
    let stranger = stranger_ca.server("stranger", &["backend.test"], "backend.test");
    let untrusted = tls_backend("untrusted", &stranger, &["http/1.1"], None).await;
    let checks = "health_check = { interval = \"50ms\", timeout = \"1s\", healthy_threshold = 1, unhealthy_threshold = 1 }";
    let tls = format!(
        "tls = {{ sni = \"backend.test\", ca = {:?} }}",
        path(&pki.ca_path)
    );

    for (backend, protocol, passes) in [
        (h1, "http1", true),
        (h2, "h2", true),
        (untrusted, "http1", false),
    ] {
        let extra = format!("protocol = \"{protocol}\"\n{checks}\n{tls}");
        let proxy = start_proxy(&upstream_config(backend, &extra)).await;
        let result = if passes { "success" } else { "failure" };
        let prefix = format!(
            "sluice_health_checks_total{{backend=\"{backend}\",result=\"{result}\",upstream=\"app\"}} "
        );
        let (proxy_ref, prefix) = (&proxy, &prefix);
        eventually(&format!("{protocol} checks {result}"), || async move {
            metric(&metrics(proxy_ref).await, prefix).filter(|n| *n >= 2.0)
        })
        .await;
        wait_backend_up(&proxy, backend, if passes { 1.0 } else { 0.0 }).await;
    }
}

// ---------------------------------------------------------------------------
// The binary: what the logs say

#[test]
fn logs_name_the_client_certificate_and_the_reason_a_backend_certificate_was_refused() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let backend = rt.block_on(Backend::start("b1"));
    let pki = Pki::new("Sluice Test CA");
    let site = pki.server("site", &["site.test"], "site.test");
    let alice = pki.client("alice", "alice");
    let stranger_ca = Pki::new("Someone Else's CA");
    let stranger = stranger_ca.server("stranger", &["backend.test"], "backend.test");
    let untrusted = rt.block_on(tls_backend("untrusted", &stranger, &["http/1.1"], None));
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\naccess_log = true\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         tls = {{ certificates = {}, client_ca = \"ca.pem\" }}\n\n\
         [[listener]]\nname = \"plain\"\nlisten = \"127.0.0.1:0\"\nupstream = \"untrusted\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n\n\
         [[upstream]]\nname = \"untrusted\"\nbackends = [\"{untrusted}\"]\nretry = {{ attempts = 1 }}\n\
         tls = {{ sni = \"backend.test\", ca = \"ca.pem\" }}\n",
        // Relative to the config file, which sits beside them.
        certs(&[&site]).replace(&format!("{}/", path(pki.dir.path())), ""),
        backend.addr
    );
    let config_path = pki.path("sluice.toml");
    std::fs::write(&config_path, config).expect("write config");
    let proc = Proc::start_file(&config_path);

    let web = proc.addr("web");
    let answer = rt
        .block_on(exchange(
            web,
            "site.test",
            pki.client_config_with_cert(&["http/1.1"], &alice),
            "/",
        ))
        .expect("alice gets in");
    assert_eq!(answer.status, 200);
    let line = proc.wait_json(&proc.access, |v| v["listener"] == "web");
    assert_eq!(line["client_subject"], "CN=alice, O=Sluice Tests");
    assert_eq!(line["status"], 200);

    let answer = rt.block_on(get(proc.addr("plain"), "/"));
    assert_eq!(answer.status, 502);
    assert_eq!(answer.headers["sluice-error"], "connect-failure");
    let warning = proc.wait_json(&proc.log, |v| {
        v["fields"]["message"] == "tls handshake with backend failed"
    });
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["fields"]["backend"], untrusted.to_string());
    assert_eq!(warning["fields"]["upstream"], "untrusted");
    assert_eq!(warning["fields"]["server_name"], "backend.test");
    let reason = warning["fields"]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("unknown CA"), "{warning}");
    let line = proc.wait_json(&proc.access, |v| v["listener"] == "plain");
    assert_eq!(line["error"], "connect-failure");
    assert_eq!(line["client_subject"], serde_json::Value::Null);
}

// ---------------------------------------------------------------------------
// Config reloads

fn reload_config(text: &str) -> sluice::config::Config {
    sluice::config::from_str(text, "test.toml").unwrap_or_else(|e| panic!("config: {e}"))
}

#[tokio::test]
async fn a_reload_that_changes_listener_tls_restarts_its_accept_loop_on_the_same_port() {
    let backend = Backend::start("b1").await;
    let pki = Pki::new("Sluice Test CA");
    let first = pki.server("first", &["web.test"], "first");
    let second = pki.server("second", &["web.test"], "second");
    let with = |cert: &Issued| {
        tls_config(
            &backend,
            &format!("{{ certificates = {} }}", certs(&[cert])),
        )
    };
    let proxy = start_proxy(&with(&first)).await;
    let addr = proxy.listener_addr("web").expect("web");
    assert_eq!(served_cert(addr, "web.test").await, first.der.to_vec());

    // Other certificate files: a new acceptor, same socket.
    proxy
        .apply(reload_config(&with(&second)))
        .await
        .expect("reloaded");
    assert_eq!(proxy.listener_addr("web"), Some(addr));
    eventually("the new certificate", || async {
        (served_cert(addr, "web.test").await == second.der.to_vec()).then_some(())
    })
    .await;

    // No tls at all: plain HTTP on the same port.
    let plain = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n",
        backend.addr
    );
    proxy.apply(reload_config(&plain)).await.expect("reloaded");
    assert_eq!(proxy.listener_addr("web"), Some(addr));
    let answer = eventually("plain HTTP", || async {
        let answer = get(addr, "/").await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert_eq!(answer.body, "b1");

    // And back to TLS.
    proxy
        .apply(reload_config(&with(&first)))
        .await
        .expect("reloaded");
    eventually("tls again", || async {
        let config = any_cert_client(&["http/1.1"], rustls::ALL_VERSIONS);
        let stream = tls_connect(addr, "web.test", config).await.ok()?;
        let cert = stream.get_ref().1.peer_certificates()?[0].to_vec();
        (cert == first.der.to_vec()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_reload_that_changes_upstream_tls_rebuilds_the_backends_clients() {
    let pki = Pki::new("Sluice Test CA");
    let named = pki.server("named", &["backend.test"], "backend.test");
    let backend = tls_backend("named", &named, &["http/1.1"], None).await;
    let ca = path(&pki.ca_path);
    let with_sni =
        |sni: &str| upstream_config(backend, &format!("tls = {{ sni = {sni:?}, ca = {ca:?} }}"));
    let proxy = start_proxy(&with_sni("other.test")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let answer = get(addr, "/").await;
    assert_eq!(answer.status, 502, "{}", answer.body);
    assert_eq!(answer.headers["sluice-error"], "connect-failure");

    proxy
        .apply(reload_config(&with_sni("backend.test")))
        .await
        .expect("reloaded");
    let answer = get(addr, "/").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, "named HTTP/1.1");
}
