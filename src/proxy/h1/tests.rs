//! Loopback tests of the HTTP/1 server codec: a raw TCP client against
//! `serve_connection`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::*;

const WAIT: Duration = Duration::from_secs(10);

/// A body fed from a channel: no size hint, frames when the test says so.
struct ChanBody(mpsc::Receiver<Frame<Bytes>>);

impl ResponseFields for ChanBody {}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn chan_body() -> (mpsc::Sender<Frame<Bytes>>, ChanBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChanBody(rx))
}

struct Server {
    addr: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    /// `(status, reason)` of each refused request, as `refused` heard it.
    refused: Arc<std::sync::Mutex<Vec<(u16, &'static str)>>>,
    shutdown: CancellationToken,
    results: mpsc::UnboundedReceiver<Result<(), ServeError>>,
}

impl Server {
    /// The result of the next connection to end.
    async fn result(&mut self) -> Result<(), ServeError> {
        tokio::time::timeout(WAIT, self.results.recv())
            .await
            .expect("connection did not end")
            .expect("server task gone")
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn refused(&self) -> Vec<(u16, &'static str)> {
        self.refused.lock().expect("refused list").clone()
    }
}

fn settings() -> H1Settings {
    H1Settings {
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        max_head_bytes: 8 * 1024,
        max_headers: 20,
    }
}

/// Hooks that note each refused request.
struct Refusals(Arc<std::sync::Mutex<Vec<(u16, &'static str)>>>);

impl Hooks for Refusals {
    fn refused(&self, status: u16, reason: &'static str) {
        self.0.lock().expect("refused list").push((status, reason));
    }
}

/// Binds 127.0.0.1:0 and serves every accepted connection with `handler`.
async fn serve<F, Fut, B>(settings: H1Settings, handler: F) -> Server
where
    F: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + ResponseFields + Send + 'static,
    B::Error: Into<BoxError>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let calls = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(std::sync::Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let (tx, results) = mpsc::unbounded_channel();
    let (calls2, refused2, token) = (calls.clone(), refused.clone(), shutdown.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (handler, calls, refused, token, tx) = (
                handler.clone(),
                calls2.clone(),
                refused2.clone(),
                token.clone(),
                tx.clone(),
            );
            let settings = settings.clone();
            tokio::spawn(async move {
                let handler = move |req| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    handler(req)
                };
                let hooks = Refusals(refused);
                let res = serve_connection_parkable(
                    stream,
                    BytesMut::new(),
                    &settings,
                    token,
                    handler,
                    &hooks,
                )
                .await
                .map(|_| ());
                let _ = tx.send(res);
            });
        }
    });
    Server {
        addr,
        calls,
        refused,
        shutdown,
        results,
    }
}

/// Answers `hello` (Content-Length) to anything, reading nothing.
async fn hello(_req: Request<RequestBody>) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(b"hello")))
}

/// Echoes the request body back, streaming.
async fn echo(req: Request<RequestBody>) -> Response<RequestBody> {
    Response::new(req.into_body())
}

