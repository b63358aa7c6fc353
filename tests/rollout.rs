//! Rolling restarts replayed on one machine with the real binary: steady
//! load from HTTP/1.1 keep-alive, HTTP/1.1 one-request-per-connection and
//! HTTP/2 clients, every error counted.
//!
//! * A Kubernetes rollout: a new pod becomes ready and joins the Service's
//!   endpoints, the old pod gets SIGTERM, its /readyz turns 503, the
//!   endpoints drop it after a lag shorter than `shutdown.drain_delay`, its
//!   in-flight slow requests finish within `shutdown.grace`, it exits 0.
//! * A restart outside Kubernetes: a second process binds the same port
//!   (SO_REUSEPORT) before the first gets SIGTERM.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nix::sys::signal::Signal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use support::process::Proc;
use support::*;

/// The Service in front of the pods: the addresses a new client connection
/// may go to, as kube-proxy applies a Service's endpoints. Each new
/// connection picks one at random; an open connection stays where it is.
#[derive(Clone, Default)]
struct Endpoints(Arc<Mutex<Vec<SocketAddr>>>);

impl Endpoints {
    fn set(&self, addrs: &[SocketAddr]) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = addrs.to_vec();
    }
}

impl tower_service::Service<Name> for Endpoints {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        let addrs = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        std::future::ready(if addrs.is_empty() {
            Err(std::io::Error::other("no endpoints"))
        } else {
            Ok(vec![addrs[fastrand::usize(..addrs.len())]].into_iter())
        })
    }
}

/// How a load loop talks to the Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// HTTP/1.1, one keep-alive connection reused while the server allows.
    KeepAlive,
    /// HTTP/1.1, a new connection for every request.
    NewConnection,
    /// HTTP/2, one connection, reopened after a GOAWAY.
    H2,
}

/// One request of the load.
struct Sample {
    kind: Kind,
    started: Instant,
    finished: Instant,
    /// The status, and whether the response said `connection: close`; or
    /// what went wrong.
    result: Result<(u16, bool), String>,
    /// Sent again after a GOAWAY refused it ([`refused_by_goaway`]).
    retried: bool,
}

/// Whether `err` is an HTTP/2 request the server refused with a graceful
/// GOAWAY (NO_ERROR): a stream above the GOAWAY's last stream id, or one
/// the client had not sent yet when the GOAWAY arrived. The server did not
/// process it, and RFC 9113 section 6.8 lets the client send it again on a
/// new connection, as browsers and Go's client do; hyper's client leaves
/// that to its user.
fn refused_by_goaway(err: &hyper_util::client::legacy::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        cause = e.source();
    }
    false
}

/// Client loops sending `GET /` through [`Endpoints`] until stopped, a
/// request every `PACE` at most, bounded in time and count.
struct Load {
    stop: CancellationToken,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<JoinHandle<()>>,
}

const PACE: Duration = Duration::from_millis(4);
const LOAD_LIMIT: Duration = Duration::from_secs(60);
const LOAD_MAX_PER_LOOP: usize = 50_000;

impl Load {
    fn start(endpoints: &Endpoints, loops: &[(Kind, usize)]) -> Load {
        let stop = CancellationToken::new();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for &(kind, n) in loops {
            for _ in 0..n {
                let connector = HttpConnector::new_with_resolver(endpoints.clone());
                let mut builder = Client::builder(TokioExecutor::new());
                match kind {
                    Kind::KeepAlive => {}
                    Kind::NewConnection => {
                        builder.pool_max_idle_per_host(0);
                    }
                    Kind::H2 => {
                        builder.http2_only(true);
                    }
                }
                let client: Client<_, TestBody> = builder.build(connector);
                tasks.push(tokio::spawn(run_loop(
                    kind,
                    client,
                    stop.clone(),
                    Arc::clone(&samples),
                )));
            }
        }
        Load {
            stop,
            samples,
            tasks,
        }
    }

    /// Requests that succeeded so far.
    fn ok(&self) -> usize {
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.iter().filter(|s| s.result.is_ok()).count()
    }

