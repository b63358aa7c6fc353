//! The training load for a profile-guided build (`bench/pgo-build.sh`):
//! starts two HTTP/1.1 backends in this process, runs the given `sluice`
//! binary in front of them with one HTTP and one TCP listener, drives each
//! kind of traffic through it for a few seconds, then stops it with
//! SIGTERM so that an instrumented binary writes its profile on exit.
//!
//! ```text
//! pgo_train --bin target/pgo/gen/release/sluice --seconds 2
//! ```
//!
//! The loads follow the shared harness's workloads, so the profile weighs
//! the paths the way production traffic does: HTTP/1.1 keep-alive small
//! and 16 KiB responses, `Connection: close`, request bodies, chunked
//! responses, HTTP/2 cleartext with four streams per connection, and
//! 1 MiB responses through the TCP listener. Exits non-zero if any load
//! completed no request or saw an error, so a broken build never passes
//! as trained.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long one request may take before the load counts it as an error.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

struct Args {
    bin: String,
    seconds: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bin: String::new(),
        seconds: 2.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--bin" => args.bin = value,
            "--seconds" => {
                args.seconds = value
                    .parse()
                    .map_err(|e| format!("--seconds {value}: {e}"))?
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if args.bin.is_empty() {
        return Err("--bin PATH is required".to_owned());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pgo_train: {e}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgo_train: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(train(args)) {
        eprintln!("pgo_train: {e}");
        std::process::exit(1);
    }
}

/// A loopback port nothing listens on now.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// The proxy under training; stopped with SIGTERM when dropped early.
struct Proxy {
    child: Option<Child>,
}

impl Proxy {
    fn terminate(&mut self) -> Result<ExitStatus, String> {
        let mut child = self.child.take().ok_or("the proxy is already stopped")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| format!("SIGTERM: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    return Err("the proxy did not stop within 30 s of SIGTERM".to_owned());
                }
                Err(e) => return Err(format!("waiting for the proxy: {e}")),
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate();
        }
    }
}

async fn train(args: Args) -> Result<(), String> {
    let mut backends = Vec::new();
    for _ in 0..2 {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("backend: {e}"))?;
        backends.push(l.local_addr().map_err(|e| e.to_string())?);
        tokio::spawn(backend(l));
    }
    let (http, tcp, admin) = (free_port()?, free_port()?, free_port()?);
    let backend_list = backends
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "[runtime]\nworkers = 1\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listener]]\nname = \"http\"\nlisten = \"127.0.0.1:{http}\"\nprotocol = \"http\"\nupstream = \"train\"\n\n\
         [[listener]]\nname = \"tcp\"\nlisten = \"127.0.0.1:{tcp}\"\nprotocol = \"tcp\"\nupstream = \"train\"\n\n\
         [[upstream]]\nname = \"train\"\nbalancer = \"round_robin\"\nbackends = [{backend_list}]\n"
    );
    let path = std::env::temp_dir().join(format!("sluice-pgo-train-{}.toml", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(config.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))?;

    let child = Command::new(&args.bin)
        .args(["run", "--config"])
        .arg(&path)
        .spawn()
        .map_err(|e| format!("{}: {e}", args.bin))?;
    let mut proxy = Proxy { child: Some(child) };
    let trained = run_loads(&mut proxy, http, tcp, admin, args.seconds).await;
    let _ = std::fs::remove_file(&path);
    trained
}

async fn run_loads(
    proxy: &mut Proxy,
    http: u16,
    tcp: u16,
    admin: u16,
    seconds: f64,
) -> Result<(), String> {
    wait_ready(SocketAddr::from(([127, 0, 0, 1], admin))).await?;

    let secs = Duration::from_secs_f64(seconds);
    let http = SocketAddr::from(([127, 0, 0, 1], http));
    let tcp = SocketAddr::from(([127, 0, 0, 1], tcp));
    let get = |path: &str, close: bool| -> Vec<u8> {
        let conn = if close { "Connection: close\r\n" } else { "" };
        format!("GET {path} HTTP/1.1\r\nHost: train\r\nUser-Agent: pgo-train\r\n{conn}\r\n")
            .into_bytes()
    };
    let mut post = b"POST /echo HTTP/1.1\r\nHost: train\r\nContent-Type: application/octet-stream\r\nContent-Length: 2048\r\n\r\n".to_vec();
    post.extend(std::iter::repeat_n(b'p', 2048));

    let loads: Vec<(&str, Load)> = vec![
        (
            "h1 keep-alive /128",
            Load::h1(http, get("/128", false), false, 64, 3 * secs),
        ),
        (
            "h1 keep-alive /16k",
            Load::h1(http, get("/16k", false), false, 64, secs),
        ),
        (
            "h1 Connection: close",
            Load::h1(http, get("/128", true), true, 64, secs),
        ),
        ("h1 POST 2 KiB", Load::h1(http, post, false, 16, secs)),
        (
            "h1 chunked response",
            Load::h1(http, get("/chunked", false), false, 16, secs),
        ),
        ("h2c /128", Load::h2(http, 16, 4, 2 * secs)),
        ("tcp /1m", Load::h1(tcp, get("/1m", false), false, 16, secs)),
    ];
    for (name, load) in loads {
        let counts = load.run().await;
        let (ok, errors) = (
            counts.ok.load(Ordering::Relaxed),
            counts.errors.load(Ordering::Relaxed),
        );
        println!("{name}: {ok} requests, {errors} errors");
        if ok == 0 || errors > 0 {
            let first = counts
                .first_error
                .lock()
                .map(|f| f.clone())
                .unwrap_or_default();
            return Err(format!(
                "{name}: {ok} requests, {errors} errors; first: {}",
                first.unwrap_or_default()
            ));
        }
    }
    let status = proxy.terminate()?;
    if !status.success() {
        return Err(format!("the proxy exited with {status}"));
    }
    Ok(())
}

