//! Test support: real hyper backends on ephemeral loopback ports, a proxy
//! started in-process, and small clients.
#![allow(dead_code)]

pub mod pki;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use sluice::config;

pub mod process;
use sluice::runtime::{self, Running};

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A backend that says its name, counts hits and offers a few test paths:
/// `/sleep/MS`, `/status/CODE`, `/headers` (echoes request headers),
/// `/upload` (counts body bytes), `/download/N` (streams N bytes),
/// `/trailers` (body + trailers `grpc-status: 0`), `/ws` (upgrade + echo).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Connections accepted, and connections that have ended.
    pub conns: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
    /// When not 0, every request is answered with this status.
    pub forced_status: Arc<std::sync::atomic::AtomicU16>,
    /// Notified each time a request arrives.
    pub arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
    /// Cancelled to kill the backend: every connection closes at once.
    killed: tokio_util::sync::CancellationToken,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_slow(name, Duration::ZERO).await
    }

    /// A backend that waits `delay` before every answer.
    pub async fn start_slow(name: &str, delay: Duration) -> Backend {
        let socket = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Backend::serve(name, delay, socket)
    }

    /// A backend on a given address (one that was free a moment ago).
    pub async fn start_at(name: &str, addr: SocketAddr) -> Backend {
        // A killed backend's socket closes as its task is dropped: retry
        // briefly until the address is free again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let socket = loop {
            match TcpListener::bind(addr).await {
                Ok(socket) => break socket,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "bind {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        Backend::serve(name, Duration::ZERO, socket)
    }

    fn serve(name: &str, delay: Duration, socket: TcpListener) -> Backend {
        let addr = socket.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(Notify::new());
        let conns = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let forced_status = Arc::new(std::sync::atomic::AtomicU16::new(0));
        let name_arc: Arc<str> = Arc::from(name);
        let killed = tokio_util::sync::CancellationToken::new();
        let task = {
            let forced = Arc::clone(&forced_status);
            let killed = killed.clone();
            let hits = Arc::clone(&hits);
            let arrived = Arc::clone(&arrived);
            let conns = Arc::clone(&conns);
            let closed = Arc::clone(&closed);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = socket.accept().await else {
                        continue;
                    };
                    conns.fetch_add(1, Ordering::SeqCst);
                    let closed = Arc::clone(&closed);
                    let hits = Arc::clone(&hits);
                    let arrived = Arc::clone(&arrived);
                    let name = Arc::clone(&name_arc);
                    let forced = Arc::clone(&forced);
                    let killed = killed.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            hits.fetch_add(1, Ordering::SeqCst);
                            arrived.notify_waiters();
                            let name = Arc::clone(&name);
                            let forced = forced.load(Ordering::SeqCst);
                            async move {
                                if !delay.is_zero() {
                                    tokio::time::sleep(delay).await;
                                }
                                if forced != 0 {
                                    let mut r = Response::new(full(name.to_string()));
                                    *r.status_mut() = StatusCode::from_u16(forced)
                                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                                    return Ok::<_, Infallible>(r);
                                }
                                Ok::<_, Infallible>(answer(&name, req).await)
                            }
                        });
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let conn =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = conn => {}
                            _ = killed.cancelled() => {}
                        }
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            })
        };
        Backend {
            name: name.to_owned(),
            addr,
            hits,
            conns,
            closed,
            forced_status,
            arrived,
            task,
            killed,
        }
    }

    /// Kills the backend: it stops accepting and every open connection
    /// closes at once, as when its process dies.
    pub fn kill(&self) {
        self.task.abort();
        self.killed.cancel();
    }

    /// Answers every request with `status` (0: back to normal).
    pub fn force_status(&self, status: u16) {
        self.forced_status.store(status, Ordering::SeqCst);
    }

    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_hits(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.arrived.notified();
            if self.hits() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("backend {} saw {} hits, wanted {n}", self.name, self.hits());
            }
        }
    }
}

fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

async fn answer(name: &str, mut req: Request<Incoming>) -> Response<TestBody> {
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let head = parts.next().unwrap_or("");
    let arg = parts.next().unwrap_or("");
    let mut resp = match head {
        "sleep" => {
            let ms: u64 = arg.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(name.to_owned()))
        }
        "status" => {
            let mut r = Response::new(full(name.to_owned()));
            *r.status_mut() = StatusCode::from_u16(arg.parse().unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        "headers" => {
            let mut text = String::new();
            for (k, v) in req.headers() {
                text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            Response::new(full(text))
        }
        "upload" => {
            let mut total: u64 = 0;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            total += d.len() as u64;
                        }
                    }
                    Err(_) => break,
                }
            }
            return Response::new(full(total.to_string()));
        }
        "download" => {
            let n: u64 = arg.parse().unwrap_or(0);
            return Response::new(Zeros::new(n).map_err(|e| match e {}).boxed());
        }
        "trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().expect("valid"));
            trailers.insert("grpc-message", "ok".parse().expect("valid"));
            let body = Trailered {
                data: Some(Bytes::from(name.to_owned())),
                trailers: Some(trailers),
            };
            let mut r = Response::new(body.map_err(|e| match e {}).boxed());
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().expect("valid"));
            return r;
        }
        "ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", "upgrade".parse().expect("valid"));
            r.headers_mut()
                .insert("upgrade", "websocket".parse().expect("valid"));
            return r;
        }
        _ => Response::new(full(name.to_owned())),
    };
    resp.headers_mut()
        .insert("x-backend", name.parse().expect("valid name"));
    resp
}