/// Reads the whole request body and answers with its length and contents.
async fn collect(req: Request<RequestBody>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let collected = body.collect().await;
    let mut res = match collected {
        Ok(c) => {
            let trailers = c.trailers().cloned();
            let mut res = Response::new(Full::new(c.to_bytes()));
            if let Some(t) = trailers {
                for (k, v) in &t {
                    let name = format!("got-trailer-{k}");
                    let name = http::HeaderName::from_bytes(name.as_bytes()).expect("name");
                    res.headers_mut().insert(name, v.clone());
                }
            }
            res
        }
        Err(e) => {
            let mut res = Response::new(Full::new(Bytes::from(e.to_string())));
            *res.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
            res
        }
    };
    if let Some(v) = parts.headers.get("expect") {
        res.headers_mut().insert("saw-expect", v.clone());
    }
    res
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        Client {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("client write");
    }

    /// Reads more; false at end of stream.
    async fn fill(&mut self) -> bool {
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
            .await
            .expect("client read timed out")
            .unwrap_or(0);
        n > 0
    }

    async fn response(&mut self) -> Resp {
        self.read_response(true).await
    }

    async fn response_without_body(&mut self) -> Resp {
        self.read_response(false).await
    }

    async fn read_response(&mut self, with_body: bool) -> Resp {
        let (status, headers) = loop {
            let mut h = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut h);
            match res.parse(&self.buf).expect("valid response head") {
                httparse::Status::Complete(n) => {
                    let status = res.code.expect("status");
                    let headers: Vec<(String, String)> = res
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let _ = self.buf.split_to(n);
                    break (status, headers);
                }
                httparse::Status::Partial => {
                    assert!(self.fill().await, "eof in response head: {:?}", self.buf)
                }
            }
        };
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            trailers: Vec::new(),
        };
        if !with_body || status / 100 == 1 || status == 204 || status == 304 {
            return resp;
        }
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                assert!(self.fill().await, "eof in body");
            }
            resp.body = self.buf.split_to(len).to_vec();
        } else if resp.header("transfer-encoding") == Some("chunked") {
            loop {
                let line = self.line().await;
                let size = usize::from_str_radix(line.split(';').next().unwrap_or(""), 16)
                    .expect("chunk size");
                if size == 0 {
                    loop {
                        let line = self.line().await;
                        if line.is_empty() {
                            break;
                        }
                        let (k, v) = line.split_once(':').expect("trailer");
                        resp.trailers.push((k.to_string(), v.trim().to_string()));
                    }
                    break;
                }
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "eof in chunk");
                }
                resp.body.extend_from_slice(&self.buf[..size]);
                assert_eq!(&self.buf[size..size + 2], b"\r\n");
                let _ = self.buf.split_to(size + 2);
            }
        } else {
            while self.fill().await {}
            resp.body = self.buf.split().to_vec();
        }
        resp
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                let _ = self.buf.split_to(i + 2);
                return line;
            }
            assert!(self.fill().await, "eof in line");
        }
    }

    /// True when the server closed the connection (no further bytes).
    async fn is_closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let mut server = serve(settings(), hello).await;
    let mut client = Client::connect(server.addr).await;
    for _ in 0..3 {
        client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let resp = client.response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "hello");
        assert_eq!(resp.header("content-length"), Some("5"));
        assert_eq!(resp.header("connection"), None);
    }
    client
        .send(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await;
    let resp = client.response().await;
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(client.is_closed().await);
    assert!(server.result().await.is_ok());
    assert_eq!(server.calls(), 4);
}

/// A body that, when dropped, gives the client a moment to read the
/// response and notes whether it did.
struct NotedBody {
    inner: Full<Bytes>,
    /// Set by the client once it has read the response.
    read: Arc<std::sync::atomic::AtomicBool>,
    /// Set on drop: whether the client had read the response by then.
    read_first: Arc<std::sync::Mutex<Option<bool>>>,
}

impl ResponseFields for NotedBody {}

impl Drop for NotedBody {
    fn drop(&mut self) {
        // Blocks this worker thread; the client runs on the other one.
        let deadline = std::time::Instant::now() + Duration::from_millis(200);
        while !self.read.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let read = self.read.load(Ordering::SeqCst);
        *self.read_first.lock().expect("noted") = Some(read);
    }
}