/// Polls `/readyz` until it answers 200.
async fn wait_ready(admin: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(admin).await {
            let mut out = Vec::new();
            if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await
                .is_ok()
                && s.read_to_end(&mut out).await.is_ok()
                && out.starts_with(b"HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the proxy's admin {admin} was not ready within 30 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counts {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(what);
        }
    }
}

enum Kind {
    H1 { request: Vec<u8>, close: bool },
    H2 { streams: usize },
}

/// A closed loop of `conns` clients for a while.
struct Load {
    addr: SocketAddr,
    kind: Kind,
    conns: usize,
    duration: Duration,
}

impl Load {
    /// HTTP/1.1 clients sending `request` in a loop; with `close`, each
    /// on a new connection.
    fn h1(
        addr: SocketAddr,
        request: Vec<u8>,
        close: bool,
        conns: usize,
        duration: Duration,
    ) -> Load {
        let kind = Kind::H1 { request, close };
        Load {
            addr,
            kind,
            conns,
            duration,
        }
    }

    fn h2(addr: SocketAddr, conns: usize, streams: usize, duration: Duration) -> Load {
        let kind = Kind::H2 { streams };
        Load {
            addr,
            kind,
            conns,
            duration,
        }
    }

    async fn run(self) -> Arc<Counts> {
        let counts = Arc::new(Counts::default());
        let until = Instant::now() + self.duration;
        let mut tasks = Vec::new();
        for _ in 0..self.conns {
            let counts = counts.clone();
            let addr = self.addr;
            tasks.push(match &self.kind {
                Kind::H1 { request, close } => {
                    let (request, close) = (request.clone(), *close);
                    tokio::spawn(
                        async move { h1_client(addr, request, close, until, counts).await },
                    )
                }
                Kind::H2 { streams } => {
                    let streams = *streams;
                    tokio::spawn(async move { h2_client(addr, streams, until, counts).await })
                }
            });
        }
        for t in tasks {
            let _ = t.await;
        }
        counts
    }
}

async fn h1_client(
    addr: SocketAddr,
    request: Vec<u8>,
    close: bool,
    until: Instant,
    counts: Arc<Counts>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut stream: Option<TcpStream> = None;
    while Instant::now() < until {
        let s = match stream.take() {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    buf.clear();
                    s
                }
                Err(e) => {
                    counts.error(format!("connect {addr}: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let mut s = s;
        match tokio::time::timeout(REQUEST_LIMIT, exchange(&mut s, &request, &mut buf)).await {
            Ok(Ok(())) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                if !close {
                    stream = Some(s);
                }
            }
            Ok(Err(e)) => counts.error(e),
            Err(_) => counts.error("no response within 5 s".to_owned()),
        }
    }
}

/// Writes one request and reads its whole response (Content-Length or
/// chunked), leaving any bytes after it in `buf`.
async fn exchange(s: &mut TcpStream, request: &[u8], buf: &mut BytesMut) -> Result<(), String> {
    s.write_all(request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let (head, framing) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                if response.code != Some(200) {
                    return Err(format!("status {:?}", response.code));
                }
                break (n, framing_of(response.headers)?);
            }
            Ok(httparse::Status::Partial) => fill(s, buf).await?,
            Err(e) => return Err(format!("response head: {e}")),
        }
    };
    buf.advance(head);
    match framing {
        Framing::Length(n) => {
            while buf.len() < n {
                fill(s, buf).await?;
            }
            buf.advance(n);
        }
        Framing::Chunked => loop {
            let line = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, buf).await?;
            };
            let size = std::str::from_utf8(&buf[..line])
                .ok()
                .and_then(|l| {
                    usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok()
                })
                .ok_or("bad chunk size line")?;
            buf.advance(line + 2);
            while buf.len() < size + 2 {
                fill(s, buf).await?;
            }
            buf.advance(size + 2);
            if size == 0 {
                break;
            }
        },
    }
    Ok(())
}