/// A body of one data frame followed by trailers.
pub struct Trailered {
    pub data: Option<Bytes>,
    pub trailers: Option<HeaderMap>,
}

impl Body for Trailered {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// A body of `n` zero bytes in 64 KiB frames, never held whole in memory.
pub struct Zeros {
    left: u64,
    chunk: Bytes,
}

impl Zeros {
    pub fn new(n: u64) -> Self {
        Zeros {
            left: n,
            chunk: Bytes::from(vec![0u8; 64 * 1024]),
        }
    }
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = this.left.min(this.chunk.len() as u64) as usize;
        this.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(this.chunk.slice(..n)))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// Starts the proxy in-process from config text.
pub async fn start_proxy(toml: &str) -> Running {
    let config = config::from_str(toml, "test.toml").unwrap_or_else(|e| panic!("config: {e}"));
    runtime::run(config).await.expect("proxy starts")
}

/// A minimal config: admin and one listener on `:0`, one upstream.
pub fn simple_config(backends: &[&Backend], extra_upstream: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{}\"", b.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [{list}]\n{extra_upstream}\n"
    )
}

pub fn h1_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn empty() -> TestBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

/// A finished response: status, headers, body text.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub trailers: Option<HeaderMap>,
}

pub async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>,
    req: Request<TestBody>,
) -> Answer {
    let resp = client.request(req).await.expect("request answered");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        trailers,
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(empty())
        .expect("request");
    send(&h1_client(), req).await
}

/// The text of an admin endpoint.
pub async fn admin_get(running: &Running, path: &str) -> Answer {
    get(running.admin, path).await
}

/// Polls /metrics until `done` holds for its text, and returns the text.
pub async fn wait_metrics(proxy: &Running, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = admin_get(proxy, "/metrics").await.body;
        if done(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never reached the expected state:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends raw bytes on a new connection and reads until the server closes or
/// `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts of each backend name in a list of bodies.
pub fn tally(bodies: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in bodies {
        *m.entry(b.clone()).or_insert(0) += 1;
    }
    m
}

/// A TCP echo server on an ephemeral port: every byte back, then a
/// half-close when the client half-closes.
pub async fn spawn_tcp_echo() -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An address that refuses connections and stays so for as long as the
/// returned socket lives: bound, never listening, so no other test's
/// server can be given its port (as can happen to [`free_addr`]'s).
pub fn dead_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

/// An address on loopback that nothing listens on (bound, then released),
/// for a test that binds it itself later. A backend that must stay dead
/// takes [`dead_addr`] instead: this port may be given to another test.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The value of the metric line starting with `prefix`, or `None`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// `config` with `runtime.workers` set (`config` must have no `[runtime]`).
pub fn with_workers(workers: usize, config: &str) -> String {
    with_runtime(&format!("workers = {workers}"), config)
}

/// `config` with a `[runtime]` table of `keys` (`config` must have none).
pub fn with_runtime(keys: &str, config: &str) -> String {
    format!("[runtime]\n{keys}\n\n{config}")
}

/// `sluice_worker_connections_total` of each of the first `workers`
/// workers, by index.
pub fn worker_connections(text: &str, workers: usize) -> Vec<f64> {
    (0..workers)
        .map(|w| {
            let series = format!("sluice_worker_connections_total{{worker=\"{w}\"}} ");
            metric(text, &series).unwrap_or_else(|| panic!("no {series}in\n{text}"))
        })
        .collect()
}

/// Polls until `sluice_backend_up` of `backend` in upstream `app` is
/// `want`, and returns when it was seen.
pub async fn wait_backend_up(
    proxy: &Running,
    backend: SocketAddr,
    want: f64,
) -> std::time::Instant {
    let prefix = format!("sluice_backend_up{{backend=\"{backend}\",upstream=\"app\"}} ");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = admin_get(proxy, "/metrics").await.body;
        if metric(&m, &prefix) == Some(want) {
            return std::time::Instant::now();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{backend} never reached up={want}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The path of `name` on `PATH`, or a failure that says how it gets
/// installed (`installs`: what `.ci/install-tools` installs it from).
pub fn tool(name: &str, installs: &str) -> std::path::PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` not found on PATH: run .ci/install-tools as root (it installs {installs})")
    })
}

/// Asks for a WebSocket upgrade of `/ws` on `stream`, reads the response
/// head up to its end (not a byte further) and returns it lower-cased; then
/// each of `echoes` must come back unchanged from the backend's echo.
pub async fn websocket_echo<S>(stream: &mut S, host: &str, echoes: &[&[u8]]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET /ws HTTP/1.1\r\nhost: {host}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("101 in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "closed before the 101 head ended: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    for msg in echoes {
        stream.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&back, msg);
    }
    head
}