impl Body for NotedBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response without body bytes (empty, 204, or to HEAD) drops its body
/// before the response goes out, as a body that runs to its end does, so
/// what the body records when it ends (the request's metrics and access
/// log line) is recorded before the client can read the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_body_bytes_drops_its_body_before_it_is_sent() {
    let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let read_first = Arc::new(std::sync::Mutex::new(None));
    let (read2, read_first2) = (read.clone(), read_first.clone());
    let server = serve(settings(), move |req: Request<RequestBody>| {
        let (read, read_first) = (read2.clone(), read_first2.clone());
        async move {
            let (status, bytes) = match req.uri().path() {
                "/empty" => (StatusCode::OK, Bytes::new()),
                "/no-content" => (StatusCode::NO_CONTENT, Bytes::new()),
                _ => (StatusCode::OK, Bytes::from_static(b"hello")),
            };
            let body = NotedBody {
                inner: Full::new(bytes),
                read,
                read_first,
            };
            let mut res = Response::new(body);
            *res.status_mut() = status;
            res
        }
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    for (request, status) in [
        ("GET /empty HTTP/1.1\r\nhost: a\r\n\r\n", 200),
        ("GET /no-content HTTP/1.1\r\nhost: a\r\n\r\n", 204),
        ("HEAD /hello HTTP/1.1\r\nhost: a\r\n\r\n", 200),
        ("GET /hello HTTP/1.1\r\nhost: a\r\n\r\n", 200),
    ] {
        read.store(false, Ordering::SeqCst);
        client.send(request.as_bytes()).await;
        let resp = if request.starts_with("HEAD") {
            client.response_without_body().await
        } else {
            client.response().await
        };
        read.store(true, Ordering::SeqCst);
        assert_eq!(resp.status, status, "{request}");
        // The drop has happened: the response was only sent after it.
        let noted = read_first.lock().expect("noted").take();
        assert_eq!(noted, Some(false), "{request}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = serve(settings(), |req: Request<RequestBody>| async move {
        Response::new(Full::new(Bytes::from(req.uri().path().to_string())))
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(
            b"GET /one HTTP/1.1\r\nhost: a\r\n\r\n\
              POST /two HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc\
              GET /three HTTP/1.1\r\nhost: a\r\n\r\n",
        )
        .await;
    for path in ["/one", "/two", "/three"] {
        let resp = client.response().await;
        assert_eq!(resp.text(), path);
    }
    assert_eq!(server.calls(), 3);
}

#[tokio::test]
async fn content_length_body_reaches_the_handler_intact() {
    let server = serve(settings(), collect).await;
    let mut client = Client::connect(server.addr).await;
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let head = format!(
        "PUT /x HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    client.send(head.as_bytes()).await;
    client.send(&body).await;
    let resp = client.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, body);
}

#[tokio::test]
async fn chunked_body_with_extensions_and_trailers_reaches_the_handler() {
    let server = serve(settings(), collect).await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: Chunked\r\n\r\n\
              5;name=value\r\nhello\r\n\
              1 ;x\r\n \r\n\
              00005\r\nworld\r\n\
              0\r\nchecksum: abc\r\ncontent-length: 99\r\n\r\n",
        )
        .await;
    let resp = client.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "hello world");
    assert_eq!(resp.header("got-trailer-checksum"), Some("abc"));
    assert_eq!(resp.header("got-trailer-content-length"), None);
}

#[tokio::test]
async fn malformed_chunks_surface_as_body_errors() {
    let cases: [&[u8]; 5] = [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"fffffffffffffffff\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
    ];
    let mut server = serve(settings(), collect).await;
    for body in cases {
        let mut client = Client::connect(server.addr).await;
        client
            .send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        client.send(body).await;
        let resp = client.response().await;
        assert_eq!(resp.status, 422, "{}", String::from_utf8_lossy(body));
        assert!(resp.text().contains("chunk"), "{}", resp.text());
        assert!(client.is_closed().await);
        assert!(server.result().await.is_ok());
    }
}

#[tokio::test]
async fn ten_mib_body_streams_through_without_being_buffered_whole() {
    const TOTAL: usize = 10 * 1024 * 1024;
    let (first_mib_tx, first_mib_rx) = oneshot::channel::<()>();
    let first_mib_tx = Arc::new(std::sync::Mutex::new(Some(first_mib_tx)));
    let server = serve(settings(), move |req: Request<RequestBody>| {
        let first_mib_tx = first_mib_tx.clone();
        async move {
            let mut body = req.into_body();
            let (mut total, mut largest) = (0usize, 0usize);
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("body frame");
                if let Some(d) = frame.data_ref() {
                    total += d.len();
                    largest = largest.max(d.len());
                }
                if total >= 1024 * 1024 {
                    if let Some(tx) = first_mib_tx.lock().expect("lock").take() {
                        let _ = tx.send(());
                    }
                }
            }
            Response::new(Full::new(Bytes::from(format!("{total} {largest}"))))
        }
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    let head = format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: {TOTAL}\r\n\r\n");
    client.send(head.as_bytes()).await;
    let piece = vec![7u8; 64 * 1024];
    for _ in 0..16 {
        client.send(&piece).await;
    }
    // The handler has seen the first MiB before the rest is even sent.
    tokio::time::timeout(WAIT, first_mib_rx)
        .await
        .expect("handler saw the first MiB")
        .expect("signal");
    for _ in 16..TOTAL / piece.len() {
        client.send(&piece).await;
    }
    let resp = client.response().await;
    let text = resp.text();
    let (total, largest) = text.split_once(' ').expect("answer");
    assert_eq!(total.parse::<usize>().expect("total"), TOTAL);
    assert!(
        largest.parse::<usize>().expect("largest") <= 64 * 1024,
        "{text}"
    );
}

#[tokio::test]
async fn request_and_response_stream_full_duplex() {
    let server = serve(settings(), echo).await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    client.send(b"3\r\nabc\r\n").await;
    let resp = client.response_without_body().await;
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    // Each chunk comes back before the next is sent.
    assert_eq!(client.line().await, "3");
    assert_eq!(client.line().await, "abc");
    client.send(b"2\r\nde\r\n").await;
    assert_eq!(client.line().await, "2");
    assert_eq!(client.line().await, "de");
    client.send(b"0\r\n\r\n").await;
    assert_eq!(client.line().await, "0");
    assert_eq!(client.line().await, "");
}

#[tokio::test]
async fn chunked_response_carries_trailers() {
    let server = serve(settings(), |_req: Request<RequestBody>| async move {
        let (tx, body) = chan_body();
        tokio::spawn(async move {
            let _ = tx.send(Frame::data(Bytes::from_static(b"part one,"))).await;
            let _ = tx.send(Frame::data(Bytes::new())).await;
            let _ = tx.send(Frame::data(Bytes::from(vec![b'x'; 10_000]))).await;
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            let _ = tx.send(Frame::trailers(t)).await;
        });
        let mut res = Response::new(body);
        res.headers_mut()
            .insert("trailer", HeaderValue::from_static("grpc-status"));
        res
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let resp = client.response().await;
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(resp.body.len(), 9 + 10_000);
    assert!(resp.body.starts_with(b"part one,x"));
    assert_eq!(
        resp.trailers,
        vec![("grpc-status".to_string(), "0".to_string())]
    );
    // Still usable afterwards.
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.status, 200);
}

#[tokio::test]
async fn head_204_and_304_have_no_body() {
    let server = serve(settings(), |req: Request<RequestBody>| async move {
        let status = match req.uri().path() {
            "/204" => StatusCode::NO_CONTENT,
            "/304" => StatusCode::NOT_MODIFIED,
            _ => StatusCode::OK,
        };
        let mut res = Response::new(Full::new(Bytes::from_static(b"body!")));
        *res.status_mut() = status;
        res
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let resp = client.response_without_body().await;
    assert_eq!(resp.status, 200);
    for path in ["/204", "/304"] {
        client
            .send(format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
            .await;
        let resp = client.response_without_body().await;
        assert_eq!(resp.header("transfer-encoding"), None);
        if path == "/204" {
            assert_eq!(resp.header("content-length"), None);
        }
    }
    // Had any of them carried a body, this response would not parse.
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let resp = client.response().await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "body!"));
}

#[tokio::test]
async fn http10_gets_close_delimited_streaming_and_keep_alive_on_request() {
    let server = serve(settings(), |req: Request<RequestBody>| async move {
        let (tx, body) = chan_body();
        let path = req.uri().path().to_string();
        tokio::spawn(async move {
            let _ = tx.send(Frame::data(Bytes::from(path))).await;
        });
        Response::new(body)
    })
    .await;
    // Unknown length: close-delimited, never chunked, to a 1.0 client.
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET /a HTTP/1.0\r\n\r\n").await;
    let resp = client.response().await;
    assert_eq!(resp.header("transfer-encoding"), None);
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(resp.text(), "/a");

    let server = serve(settings(), hello).await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await;
    let resp = client.response().await;
    assert_eq!(resp.header("connection"), Some("keep-alive"));
    client.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let resp = client.response().await;
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(client.is_closed().await);
}

#[tokio::test]
async fn header_timeout_answers_408_with_sluice_error() {
    let mut server = serve(
        H1Settings {
            header_timeout: Duration::from_millis(200),
            ..settings()
        },
        hello,
    )
    .await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n").await;
    let resp = client.response().await;
    assert_eq!(resp.status, 408);
    assert_eq!(resp.header("sluice-error"), Some("request-timeout"));
    assert_eq!(server.refused(), [(408, "request-timeout")]);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(client.is_closed().await);
    assert!(matches!(
        server.result().await,
        Err(ServeError::Rejected { status, .. }) if status == StatusCode::REQUEST_TIMEOUT
    ));
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn idle_timeout_closes_silently() {
    let mut server = serve(
        H1Settings {
            idle_timeout: Duration::from_millis(200),
            ..settings()
        },
        hello,
    )
    .await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.status, 200);
    assert!(client.is_closed().await, "closed without another response");
    assert!(server.result().await.is_ok());
}

/// The idle timer is armed once and moved later only when it fires early:
/// a connection idle past the deadline of an earlier wait, but not for
/// the whole timeout since its last response, stays open.
#[tokio::test]
async fn idle_timeout_counts_from_the_last_response() {
    let idle = Duration::from_millis(1000);
    let pause = Duration::from_millis(700);
    let mut server = serve(
        H1Settings {
            idle_timeout: idle,
            ..settings()
        },
        hello,
    )
    .await;
    let mut client = Client::connect(server.addr).await;
    for _ in 0..3 {
        client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        assert_eq!(client.response().await.status, 200);
        // The second pause ends after the first wait's deadline.
        tokio::time::sleep(pause).await;
    }
    assert_eq!(server.calls(), 3);
    assert!(client.is_closed().await, "closed once idle for the timeout");
    assert!(server.result().await.is_ok());
}

#[tokio::test(flavor = "current_thread")]
async fn idle_connection_gives_its_buffers_back() {
    let server = serve(settings(), hello).await;
    let before = conn::pooled();
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.status, 200);
    // Last resort polling: nothing signals "the server went idle".
    let deadline = tokio::time::Instant::now() + WAIT;
    while conn::pooled() < before + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool has {}",
            conn::pooled()
        );
        tokio::task::yield_now().await;
    }
    // The next request takes them again.
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.status, 200);
}