async fn fill(s: &mut TcpStream, buf: &mut BytesMut) -> Result<(), String> {
    if buf.capacity() - buf.len() < 16 * 1024 {
        buf.reserve(64 * 1024);
    }
    match s.read_buf(buf).await {
        Ok(0) => Err("connection closed mid-response".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

enum Framing {
    Length(usize),
    Chunked,
}

fn framing_of(fields: &[httparse::Header<'_>]) -> Result<Framing, String> {
    for f in fields {
        if f.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(f.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad content-length")?;
            return Ok(Framing::Length(n));
        }
        if f.name.eq_ignore_ascii_case("transfer-encoding")
            && f.value.eq_ignore_ascii_case(b"chunked")
        {
            return Ok(Framing::Chunked);
        }
    }
    Err("a response without a length".to_owned())
}

async fn h2_client(addr: SocketAddr, streams: usize, until: Instant, counts: Arc<Counts>) {
    while Instant::now() < until {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                counts.error(format!("connect {addr}: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
            {
                Ok(pair) => pair,
                Err(e) => {
                    counts.error(format!("h2 handshake: {e}"));
                    continue;
                }
            };
        let driver = tokio::spawn(conn);
        let mut loops = Vec::new();
        for _ in 0..streams {
            let mut sender = sender.clone();
            let counts = counts.clone();
            loops.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let request = http::Request::get(format!("http://{addr}/128"))
                        .body(Empty::<bytes::Bytes>::new());
                    let Ok(request) = request else { return };
                    let sent = async {
                        let response = sender
                            .send_request(request)
                            .await
                            .map_err(|e| format!("h2 request: {e}"))?;
                        if response.status() != http::StatusCode::OK {
                            return Err(format!("status {}", response.status()));
                        }
                        response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("h2 body: {e}"))?;
                        Ok::<(), String>(())
                    };
                    match tokio::time::timeout(REQUEST_LIMIT, sent).await {
                        Ok(Ok(())) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            counts.error(e);
                            return;
                        }
                        Err(_) => {
                            counts.error("no h2 response within 5 s".to_owned());
                            return;
                        }
                    }
                }
            }));
        }
        for l in loops {
            let _ = l.await;
        }
        drop(sender);
        let _ = driver.await;
    }
}

/// A minimal HTTP/1.1 origin: `/16k` and `/1m` answer that many bytes,
/// `/chunked` answers 4 chunks, a request with a body gets it back by
/// length, anything else 128 bytes.
async fn backend(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream));
    }
}

async fn serve(mut s: TcpStream) {
    static BODY: [u8; 1 << 20] = [b'x'; 1 << 20];
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        let parsed = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut fields);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let length = request
                        .headers
                        .iter()
                        .find(|f| f.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|f| {
                            std::str::from_utf8(f.value)
                                .ok()?
                                .trim()
                                .parse::<usize>()
                                .ok()
                        })
                        .unwrap_or(0);
                    let close = request.headers.iter().any(|f| {
                        f.name.eq_ignore_ascii_case("connection")
                            && f.value.eq_ignore_ascii_case(b"close")
                    });
                    break Some((n, request.path.unwrap_or("/").to_owned(), length, close));
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => break None,
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let Some((head, path, length, close)) = parsed else {
            let _ = s
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            return;
        };
        buf.advance(head);
        while buf.len() < length {
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        buf.advance(length);
        let written = if path == "/chunked" {
            let chunk = &BODY[..1000];
            let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..4 {
                out.extend_from_slice(b"3e8\r\n");
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            s.write_all(&out).await
        } else {
            let n = match path.as_str() {
                "/16k" => 16 * 1024,
                "/1m" => 1 << 20,
                _ if length > 0 => length,
                _ => 128,
            };
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n");
            if n <= 64 * 1024 {
                let mut out = head.into_bytes();
                out.extend_from_slice(&BODY[..n]);
                s.write_all(&out).await
            } else {
                match s.write_all(head.as_bytes()).await {
                    Ok(()) => s.write_all(&BODY[..n]).await,
                    Err(e) => Err(e),
                }
            }
        };
        if written.is_err() || close {
            return;
        }
    }
}
