//! A closed-loop load generator of full TLS handshakes, for
//! `bench/tls/run.py`: `--conns` loops each connect, run a full TLS
//! handshake (session resumption off), send one `GET` with
//! `Connection: close`, read the whole response and close, over and over,
//! for `--duration` seconds. Prints one JSON line with the counts.
//!
//! It measures the server, so it spends as little as it can itself: the
//! server's certificate and handshake signature are not verified (no
//! signature check on this side), and it runs on one thread.
//!
//! ```text
//! tls_load --addr 127.0.0.1:18443 --sni bench.test --path /128 --conns 32 --duration 10
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    sni: String,
    path: String,
    conns: usize,
    duration: Duration,
    tls12: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 18443)),
        sni: "bench.test".to_owned(),
        path: "/128".to_owned(),
        conns: 32,
        duration: Duration::from_secs(10),
        tls12: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--tls12" {
            args.tls12 = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--addr" => args.addr = value.parse().map_err(|e| bad(&e))?,
            "--sni" => args.sni = value,
            "--path" => args.path = value,
            "--conns" => args.conns = value.parse().map_err(|e| bad(&e))?,
            "--duration" => {
                args.duration = Duration::from_secs_f64(value.parse().map_err(|e| bad(&e))?)
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

/// Accepts any certificate and any handshake signature: the load side
/// should not spend time checking what it is measuring.
#[derive(Debug)]
struct NoCheck(Vec<SignatureScheme>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    errors: AtomicU64,
    bad_status: AtomicU64,
    /// The first error seen, to say what went wrong.
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counts {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(what);
    }
}

/// One connection: handshake, request, the whole response. `Ok(true)` for
/// a 2xx answer.
async fn one(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
    request: &[u8],
) -> std::io::Result<bool> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name.clone(), tcp).await?;
    tls.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match tls.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A server that closes without close_notify after the whole
            // response is fine here.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if response_complete(&buf) {
            break;
        }
    }
    let _ = tls.shutdown().await;
    Ok(buf.starts_with(b"HTTP/1.1 2") || buf.starts_with(b"HTTP/1.0 2"))
}

/// Whether `buf` holds a whole response with a Content-Length body.
fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|n| buf.len() >= end + 4 + n)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tls_load: {e}");
            std::process::exit(2);
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let versions: &[&rustls::SupportedProtocolVersion] = if args.tls12 {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut config =
        match ClientConfig::builder_with_provider(provider).with_protocol_versions(versions) {
            Ok(b) => b
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCheck(schemes)))
                .with_no_client_auth(),
            Err(e) => {
                eprintln!("tls_load: {e}");
                std::process::exit(2);
            }
        };
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = match ServerName::try_from(args.sni.clone()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tls_load: --sni {}: {e}", args.sni);
            std::process::exit(2);
        }
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        args.path, args.sni
    )
    .into_bytes();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tls_load: {e}");
            std::process::exit(2);
        }
    };
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let addr = args.addr;
    runtime.block_on(async {
        let deadline = started + args.duration;
        let mut tasks = Vec::new();
        for _ in 0..args.conns {
            let (connector, name, request, counts) = (
                connector.clone(),
                name.clone(),
                request.clone(),
                Arc::clone(&counts),
            );
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let attempt = one(&connector, addr, &name, &request);
                    match tokio::time::timeout(left + Duration::from_secs(5), attempt).await {
                        Ok(Ok(true)) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(false)) => {
                            counts.bad_status.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => counts.error(e.to_string()),
                        Err(_) => counts.error("timed out".to_owned()),
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let first_error = counts
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    println!(
        "{{\"handshakes\":{},\"errors\":{},\"status_errors\":{},\"seconds\":{seconds:.3},\"first_error\":{first_error:?}}}",
        counts.ok.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
        counts.bad_status.load(Ordering::Relaxed),
    );
}