#[tokio::test]
async fn malformed_and_smuggling_requests_are_refused_before_the_handler() {
    let long_target = format!("GET /{} HTTP/1.1\r\nhost: a\r\n\r\n", "a".repeat(9000));
    let big_header = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let many_headers = format!(
        "GET / HTTP/1.1\r\nhost: a\r\n{}\r\n",
        (0..30).map(|i| format!("x-{i}: 1\r\n")).collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("cl and te", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, "bad-request"),
        ("te and cl", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n".to_vec(), 400, "bad-request"),
        ("differing cl", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello".to_vec(), 400, "bad-request"),
        ("signed cl", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: +5\r\n\r\nhello".to_vec(), 400, "bad-request"),
        ("cl list", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5, 5\r\n\r\nhello".to_vec(), 400, "bad-request"),
        ("hex cl", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0x5\r\n\r\nhello".to_vec(), 400, "bad-request"),
        ("overflowing cl", b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 18446744073709551616\r\n\r\n".to_vec(), 400, "bad-request"),
        ("te list", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, identity\r\n\r\n".to_vec(), 400, "bad-request"),
        ("xchunked", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: xchunked\r\n\r\n".to_vec(), 400, "bad-request"),
        ("te with vt", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\x0b\r\n\r\n".to_vec(), 400, "bad-request"),
        ("two te", b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(), 400, "bad-request"),
        ("te in 1.0", b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, "bad-request"),
        ("two hosts", b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n".to_vec(), 400, "bad-request"),
        ("no host", b"GET / HTTP/1.1\r\nx: y\r\n\r\n".to_vec(), 400, "bad-request"),
        ("host with path", b"GET / HTTP/1.1\r\nhost: a/b\r\n\r\n".to_vec(), 400, "bad-request"),
        ("connection names cl", b"GET / HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, content-length\r\n\r\n".to_vec(), 400, "bad-request"),
        ("connection names host", b"GET / HTTP/1.1\r\nhost: a\r\nconnection: Host\r\n\r\n".to_vec(), 400, "bad-request"),
        ("space before colon", b"GET / HTTP/1.1\r\nhost: a\r\ntransfer-encoding : chunked\r\n\r\n".to_vec(), 400, "bad-request"),
        ("obs-fold", b"GET / HTTP/1.1\r\nhost: a\r\nx: y\r\n z\r\n\r\n".to_vec(), 400, "bad-request"),
        ("nul in value", b"GET / HTTP/1.1\r\nhost: a\r\nx: a\x00b\r\n\r\n".to_vec(), 400, "bad-request"),
        ("bare cr", b"GET / HTTP/1.1\r\nhost: a\rx: y\r\n\r\n".to_vec(), 400, "bad-request"),
        ("bad target", b"GET example.com HTTP/1.1\r\nhost: a\r\n\r\n".to_vec(), 400, "bad-request"),
        ("asterisk not options", b"GET * HTTP/1.1\r\nhost: a\r\n\r\n".to_vec(), 400, "bad-request"),
        ("garbage version", b"GET / HTTX/1.1\r\nhost: a\r\n\r\n".to_vec(), 400, "bad-request"),
        ("http/2.0", b"GET / HTTP/2.0\r\nhost: a\r\n\r\n".to_vec(), 505, "version-not-supported"),
        ("http/1.2", b"GET / HTTP/1.2\r\nhost: a\r\n\r\n".to_vec(), 505, "version-not-supported"),
        ("connect", b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n".to_vec(), 405, "method-not-allowed"),
        ("long target", long_target.into_bytes(), 414, "uri-too-long"),
        ("big header", big_header.into_bytes(), 431, "headers-too-large"),
        ("many headers", many_headers.into_bytes(), 431, "headers-too-large"),
    ];
    let mut server = serve(settings(), hello).await;
    for (name, request, status, reason) in cases {
        let mut client = Client::connect(server.addr).await;
        client.send(&request).await;
        let resp = client.response().await;
        assert_eq!(resp.status, status, "{name}: {}", resp.text());
        assert_eq!(resp.header("sluice-error"), Some(reason), "{name}");
        // Heard of before the response was written, so before it was read.
        assert_eq!(server.refused().last(), Some(&(status, reason)), "{name}");
        assert_eq!(resp.header("connection"), Some("close"), "{name}");
        assert_eq!(
            resp.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert!(client.is_closed().await, "{name}: closed");
        drop(client);
        assert!(
            matches!(server.result().await, Err(ServeError::Rejected { .. })),
            "{name}"
        );
    }
    assert_eq!(server.calls(), 0, "the handler saw a refused request");
}

#[tokio::test]
async fn accepted_edge_cases_reach_the_handler() {
    let server = serve(settings(), |req: Request<RequestBody>| async move {
        let cl = req
            .headers()
            .get_all("content-length")
            .iter()
            .count()
            .to_string();
        Response::new(Full::new(Bytes::from(format!(
            "{} {} {}",
            req.uri(),
            cl,
            req.headers().contains_key("expect")
        ))))
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nhi")
        .await;
    assert_eq!(client.response().await.text(), "/ 1 false");
    client.send(b"OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.text(), "* 0 false");
    client
        .send(b"GET http://example.com/p?q HTTP/1.1\r\nhost: example.com\r\n\r\n")
        .await;
    assert_eq!(
        client.response().await.text(),
        "http://example.com/p?q 0 false"
    );
    client.send(b"\r\nGET /x HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.text(), "/x 0 false");
    assert_eq!(server.calls(), 4);
}

#[tokio::test]
async fn expect_continue_is_answered_when_the_body_is_first_read() {
    let server = serve(settings(), collect).await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await;
    let interim = client.response_without_body().await;
    assert_eq!(interim.status, 100);
    client.send(b"hello").await;
    let resp = client.response().await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "hello"));
    assert_eq!(resp.header("saw-expect"), None, "expect is removed");

    // A handler that never reads: no 100, and the connection closes.
    let server = serve(settings(), hello).await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await;
    let resp = client.response().await;
    assert_eq!(resp.status, 200);
    assert!(client.is_closed().await);
}

#[tokio::test]
async fn unread_small_body_is_drained_and_large_one_closes() {
    let server = serve(settings(), hello).await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\n0123456789")
        .await;
    assert_eq!(client.response().await.status, 200);
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.status, 200);

    let mut client = Client::connect(server.addr).await;
    client
        .send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10000000\r\n\r\n")
        .await;
    let piece = vec![0u8; 128 * 1024];
    client.send(&piece).await;
    assert_eq!(client.response().await.status, 200);
    assert!(client.is_closed().await);
}

#[tokio::test]
async fn response_body_shorter_than_its_content_length_closes() {
    let server = serve(settings(), |_req: Request<RequestBody>| async move {
        let mut res = Response::new(Full::new(Bytes::from_static(b"abc")));
        res.headers_mut()
            .insert("content-length", HeaderValue::from_static("10"));
        res.headers_mut()
            .insert("transfer-encoding", HeaderValue::from_static("chunked"));
        res
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let resp = client.response_without_body().await;
    assert_eq!(resp.header("content-length"), Some("10"));
    assert_eq!(resp.header("transfer-encoding"), None);
    while client.fill().await {}
    assert_eq!(&client.buf[..], b"abc", "the short body, then the close");
}

#[tokio::test]
async fn shutdown_while_idle_closes_at_once() {
    let mut server = serve(settings(), hello).await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert_eq!(client.response().await.status, 200);
    server.shutdown.cancel();
    assert!(client.is_closed().await);
    assert!(server.result().await.is_ok());
}

#[tokio::test]
async fn shutdown_still_serves_a_request_whose_bytes_have_arrived() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut client = Client::connect(listener.local_addr().expect("addr")).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let (stream, _) = listener.accept().await.expect("accept");
    // The request is in the socket before the codec looks, and the
    // shutdown has already begun.
    let mut peeked = [0u8; 4];
    let n = stream.peek(&mut peeked).await.expect("peek");
    assert_eq!(&peeked[..n], b"GET ");
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let served =
        tokio::spawn(async move { serve_connection(stream, &settings(), shutdown, hello).await });
    let resp = client.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(client.is_closed().await);
    assert!(served.await.expect("task").is_ok());
}

#[tokio::test]
async fn shutdown_in_flight_finishes_the_request_with_connection_close() {
    let (entered_tx, entered_rx) = mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let mut server = serve(settings(), move |_req: Request<RequestBody>| {
        let (entered_tx, release_rx) = (entered_tx.clone(), release_rx.clone());
        async move {
            let _ = entered_tx.send(());
            if let Some(rx) = release_rx.lock().await.take() {
                let _ = rx.await;
            }
            Response::new(Empty::<Bytes>::new())
        }
    })
    .await;
    let mut entered_rx = entered_rx;
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    tokio::time::timeout(WAIT, entered_rx.recv())
        .await
        .expect("handler entered");
    server.shutdown.cancel();
    let _ = release_tx.send(());
    let resp = client.response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(client.is_closed().await);
    assert!(server.result().await.is_ok());
}

#[tokio::test]
async fn upgrade_copies_both_ways_including_early_client_bytes() {
    let (upstream_tx, upstream_rx) = mpsc::unbounded_channel::<tokio::io::DuplexStream>();
    let mut server = serve(settings(), move |req: Request<RequestBody>| {
        let upstream_tx = upstream_tx.clone();
        async move {
            assert_eq!(req.headers()["upgrade"], "websocket");
            let (ours, theirs) = tokio::io::duplex(1024);
            let _ = upstream_tx.send(theirs);
            let mut res = Response::new(Empty::<Bytes>::new());
            *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            res.extensions_mut().insert(UpgradeIo::new(ours));
            res
        }
    })
    .await;
    let mut upstream_rx = upstream_rx;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\nearly")
        .await;
    let resp = client.response_without_body().await;
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("connection"), Some("upgrade"));
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    let mut upstream = tokio::time::timeout(WAIT, upstream_rx.recv())
        .await
        .expect("upstream")
        .expect("upstream stream");
    let mut got = [0u8; 5];
    upstream.read_exact(&mut got).await.expect("early bytes");
    assert_eq!(&got, b"early");
    client.send(b"ping").await;
    let mut got = [0u8; 4];
    upstream.read_exact(&mut got).await.expect("ping");
    assert_eq!(&got, b"ping");
    upstream.write_all(b"pong").await.expect("pong");
    while client.buf.len() < 4 {
        assert!(client.fill().await);
    }
    assert_eq!(&client.buf[..], b"pong");
    client.buf.clear();
    drop(upstream);
    client.stream.shutdown().await.expect("client shutdown");
    assert!(client.is_closed().await);
    assert!(server.result().await.is_ok());
}

#[tokio::test]
async fn switching_protocols_without_upgrade_io_is_a_502() {
    let mut server = serve(settings(), |_req: Request<RequestBody>| async move {
        let mut res = Response::new(Empty::<Bytes>::new());
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        res
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
        .await;
    let resp = client.response().await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("sluice-error"), Some("upgrade-failed"));
    assert!(client.is_closed().await);
    assert!(matches!(
        server.result().await,
        Err(ServeError::InvalidResponse { .. })
    ));
}

#[tokio::test]
async fn request_body_kept_past_the_response_fails_once_the_connection_closes() {
    let (body_tx, body_rx) = mpsc::unbounded_channel::<RequestBody>();
    let server = serve(settings(), move |req: Request<RequestBody>| {
        let body_tx = body_tx.clone();
        async move {
            let _ = body_tx.send(req.into_body());
            Response::new(Empty::<Bytes>::new())
        }
    })
    .await;
    let mut body_rx = body_rx;
    let mut client = Client::connect(server.addr).await;
    client
        .send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nab")
        .await;
    assert_eq!(client.response().await.status, 200);
    let body = body_rx.recv().await.expect("body");
    // The connection gives up on it (after the drain time) and closes.
    assert!(client.is_closed().await);
    let err = body.collect().await.expect_err("aborted");
    assert!(matches!(err, BodyError::Aborted), "{err}");
}

#[test]
fn request_body_and_upgrade_io_can_cross_tasks() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<RequestBody>();
    assert_send_sync::<UpgradeIo>();
    assert_send_sync::<ServeError>();
}

#[tokio::test]
async fn response_asking_to_close_ends_the_connection() {
    let mut server = serve(settings(), |_req: Request<RequestBody>| async move {
        let mut res = Response::new(Full::new(Bytes::from_static(b"bye")));
        res.headers_mut()
            .insert("connection", HeaderValue::from_static("Close"));
        res
    })
    .await;
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let resp = client.response().await;
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(resp.text(), "bye");
    assert!(client.is_closed().await);
    assert!(server.result().await.is_ok());
}