    /// Waits until `n` more requests have succeeded.
    async fn wait_ok(&self, n: usize) {
        let want = self.ok() + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.ok() < want {
            assert!(
                Instant::now() < deadline,
                "the load stalled at {}",
                self.ok()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the loops (each finishes its request in progress).
    async fn finish(self) -> Vec<Sample> {
        self.stop.cancel();
        for t in self.tasks {
            t.await.expect("load loop");
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

async fn run_loop(
    kind: Kind,
    client: Client<HttpConnector<Endpoints>, TestBody>,
    stop: CancellationToken,
    samples: Arc<Mutex<Vec<Sample>>>,
) {
    let until = Instant::now() + LOAD_LIMIT;
    let mut sent = 0;
    while !stop.is_cancelled() && Instant::now() < until && sent < LOAD_MAX_PER_LOOP {
        sent += 1;
        let started = Instant::now();
        let mut retried = false;
        let exchange = async {
            let request = || {
                Request::get("http://sluice.test/")
                    .body(empty())
                    .expect("request")
            };
            let resp = match client.request(request()).await {
                Err(e) if kind == Kind::H2 && refused_by_goaway(&e) => {
                    retried = true;
                    client.request(request()).await
                }
                other => other,
            };
            let resp = resp.map_err(|e| format!("{e:?}"))?;
            let status = resp.status().as_u16();
            let close = resp
                .headers()
                .get(http::header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e:?}"))?;
            Ok((status, close))
        };
        let result = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok((200, close))) => Ok((200, close)),
            Ok(Ok((status, _))) => Err(format!("status {status}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("no answer within 10s".to_owned()),
        };
        samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Sample {
                kind,
                started,
                finished: Instant::now(),
                result,
                retried,
            });
        tokio::time::sleep(PACE.saturating_sub(started.elapsed())).await;
    }
}

/// `GET path` on a new connection with blocking std I/O, so that timing it
/// does not depend on the test's own runtime. Returns the status code.
fn blocking_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let head = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

/// Polls /readyz from right after `signalled` until it answers 503, and
/// returns how long that took.
fn readyz_turns_503(admin: SocketAddr, signalled: Instant) -> Duration {
    loop {
        if blocking_status(admin, "/readyz") == Some(503) {
            return signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "/readyz never turned 503"
        );
    }
}

/// Waits until /readyz answers 200.
fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while blocking_status(admin, "/readyz") != Some(200) {
        assert!(Instant::now() < deadline, "/readyz never turned 200");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// 2xx answers of listener `web` so far, from /metrics.
fn served(admin: SocketAddr, upstream: &str) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let text = rt.block_on(get(admin, "/metrics")).body;
    let prefix = format!(
        "sluice_http_requests_total{{code=\"2xx\",listener=\"web\",upstream=\"{upstream}\"}} "
    );
    metric(&text, &prefix).unwrap_or(0.0)
}

/// The failed samples, described.
fn errors(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter_map(|s| match &s.result {
            Err(e) => Some(format!("{:?}: {e}", s.kind)),
            Ok(_) => None,
        })
        .collect()
}

const DRAIN_DELAY: Duration = Duration::from_secs(2);
/// How long after /readyz turns 503 the endpoints still include the old
/// pod: probe period and propagation in a cluster; shorter than
/// `DRAIN_DELAY`, as the manifests require.
const ENDPOINT_REMOVAL_LAG: Duration = Duration::from_secs(1);
/// The slow requests in flight when the old pod is told to stop: longer
/// than the drain delay, shorter than the grace.
const SLOW: Duration = Duration::from_millis(3500);

#[test]
fn kubernetes_rollout_replayed_loses_no_request() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let app = rt.block_on(Backend::start("app"));
    let slow = rt.block_on(Backend::start("slow"));
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [shutdown]\ndrain_delay = \"{}ms\"\ngrace = \"10s\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\
         [[listener.route]]\npath_prefix = \"/sleep/\"\nupstream = \"slow\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n\
         [[upstream]]\nname = \"slow\"\nbackends = [\"{}\"]\n",
        DRAIN_DELAY.as_millis(),
        app.addr,
        slow.addr
    );
    let mut old = Proc::start(&cfg);
    let old_addr = old.addr("web");
    let endpoints = Endpoints::default();
    endpoints.set(&[old_addr]);
    let load = rt.block_on(async {
        Load::start(
            &endpoints,
            &[
                (Kind::KeepAlive, 4),
                (Kind::NewConnection, 2),
                (Kind::H2, 1),
            ],
        )
    });
    rt.block_on(load.wait_ok(200));

    // The new pod starts, turns ready and joins the endpoints (maxSurge).
    let mut new = Proc::start(&cfg);
    wait_ready(new.admin);
    endpoints.set(&[old_addr, new.addr("web")]);
    rt.block_on(load.wait_ok(200));

    // Slow requests in flight on the old pod, over HTTP/1.1 and HTTP/2.
    let path = format!("/sleep/{}", SLOW.as_millis());
    let slow_h1 = rt.spawn({
        let path = path.clone();
        async move { get(old_addr, &path).await.status.as_u16() }
    });
    let slow_h2 = rt.spawn(async move {
        let req = Request::get(format!("http://{old_addr}{path}"))
            .body(empty())
            .expect("request");
        send(&h2_client(), req).await.status.as_u16()
    });
    rt.block_on(slow.wait_hits(2));
    // The slow requests end SLOW after this (they reached the backend
    // just before).
    let slow_arrived = Instant::now();
    let before = served(old.admin, "app");

    // SIGTERM: /readyz must say 503 at once.
    let signalled = Instant::now();
    old.signal(Signal::SIGTERM);
    let readyz_after = readyz_turns_503(old.admin, signalled);

    // The endpoints drop the old pod after the lag; it keeps serving the
    // connections it has and the ones that still reach it until then.
    std::thread::sleep(ENDPOINT_REMOVAL_LAG.saturating_sub(signalled.elapsed()));
    endpoints.set(&[new.addr("web")]);
    std::thread::sleep(
        (DRAIN_DELAY - Duration::from_millis(300)).saturating_sub(signalled.elapsed()),
    );
    let during_drain = served(old.admin, "app") - before;

    let code = old.wait_exit(Duration::from_secs(20));
    let exited_after = signalled.elapsed();
    let exited_after_slow_arrived = slow_arrived.elapsed();
    assert_eq!(code, Some(0), "the old pod exits 0");
    assert_eq!(
        rt.block_on(slow_h1).expect("task"),
        200,
        "slow HTTP/1.1 request"
    );
    assert_eq!(
        rt.block_on(slow_h2).expect("task"),
        200,
        "slow HTTP/2 request"
    );
    // The new pod carries on alone.
    rt.block_on(load.wait_ok(200));
    let samples = rt.block_on(load.finish());

    let failed = errors(&samples);
    let retries = samples.iter().filter(|s| s.retried).count();
    let in_drain = samples
        .iter()
        .filter(|s| s.started >= signalled && s.started < signalled + DRAIN_DELAY)
        .count();
    let closed_before = samples
        .iter()
        .filter(|s| s.finished < signalled && matches!(s.result, Ok((_, true))))
        .count();
    let closed_in_drain = samples
        .iter()
        .filter(|s| s.started >= signalled && matches!(s.result, Ok((_, true))))
        .count();
    println!(
        "rollout: {} requests, {} errors, {retries} HTTP/2 requests sent again after a GOAWAY; {in_drain} sent during drain_delay, \
         {during_drain} of them served by the old pod, {closed_in_drain} answered \
         `connection: close`; /readyz 503 after {readyz_after:?}; old pod exited 0 \
         after {exited_after:?} (slow requests {SLOW:?})",
        samples.len(),
        failed.len(),
    );
    assert!(failed.is_empty(), "client-visible errors: {failed:#?}");
    assert!(
        readyz_after <= Duration::from_millis(100),
        "/readyz turned 503 only after {readyz_after:?}"
    );
    assert!(
        during_drain >= 10.0,
        "the old pod served during drain_delay"
    );
    assert_eq!(closed_before, 0, "no `connection: close` before SIGTERM");
    assert!(
        closed_in_drain > 0,
        "HTTP/1.1 answers during the drain say `connection: close`"
    );
    // Measured from their arrival (not from SIGTERM, which came a little
    // later), with 50 ms for the notification of that arrival; a pod that
    // did not wait would exit at drain_delay, 1.5 s sooner.
    assert!(
        exited_after_slow_arrived + Duration::from_millis(50) >= SLOW,
        "the old pod waited for its slow requests ({exited_after_slow_arrived:?})"
    );

    new.signal(Signal::SIGTERM);
    assert_eq!(new.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn a_second_process_on_the_same_port_takes_over_without_errors() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let app = rt.block_on(Backend::start("app"));
    let port = free_addr();
    let cfg = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [shutdown]\ndrain_delay = \"1s\"\ngrace = \"10s\"\n\
         [[listener]]\nname = \"web\"\nlisten = \"{port}\"\nupstream = \"app\"\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{}\"]\n",
        app.addr
    );
    let mut old = Proc::start(&cfg);
    let endpoints = Endpoints::default();
    endpoints.set(&[port]);
    let load = rt.block_on(async {
        Load::start(
            &endpoints,
            &[
                (Kind::KeepAlive, 3),
                (Kind::NewConnection, 3),
                (Kind::H2, 1),
            ],
        )
    });
    rt.block_on(load.wait_ok(200));

    // The new process binds the same port beside the old one (its own
    // admin port) and gets a share of the new connections.
    let mut new = Proc::start(&cfg);
    assert_eq!(new.addr("web"), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served(new.admin, "app") < 20.0 {
        assert!(Instant::now() < deadline, "the new process got no traffic");
        std::thread::sleep(Duration::from_millis(20));
    }

    let signalled = Instant::now();
    old.signal(Signal::SIGTERM);
    let readyz_after = readyz_turns_503(old.admin, signalled);
    let code = old.wait_exit(Duration::from_secs(20));
    let exited_after = signalled.elapsed();
    assert_eq!(code, Some(0), "the old process exits 0");
    let by_new_before = served(new.admin, "app");
    rt.block_on(load.wait_ok(300));
    // A request is counted when its exchange ends, which can be just after
    // the client has its answer: read the count until it catches up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut by_new_after = served(new.admin, "app") - by_new_before;
    while by_new_after < 300.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        by_new_after = served(new.admin, "app") - by_new_before;
    }
    let samples = rt.block_on(load.finish());

    let failed = errors(&samples);
    let retries = samples.iter().filter(|s| s.retried).count();
    println!(
        "SO_REUSEPORT takeover: {} requests, {} errors, {retries} HTTP/2 requests sent again after a GOAWAY; /readyz 503 after {readyz_after:?}; \
         old process exited 0 after {exited_after:?}; {by_new_after} served by the new one after that",
        samples.len(),
        failed.len(),
    );
    assert!(failed.is_empty(), "client-visible errors: {failed:#?}");
    assert!(
        by_new_after >= 300.0,
        "the new process serves everything after"
    );

    new.signal(Signal::SIGTERM);
    assert_eq!(new.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn answers_during_the_drain_delay_close_their_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let backend = Backend::start("a").await;
        let cfg = simple_config(&[&backend], "").replace(
            "[[listener]]",
            "[shutdown]\ndrain_delay = \"5s\"\n\n[[listener]]",
        );
        let proxy = start_proxy(&cfg).await;
        let addr = proxy.listener_addr("web").expect("web");
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let mut buf = vec![0u8; 4096];

        conn.write_all(request).await.expect("write");
        let n = conn.read(&mut buf).await.expect("read");
        let first = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(first.starts_with("http/1.1 200"), "{first}");
        assert!(!first.contains("connection: close"), "{first}");

        proxy.shutdown();
        while admin_get(&proxy, "/readyz").await.status != 503 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The same keep-alive connection, while the listener still accepts.
        conn.write_all(request).await.expect("write");
        let mut text = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut text))
            .await
            .expect("the proxy closes the connection after the answer")
            .expect("read");
        let second = String::from_utf8_lossy(&text).to_ascii_lowercase();
        assert!(second.starts_with("http/1.1 200"), "{second}");
        assert!(second.contains("connection: close"), "{second}");
        // New connections are still accepted and served during the drain.
        let answer = get(addr, "/").await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.headers.get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..])
        );
    });
}
