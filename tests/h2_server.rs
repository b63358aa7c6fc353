//! The downstream HTTP/2 server: h2c with prior knowledge on plain
//! listeners, h2 by ALPN on TLS listeners. These tests pin down what the
//! server must do, whichever codec implements it: flow control both ways,
//! trailers, many streams, resets, malformed requests and connection
//! errors, PING and SETTINGS, the rapid-reset flood, cookies, `:authority`
//! and graceful stop.
//!
//! Clients are `h2::client` (when a test needs control over streams,
//! windows and resets), hyper's HTTP/2 client, or raw frames written on a
//! TCP socket: a 9-byte frame header and a payload, with HPACK blocks made
//! only of "literal header field without indexing, literal name" (no
//! Huffman), so no encoder is needed. Backends are real servers on
//! ephemeral loopback ports.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame as BodyFrame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::pki::{tls_connect, Pki};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Bounds that only turn a hang into a failure.
const LIMIT: Duration = Duration::from_secs(10);
const LONG_LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Raw frames
// ---------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FRAME_SIZE_ERROR: u32 = 0x6;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_ENABLE_PUSH: u16 = 0x2;

/// One frame: the 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    assert!(len < 1 << 24, "frame payload too long");
    let mut out = Vec::with_capacity(9 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in entries {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// An HPACK block of "literal header field without indexing, literal
/// name" entries (RFC 7541 section 6.2.2), no Huffman: names and values
/// are sent exactly as given, upper case included.
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127, "keep fields short");
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The pseudo-header fields of a valid `GET path`.
fn get_fields(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "h2.test"),
    ]
}

/// A HEADERS frame with END_HEADERS (and END_STREAM when `end`).
fn headers(stream: u32, fields: &[(&str, &str)], end: bool) -> Vec<u8> {
    let flags = END_HEADERS | if end { END_STREAM } else { 0 };
    frame(HEADERS, flags, stream, &hpack(fields))
}

/// A frame read back.
#[derive(Debug, Clone)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn u32_at(&self, at: usize) -> u32 {
        let b = &self.payload[at..at + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The error code of a RST_STREAM or GOAWAY.
    fn error_code(&self) -> u32 {
        match self.kind {
            RST_STREAM => self.u32_at(0),
            GOAWAY => self.u32_at(4),
            other => panic!("frame type {other} carries no error code"),
        }
    }

    fn last_stream_id(&self) -> u32 {
        assert_eq!(self.kind, GOAWAY);
        self.u32_at(0) & 0x7fff_ffff
    }

    /// The header block fragment of a HEADERS frame (padding and priority
    /// taken off).
    fn block(&self) -> &[u8] {
        assert_eq!(self.kind, HEADERS);
        let mut p = &self.payload[..];
        let mut pad = 0;
        if self.flags & PADDED != 0 {
            pad = p[0] as usize;
            p = &p[1..];
        }
        if self.flags & PRIORITY_FLAG != 0 {
            p = &p[5..];
        }
        &p[..p.len() - pad]
    }

    /// The `:status` of a response HEADERS frame.
    fn status(&self) -> u16 {
        decode_status(self.block())
            .unwrap_or_else(|| panic!("no :status decoded from {:02x?}", self.block()))
    }
}

/// Reads one frame, or `None` once the connection has closed (or failed).
async fn read_frame<R: AsyncRead + Unpin>(io: &mut R) -> Option<Frame> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// An HPACK integer with an `n`-bit prefix at `block[*at]`.
fn hpack_int(block: &[u8], at: &mut usize, n: u32) -> Option<usize> {
    let mask = (1usize << n) - 1;
    let mut value = (*block.get(*at)? as usize) & mask;
    *at += 1;
    if value < mask {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*at)? as usize;
        *at += 1;
        value += (b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
}

/// Decodes an HPACK Huffman string made only of digits (RFC 7541
/// appendix B: `0`-`2` are 5-bit codes, `3`-`9` 6-bit codes `011001`
/// to `011111`), which is all a status code needs.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let take = |from: usize, n: usize| -> usize {
        bits[from..from + n]
            .iter()
            .fold(0usize, |acc, &b| acc << 1 | b as usize)
    };
    let mut out = String::new();
    let mut at = 0;
    while at < bits.len() {
        let left = bits.len() - at;
        if left < 8 && bits[at..].iter().all(|&b| b == 1) {
            break; // EOS padding
        }
        if left >= 5 && take(at, 2) == 0 {
            let code = take(at, 5);
            if code > 2 {
                return None;
            }
            out.push(char::from(b'0' + code as u8));
            at += 5;
        } else if left >= 6 && take(at, 2) == 1 {
            let code = take(at, 6);
            if !(0x19..=0x1f).contains(&code) {
                return None;
            }
            out.push(char::from(b'3' + (code - 0x19) as u8));
            at += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

/// The `:status` of a response header block: its first field (pseudo
/// fields come first), either an indexed static entry (8-14) or a literal
/// whose name is `:status` (static index 8-14, or written out). A status
/// only in the dynamic table is not decoded (`None`).
fn decode_status(block: &[u8]) -> Option<u16> {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let mut at = 0;
    // Dynamic table size updates may come first.
    while block.get(at)? & 0xe0 == 0x20 {
        hpack_int(block, &mut at, 5)?;
    }
    let first = *block.get(at)?;
    if first & 0x80 != 0 {
        let index = hpack_int(block, &mut at, 7)?;
        return (8..=14).contains(&index).then(|| STATIC[index - 8]);
    }
    let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
    let index = hpack_int(block, &mut at, prefix)?;
    let read_string = |at: &mut usize| -> Option<String> {
        let huffman = block.get(*at)? & 0x80 != 0;
        let len = hpack_int(block, at, 7)?;
        let raw = block.get(*at..*at + len)?;
        *at += len;
        if huffman {
            huffman_digits(raw)
        } else {
            String::from_utf8(raw.to_vec()).ok()
        }
    };
    match index {
        0 => {
            if read_string(&mut at)? != ":status" {
                return None;
            }
        }
        8..=14 => {}
        _ => return None,
    }
    read_string(&mut at)?.parse().ok()
}

/// The raw client's `:status` reader itself: indexed, literal and
/// Huffman-coded (RFC 7541 appendix C.6 style) statuses.
#[test]
fn the_status_decoder_reads_indexed_literal_and_huffman_statuses() {
    assert_eq!(decode_status(&[0x88]), Some(200));
    assert_eq!(
        decode_status(&[0x20, 0x8d]),
        Some(404),
        "after a size update"
    );
    assert_eq!(decode_status(&[0x08, 0x03, b'5', b'0', b'3']), Some(503));
    // "503" in Huffman: 011011 00000 011001, then EOS padding.
    assert_eq!(decode_status(&[0x48, 0x83, 0x6c, 0x0c, 0xff]), Some(503));
    let mut literal_name = vec![0x00, 0x07];
    literal_name.extend_from_slice(b":status\x03431");
    assert_eq!(decode_status(&literal_name), Some(431));
    assert_eq!(decode_status(&[0x82]), None, "index 2 is :method GET");
}

/// What became of a stream sent on a raw connection.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A response HEADERS frame with this status.
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY (error code, last stream id) before anything for the stream.
    GoAway(u32, u32),
    /// The connection closed before anything for the stream.
    Closed,
}

/// A raw HTTP/2 client connection.
struct Raw<S> {
    io: S,
    /// Every frame read so far, for failure messages.
    seen: Vec<(u8, u8, u32)>,
}

impl Raw<TcpStream> {
    /// Connects and sends the client preface: the magic string and an
    /// empty SETTINGS frame.
    async fn h2c(addr: SocketAddr) -> Raw<TcpStream> {
        let io = TcpStream::connect(addr).await.expect("connect");
        let mut raw = Raw::over(io);
        raw.send(&[PREFACE, &settings(&[])].concat()).await;
        raw
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    fn over(io: S) -> Raw<S> {
        Raw {
            io,
            seen: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
        self.io.flush().await.expect("flush");
    }

    /// Sends what may meet a connection the server is closing.
    async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.io.write_all(bytes).await;
        let _ = self.io.flush().await;
    }

    /// The next frame, or `None` once the connection has closed. The
    /// server's own SETTINGS and PINGs are acknowledged on the way (and
    /// still returned), as a well-behaved client does.
    async fn next(&mut self) -> Option<Frame> {
        let read = tokio::time::timeout(LIMIT, read_frame(&mut self.io))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "neither a frame nor a close within {LIMIT:?}; frames so far (type, flags, stream): {:?}",
                    self.seen
                )
            })?;
        self.seen.push((read.kind, read.flags, read.stream));
        if read.kind == SETTINGS && read.flags & ACK == 0 {
            self.send_lossy(&frame(SETTINGS, ACK, 0, &[])).await;
        }
        if read.kind == PING && read.flags & ACK == 0 {
            self.send_lossy(&frame(PING, ACK, 0, &read.payload)).await;
        }
        Some(read)
    }

    /// Reads until something decides `stream`'s fate.
    async fn outcome(&mut self, stream: u32) -> Outcome {
        loop {
            let Some(f) = self.next().await else {
                return Outcome::Closed;
            };
            match f.kind {
                HEADERS if f.stream == stream => return Outcome::Status(f.status()),
                RST_STREAM if f.stream == stream => return Outcome::Reset(f.error_code()),
                GOAWAY => return Outcome::GoAway(f.error_code(), f.last_stream_id()),
                _ => {}
            }
        }
    }

    /// Reads until a GOAWAY, which must come before the connection closes.
    async fn goaway(&mut self) -> Frame {
        loop {
            match self.next().await {
                Some(f) if f.kind == GOAWAY => return f,
                Some(_) => {}
                None => panic!(
                    "closed without a GOAWAY; frames (type, flags, stream): {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Reads until the server closes the connection; returns the frames
    /// read on the way.
    async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.next().await {
            frames.push(f);
        }
        frames
    }
}

// ---------------------------------------------------------------------------
// Backends and bodies
// ---------------------------------------------------------------------------

/// Starts a backend that answers every request with `handler`, over
/// HTTP/1.1 or h2c with prior knowledge (whichever the proxy speaks).
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A proxy config: admin and listener `web` on `:0`, upstream `app` with
/// one backend at `backend` and the `extra` upstream keys.
fn config_for(backend: SocketAddr, extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [[upstream]]\nname = \"app\"\nbackends = [\"{backend}\"]\n{extra}\n"
    )
}

fn text(body: impl Into<Bytes>) -> TestBody {
    http_body_util::Full::new(body.into())
        .map_err(|e| match e {})
        .boxed()
}

/// Byte `i` of the test pattern: depends on the position, so bytes that
/// arrive out of order, twice or not at all change the checksum.
fn pattern_byte(i: u64) -> u8 {
    let x = i ^ (i >> 7) ^ (i >> 13) ^ (i >> 21);
    (x as u8).wrapping_mul(151).wrapping_add(7)
}

/// 64-bit FNV-1a, continued from `hash`.
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The FNV-1a hash of the first `n` pattern bytes.
fn pattern_hash(n: u64) -> u64 {
    let bytes: Vec<u8> = (0..n).map(pattern_byte).collect();
    fnv(FNV_START, &bytes)
}

/// A body of the first `n` pattern bytes, in 64 KiB frames.
struct Pattern {
    at: u64,
    end: u64,
}

impl Pattern {
    fn new(n: u64) -> Self {
        Pattern { at: 0, end: n }
    }
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.at == this.end {
            return Poll::Ready(None);
        }
        let n = (this.end - this.at).min(64 * 1024);
        let chunk: Vec<u8> = (this.at..this.at + n).map(pattern_byte).collect();
        this.at += n;
        Poll::Ready(Some(Ok(BodyFrame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.end - self.at)
    }

    fn is_end_stream(&self) -> bool {
        self.at == self.end
    }
}

/// Connects an `h2::client` over h2c; the connection runs in a task.
async fn h2_connect(
    addr: SocketAddr,
    builder: &h2::client::Builder,
) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = builder.handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn h2_get(path: &str) -> Request<()> {
    Request::get(format!("http://h2.test{path}"))
        .body(())
        .expect("request")
}

/// Reads a whole `h2` body, giving its capacity back as it goes.
async fn read_h2_body(body: &mut h2::RecvStream) -> Bytes {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body chunk");
        body.flow_control()
            .release_capacity(chunk.len())
            .expect("release");
        out.extend_from_slice(&chunk);
    }
    Bytes::from(out)
}

// ---------------------------------------------------------------------------
// 1, 2: flow control
// ---------------------------------------------------------------------------

const FOUR_MIB: u64 = 4 * 1024 * 1024;

/// A 4 MiB request body is more than any flow-control window the proxy
/// opens at first: it only arrives whole if the proxy keeps sending
/// WINDOW_UPDATEs while it forwards the body to the HTTP/1.1 backend.
#[tokio::test]
async fn a_4_mib_upload_over_h2c_reaches_an_http1_backend_intact() {
    let backend = serve(|req: Request<Incoming>| async move {
        let version = req.version();
        let mut body = req.into_body();
        let (mut len, mut hash) = (0u64, FNV_START);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("request body frame");
            if let Some(data) = frame.data_ref() {
                len += data.len() as u64;
                hash = fnv(hash, data);
            }
        }
        Response::new(text(format!("{len} {hash:016x} {version:?}")))
    })
    .await;
    let proxy = start_proxy(&config_for(backend, "")).await;
    let addr = proxy.listener_addr("web").expect("web");

    let req = Request::post(format!("http://{addr}/upload"))
        .body(Pattern::new(FOUR_MIB).map_err(|e| match e {}).boxed())
        .expect("request");
    let answer = tokio::time::timeout(LONG_LIMIT, send(&h2_client(), req))
        .await
        .expect("the upload finished in time");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body,
        format!("{FOUR_MIB} {:016x} HTTP/1.1", pattern_hash(FOUR_MIB)),
        "the backend's length, hash and version"
    );
}

/// A client with a 16 KiB stream window that gives capacity back in 4 KiB
/// steps still gets all of a 4 MiB response, every byte in order: the
/// proxy sends only what the window allows and resumes on WINDOW_UPDATE.
#[tokio::test]
async fn a_4_mib_download_reaches_a_slow_reader_with_a_small_window_in_order() {
    let backend = serve(|_req: Request<Incoming>| async move {
        Response::new(Pattern::new(FOUR_MIB).map_err(|e| match e {}).boxed())
    })
    .await;
    let proxy = start_proxy(&config_for(backend, "")).await;
    let addr = proxy.listener_addr("web").expect("web");

    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(16_384);
    let send = h2_connect(addr, &builder).await;
    let read = async move {
        let mut send = send.ready().await.expect("ready");
        let (response, _) = send
            .send_request(h2_get("/pattern"), true)
            .expect("send request");
        let response = response.await.expect("response head");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let (mut at, mut hash, mut chunks) = (0u64, FNV_START, 0usize);
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("body chunk");
            chunks += 1;
            assert!(
                chunk.len() <= 16_384,
                "a DATA frame of {} bytes exceeds the 16 KiB window",
                chunk.len()
            );
            if let Some(i) = (0..chunk.len()).find(|&i| chunk[i] != pattern_byte(at + i as u64)) {
                panic!("byte {} is wrong", at + i as u64);
            }
            hash = fnv(hash, &chunk);
            at += chunk.len() as u64;
            // A slow reader: capacity goes back in small steps.
            let mut left = chunk.len();
            while left > 0 {
                let step = left.min(4096);
                body.flow_control()
                    .release_capacity(step)
                    .expect("release capacity");
                left -= step;
                tokio::task::yield_now().await;
            }
        }
        (at, hash, chunks)
    };
    let (len, hash, chunks) = tokio::time::timeout(LONG_LIMIT, read)
        .await
        .expect("the download finished in time");
    assert_eq!(len, FOUR_MIB);
    assert_eq!(hash, pattern_hash(FOUR_MIB));
    assert!(
        chunks >= 256,
        "4 MiB in {chunks} chunks through a 16 KiB window"
    );
}

// ---------------------------------------------------------------------------
// 3: trailers
// ---------------------------------------------------------------------------

/// An h2 backend that echoes the request body, and answers with trailers
/// `grpc-status: 0` and `x-echoed-trailer: <the request's x-checksum
/// trailer, or "none">`.
async fn trailer_echo_backend() -> SocketAddr {
    serve(|req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.expect("request body");
        let echoed = collected
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("valid"));
        trailers.insert("x-echoed-trailer", echoed.parse().expect("valid"));
        let body = Trailered {
            data: Some(collected.to_bytes()),
            trailers: Some(trailers),
        };
        let mut r = Response::new(body.map_err(|e| match e {}).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().expect("valid"));
        r
    })
    .await
}

async fn grpc_call(addr: SocketAddr, request_trailers: Option<HeaderMap>) -> (Bytes, HeaderMap) {
    let send = h2_connect(addr, &h2::client::Builder::new()).await;
    let call = async move {
        let mut send = send.ready().await.expect("ready");
        let req = Request::post("http://h2.test/pkg.Service/Call")
            .header("te", "trailers")
            .header("content-type", "application/grpc")
            .body(())
            .expect("request");
        let (response, mut stream) = send.send_request(req, false).expect("send request");
        let last = request_trailers.is_none();
        stream
            .send_data(Bytes::from_static(b"\0\0\0\0\x05hello"), last)
            .expect("send data");
        if let Some(trailers) = request_trailers {
            stream.send_trailers(trailers).expect("send trailers");
        }
        let response = response.await.expect("response head");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let data = read_h2_body(&mut body).await;
        let trailers = body
            .trailers()
            .await
            .expect("trailers")
            .expect("the response has trailers");
        (data, trailers)
    };
    tokio::time::timeout(LIMIT, call)
        .await
        .expect("answered in time")
}

#[tokio::test]
async fn response_trailers_pass_from_an_h2_backend_to_an_h2c_client() {
    let backend = trailer_echo_backend().await;
    let proxy = start_proxy(&config_for(backend, "protocol = \"h2\"")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let (data, trailers) = grpc_call(addr, None).await;
    assert_eq!(&data[..], b"\0\0\0\0\x05hello");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echoed-trailer"], "none");
}

#[tokio::test]
async fn request_trailers_pass_from_an_h2c_client_to_an_h2_backend() {
    let backend = trailer_echo_backend().await;
    let proxy = start_proxy(&config_for(backend, "protocol = \"h2\"")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut request_trailers = HeaderMap::new();
    request_trailers.insert("x-checksum", "c0ffee".parse().expect("valid"));
    let (data, trailers) = grpc_call(addr, Some(request_trailers)).await;
    assert_eq!(&data[..], b"\0\0\0\0\x05hello");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(
        trailers["x-echoed-trailer"], "c0ffee",
        "the backend got the request's trailers"
    );
}

// ---------------------------------------------------------------------------
// 4: many streams, SETTINGS_MAX_CONCURRENT_STREAMS
// ---------------------------------------------------------------------------

/// 300 GETs at once on one connection: more than the server allows at a
/// time, so the client queues the rest. The backend holds its answers
/// until 200 requests are in flight together, so the streams really are
/// concurrent.
#[tokio::test]
async fn three_hundred_concurrent_gets_on_one_h2c_connection_all_get_200() {
    const STREAMS: usize = 300;
    const TOGETHER: usize = 200;
    let hits = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(Notify::new());
    let backend = {
        let (hits, enough) = (Arc::clone(&hits), Arc::clone(&enough));
        serve(move |_req: Request<Incoming>| {
            let (hits, enough) = (Arc::clone(&hits), Arc::clone(&enough));
            async move {
                let waiting = enough.notified();
                if hits.fetch_add(1, Ordering::SeqCst) + 1 >= TOGETHER {
                    enough.notify_waiters();
                } else {
                    waiting.await;
                }
                Response::new(text("ok"))
            }
        })
        .await
    };
    let proxy = start_proxy(&config_for(backend, "")).await;
    let addr = proxy.listener_addr("web").expect("web");

    // Until the server's SETTINGS arrive, h2's client would open streams
    // without limit; 100 (RFC 9113's recommended minimum) until then, and
    // from then on the client queues what is over the server's limit.
    let mut builder = h2::client::Builder::new();
    builder.initial_max_send_streams(100);
    let send = h2_connect(addr, &builder).await;
    let mut calls = Vec::new();
    for i in 0..STREAMS {
        let send = send.clone();
        calls.push(tokio::spawn(async move {
            let mut send = send.ready().await.expect("ready");
            let (response, _) = send
                .send_request(h2_get(&format!("/{i}")), true)
                .expect("send request");
            let response = response.await.expect("response head");
            let status = response.status();
            let body = read_h2_body(&mut response.into_body()).await;
            (status, body)
        }));
    }
    let all = tokio::time::timeout(LONG_LIMIT, futures_util::future::join_all(calls))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "not all {STREAMS} streams were answered; the backend saw {}",
                hits.load(Ordering::SeqCst)
            )
        });
    for (i, result) in all.into_iter().enumerate() {
        let (status, body) = result.expect("stream task");
        assert_eq!(status, StatusCode::OK, "stream {i}");
        assert_eq!(&body[..], b"ok", "stream {i}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), STREAMS);
}

#[tokio::test]
async fn the_server_settings_advertise_256_max_concurrent_streams() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut raw = Raw::h2c(addr).await;
    let first = raw.next().await.expect("the server's preface");
    assert_eq!(
        (first.kind, first.flags & ACK, first.stream),
        (SETTINGS, 0, 0),
        "the server's first frame is its SETTINGS"
    );
    assert_eq!(first.payload.len() % 6, 0, "{:02x?}", first.payload);
    let entries: Vec<(u16, u32)> = first
        .payload
        .chunks(6)
        .map(|e| {
            (
                u16::from_be_bytes([e[0], e[1]]),
                u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
            )
        })
        .collect();
    let max_streams = entries
        .iter()
        .find(|(id, _)| *id == SETTINGS_MAX_CONCURRENT_STREAMS)
        .map(|(_, v)| *v);
    assert_eq!(max_streams, Some(256), "settings: {entries:?}");
}

// ---------------------------------------------------------------------------
// 5: a client reset
// ---------------------------------------------------------------------------

/// A raw HTTP/1.1 backend: `GET /hold` is never answered (the backend
/// reports its arrival on `held`, then reads until the proxy drops the
/// connection and reports that on `dropped`); anything else gets
/// `200 ok`.
struct HoldingBackend {
    addr: SocketAddr,
    held: mpsc::UnboundedReceiver<()>,
    dropped: mpsc::UnboundedReceiver<()>,
    hits: Arc<AtomicUsize>,
}

async fn holding_backend() -> HoldingBackend {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = socket.local_addr().expect("addr");
    let (held_tx, held) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = socket.accept().await {
            let (held_tx, dropped_tx) = (held_tx.clone(), dropped_tx.clone());
            let hits = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    hits.fetch_add(1, Ordering::SeqCst);
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    if path == "/hold" {
                        let _ = held_tx.send(());
                        loop {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                        let _ = dropped_tx.send(());
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if conn.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    HoldingBackend {
        addr,
        held,
        dropped,
        hits,
    }
}

#[tokio::test]
async fn a_reset_stream_abandons_its_backend_request_and_the_connection_keeps_serving() {
    let mut backend = holding_backend().await;
    let proxy = start_proxy(&config_for(backend.addr, "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let send = h2_connect(addr, &h2::client::Builder::new()).await;
    let mut send = send.ready().await.expect("ready");

    let (held_response, mut held_stream) = send
        .send_request(h2_get("/hold"), true)
        .expect("send request");
    tokio::time::timeout(LIMIT, backend.held.recv())
        .await
        .expect("the held request reached the backend")
        .expect("backend running");
    held_stream.send_reset(h2::Reason::CANCEL);
    assert!(
        tokio::time::timeout(LIMIT, held_response)
            .await
            .expect("the reset stream ended")
            .is_err(),
        "the reset stream got an answer"
    );

    // The same connection still serves new streams.
    for _ in 0..3 {
        let mut ready = send.clone().ready().await.expect("ready");
        let (response, _) = ready
            .send_request(h2_get("/quick"), true)
            .expect("send request");
        let response = tokio::time::timeout(LIMIT, response)
            .await
            .expect("answered in time")
            .expect("response head");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(&read_h2_body(&mut response.into_body()).await[..], b"ok");
    }
    assert_eq!(backend.hits.load(Ordering::SeqCst), 4);

    // The reset stream's backend request was abandoned: its connection
    // was closed, not left waiting for an answer nobody wants.
    tokio::time::timeout(LIMIT, backend.dropped.recv())
        .await
        .expect("the backend request of the reset stream was dropped")
        .expect("backend running");
}

// ---------------------------------------------------------------------------
// 6: malformed requests
// ---------------------------------------------------------------------------

/// Sends `bytes` (a malformed request on stream 1) on a new h2c connection:
/// the stream must be reset with PROTOCOL_ERROR or answered with a 4xx,
/// the backend must not see it, and a valid request on stream 3 of the same
/// connection must still be answered. A request refused by the codec
/// (`refused_by_codec`: its head is malformed) is counted as a 4xx without
/// an upstream by the time the client sees the outcome; one whose body
/// turns out malformed after it was handed on is reset, never answered,
/// and counted as nothing.
async fn assert_malformed_request_refused(bytes: Vec<u8>, refused_by_codec: bool) {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut raw = Raw::h2c(addr).await;
    raw.send(&bytes).await;
    match raw.outcome(1).await {
        Outcome::Reset(code) => assert_eq!(code, PROTOCOL_ERROR, "RST_STREAM error code"),
        Outcome::Status(status) => {
            assert!((400..500).contains(&status), "answered {status}, not 4xx")
        }
        other => panic!(
            "stream 1 got neither RST_STREAM(PROTOCOL_ERROR) nor a 4xx but {other:?} \
             (GoAway is error code, last stream id); frames (type, flags, stream): {:?}",
            raw.seen
        ),
    }
    let text = admin_get(&proxy, "/metrics").await.body;
    let refused = "sluice_http_requests_total{code=\"4xx\",listener=\"web\",upstream=\"\"} ";
    let counted = if refused_by_codec { 1.0 } else { 0.0 };
    assert_eq!(metric(&text, refused), Some(counted), "{text}");
    raw.send(&headers(3, &get_fields("/"), true)).await;
    assert_eq!(
        raw.outcome(3).await,
        Outcome::Status(200),
        "the next valid request"
    );
    assert_eq!(
        backend.hits(),
        1,
        "the backend saw the malformed request too"
    );
}

#[tokio::test]
async fn an_upper_case_field_name_is_refused_and_not_forwarded() {
    let mut fields = get_fields("/");
    fields.push(("X-Upper", "1"));
    assert_malformed_request_refused(headers(1, &fields, true), true).await;
}

#[tokio::test]
async fn a_connection_specific_field_is_refused_and_not_forwarded() {
    let mut fields = get_fields("/");
    fields.push(("connection", "keep-alive"));
    assert_malformed_request_refused(headers(1, &fields, true), true).await;
}

#[tokio::test]
async fn a_request_without_path_is_refused_and_not_forwarded() {
    let fields = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "h2.test"),
    ];
    assert_malformed_request_refused(headers(1, &fields, true), true).await;
}

#[tokio::test]
async fn te_other_than_trailers_is_refused_and_not_forwarded() {
    let mut fields = get_fields("/");
    fields.push(("te", "gzip"));
    assert_malformed_request_refused(headers(1, &fields, true), true).await;
}

/// `content-length: 10` and then 5 bytes of DATA that end the stream, in
/// the same write.
#[tokio::test]
async fn a_content_length_that_disagrees_with_the_data_is_refused_and_not_forwarded() {
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/upload"),
        (":authority", "h2.test"),
        ("content-length", "10"),
    ];
    let mut bytes = headers(1, &fields, false);
    bytes.extend(frame(DATA, END_STREAM, 1, b"hello"));
    assert_malformed_request_refused(bytes, false).await;
}

// ---------------------------------------------------------------------------
// 7: connection errors
// ---------------------------------------------------------------------------

/// After a connection error the server sends GOAWAY with `code` and
/// closes the connection; nothing reaches the backend.
async fn assert_connection_error(bad: Vec<u8>, code: u32) {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut raw = Raw::h2c(addr).await;
    raw.send_lossy(&bad).await;
    let goaway = raw.goaway().await;
    assert_eq!(
        goaway.error_code(),
        code,
        "GOAWAY error code (debug data {:?})",
        String::from_utf8_lossy(&goaway.payload[8..])
    );
    assert_eq!(goaway.stream, 0, "GOAWAY is sent on stream 0");
    let after = raw.until_closed().await;
    assert!(
        after.iter().all(|f| f.kind != HEADERS && f.kind != DATA),
        "answers after the GOAWAY: {:?}",
        raw.seen
    );
    assert_eq!(backend.hits(), 0);
}

/// Reads until the connection closes: only SETTINGS, WINDOW_UPDATE, PING
/// and GOAWAY frames may come first.
async fn assert_closed_without_answers<S: AsyncRead + AsyncWrite + Unpin>(raw: &mut Raw<S>) {
    let frames = raw.until_closed().await;
    assert!(
        frames
            .iter()
            .all(|f| matches!(f.kind, SETTINGS | WINDOW_UPDATE | PING | GOAWAY)),
        "frames before the close (type, flags, stream): {:?}",
        raw.seen
    );
}

/// Plain listeners tell h2c by its preface: here the magic string is
/// right but what should be the client's SETTINGS frame is an HTTP/1.1
/// request.
#[tokio::test]
async fn garbage_after_the_h2c_magic_instead_of_settings_closes_the_connection() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut raw = Raw::over(TcpStream::connect(addr).await.expect("connect"));
    raw.send_lossy(&[PREFACE, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"].concat())
        .await;
    assert_closed_without_answers(&mut raw).await;
    assert_eq!(backend.hits(), 0);
}

/// On a TLS listener ALPN picks `h2` before a byte of HTTP is read: an
/// HTTP/1.1 request where the preface should be closes the connection.
#[tokio::test]
async fn garbage_instead_of_the_preface_on_a_tls_h2_connection_closes_it() {
    let backend = Backend::start("a").await;
    let pki = Pki::new("Sluice Test CA");
    let cert = pki.server("site", &["site.test"], "site.test");
    let config = simple_config(&[&backend], "").replace(
        "upstream = \"app\"\n\n",
        &format!(
            "upstream = \"app\"\ntls = {{ certificates = [{{ cert = {:?}, key = {:?} }}] }}\n\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string()
        ),
    );
    let proxy = start_proxy(&config).await;
    let addr = proxy.listener_addr("web").expect("web");
    let tls = tls_connect(addr, "site.test", pki.client_config(&["h2"]))
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut raw = Raw::over(tls);
    raw.send_lossy(b"GET / HTTP/1.1\r\nhost: site.test\r\n\r\n")
        .await;
    assert_closed_without_answers(&mut raw).await;
    assert_eq!(backend.hits(), 0);
}

/// An indexed header field with index 0 is not valid HPACK.
#[tokio::test]
async fn an_invalid_hpack_block_is_a_compression_error() {
    let bad = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x80]);
    assert_connection_error(bad, COMPRESSION_ERROR).await;
}

/// The client never raised SETTINGS_MAX_FRAME_SIZE from 16384: a frame
/// one byte longer is a FRAME_SIZE_ERROR.
#[tokio::test]
async fn a_frame_larger_than_the_max_frame_size_is_a_frame_size_error() {
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/upload"),
        (":authority", "h2.test"),
    ];
    let mut bad = headers(1, &fields, false);
    bad.extend(frame(DATA, END_STREAM, 1, &[0u8; 16_385]));
    assert_connection_error(bad, FRAME_SIZE_ERROR).await;
}

#[tokio::test]
async fn a_zero_window_update_on_the_connection_is_a_protocol_error() {
    let bad = frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes());
    assert_connection_error(bad, PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn continuation_without_headers_is_a_protocol_error() {
    let bad = frame(CONTINUATION, END_HEADERS, 1, &hpack(&get_fields("/")));
    assert_connection_error(bad, PROTOCOL_ERROR).await;
}

// ---------------------------------------------------------------------------
// 8: PING and SETTINGS
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ping_is_acknowledged_with_its_payload_and_client_settings_are_acknowledged() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut raw = Raw::over(TcpStream::connect(addr).await.expect("connect"));
    let client_settings = settings(&[
        (SETTINGS_ENABLE_PUSH, 0),
        (SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
    ]);
    let ping = *b"sluice\x01\xff";
    raw.send(&[PREFACE, &client_settings, &frame(PING, 0, 0, &ping)].concat())
        .await;

    let first = raw.next().await.expect("the server's preface");
    assert_eq!((first.kind, first.flags & ACK), (SETTINGS, 0), "{first:?}");
    let (mut settings_ack, mut ping_ack) = (None, None);
    while settings_ack.is_none() || ping_ack.is_none() {
        let f = raw.next().await.unwrap_or_else(|| {
            panic!(
                "closed before both acknowledgements; frames: {:?}",
                raw.seen
            )
        });
        match (f.kind, f.flags & ACK) {
            (SETTINGS, ACK) => settings_ack = Some(f),
            (PING, ACK) => ping_ack = Some(f),
            (GOAWAY, _) => panic!("GOAWAY {:#x}", f.error_code()),
            _ => {}
        }
    }
    let settings_ack = settings_ack.expect("seen");
    assert_eq!(settings_ack.stream, 0);
    assert!(settings_ack.payload.is_empty(), "{settings_ack:?}");
    let ping_ack = ping_ack.expect("seen");
    assert_eq!(ping_ack.stream, 0);
    assert_eq!(ping_ack.payload, ping, "the PING's 8 bytes come back");

    // Still a working connection after both.
    raw.send(&headers(1, &get_fields("/"), true)).await;
    assert_eq!(raw.outcome(1).await, Outcome::Status(200));
}

// ---------------------------------------------------------------------------
// 9: rapid reset (CVE-2023-44487)
// ---------------------------------------------------------------------------

/// 5,000 streams, each opened with a valid GET and at once cancelled: the
/// server must stop the flood with a GOAWAY (or by closing) rather than
/// keep opening backend requests for it.
#[tokio::test]
async fn a_rapid_reset_flood_is_stopped_with_goaway_and_barely_reaches_the_backend() {
    const STREAMS: u32 = 5_000;
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = tcp.into_split();

    let flood = tokio::spawn(async move {
        let _ = writer.write_all(&[PREFACE, &settings(&[])].concat()).await;
        let block = hpack(&get_fields("/"));
        let mut batch = Vec::new();
        for n in 0..STREAMS {
            let id = 2 * n + 1;
            batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
            batch.extend(rst_stream(id, CANCEL));
            if batch.len() > 32 * 1024 {
                if writer.write_all(&batch).await.is_err() {
                    return writer;
                }
                batch.clear();
            }
        }
        let _ = writer.write_all(&batch).await;
        writer
    });

    // Read (without answering) until the server gives up on the client.
    let stopped = tokio::time::timeout(LONG_LIMIT, async {
        loop {
            match read_frame(&mut reader).await {
                None => return "closed",
                Some(f) if f.kind == GOAWAY => return "goaway",
                Some(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the flood was neither refused nor cut off; the backend saw {} requests",
            backend.hits()
        )
    });
    // The writer may be stuck on a server that stopped reading.
    flood.abort();
    let _ = flood.await;
    drop(reader);
    let hits = backend.hits();
    println!("rapid reset: stopped by {stopped}; the backend saw {hits} requests");
    assert!(
        hits < 1_000,
        "the backend saw {hits} of {STREAMS} cancelled requests (stopped by {stopped})"
    );
}

// ---------------------------------------------------------------------------
// 10, 11: request head translation to HTTP/1.1
// ---------------------------------------------------------------------------

/// The header lines the support backend's `/headers` echoes back.
fn lines_named<'a>(echo: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}: ");
    echo.lines().filter(|l| l.starts_with(&prefix)).collect()
}

async fn h2_headers_echo(addr: SocketAddr, req: Request<()>) -> String {
    let send = h2_connect(addr, &h2::client::Builder::new()).await;
    let call = async move {
        let mut send = send.ready().await.expect("ready");
        let (response, _) = send.send_request(req, true).expect("send request");
        let response = response.await.expect("response head");
        assert_eq!(response.status(), StatusCode::OK);
        read_h2_body(&mut response.into_body()).await
    };
    let body = tokio::time::timeout(LIMIT, call)
        .await
        .expect("answered in time");
    String::from_utf8_lossy(&body).into_owned()
}

/// RFC 9113 section 8.2.3: an HTTP/2 client may split `cookie` into
/// several fields; towards HTTP/1.1 they are joined with "; " into one.
#[tokio::test]
async fn split_cookie_fields_reach_an_http1_backend_as_one_cookie_line() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let req = Request::get("http://h2.test/headers")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(())
        .expect("request");
    let echo = h2_headers_echo(addr, req).await;
    assert_eq!(lines_named(&echo, "cookie"), ["cookie: a=1; b=2"], "{echo}");
}

#[tokio::test]
async fn the_authority_becomes_the_host_of_an_http1_backend_request() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    // `:authority` only: the h2 client sends no `host` field.
    let req = Request::get("http://authority.test:8080/headers")
        .body(())
        .expect("request");
    assert!(req.headers().get("host").is_none());
    let echo = h2_headers_echo(addr, req).await;
    assert_eq!(
        lines_named(&echo, "host"),
        ["host: authority.test:8080"],
        "{echo}"
    );
}

// ---------------------------------------------------------------------------
// 12: graceful stop
// ---------------------------------------------------------------------------

/// Stopping the proxy while a request is in flight on an h2c connection:
/// the client gets a GOAWAY that still covers its stream, and the stream
/// is answered in full once the backend answers.
#[tokio::test]
async fn graceful_stop_sends_goaway_and_the_in_flight_h2c_request_completes() {
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let backend = {
        let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
        serve(move |_req: Request<Incoming>| {
            let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
            async move {
                let released = release.notified();
                arrived.notify_one();
                released.await;
                Response::new(text("finished"))
            }
        })
        .await
    };
    let config = config_for(backend, "").replace(
        "[[listener]]",
        "[shutdown]\ndrain_delay = \"0s\"\ngrace = \"10s\"\n\n[[listener]]",
    );
    let proxy = start_proxy(&config).await;
    let addr = proxy.listener_addr("web").expect("web");

    let mut raw = Raw::h2c(addr).await;
    raw.send(&headers(1, &get_fields("/slow"), true)).await;
    tokio::time::timeout(LIMIT, arrived.notified())
        .await
        .expect("the request reached the backend");

    proxy.shutdown();
    let goaway = raw.goaway().await;
    assert_eq!(goaway.error_code(), NO_ERROR);
    assert!(
        goaway.last_stream_id() >= 1,
        "the GOAWAY gives up the in-flight stream: {goaway:?}"
    );
    release.notify_one();

    let (mut status, mut body) = (None, Vec::new());
    loop {
        let f = raw.next().await.unwrap_or_else(|| {
            panic!(
                "closed before stream 1 ended; frames (type, flags, stream): {:?}",
                raw.seen
            )
        });
        match f.kind {
            HEADERS if f.stream == 1 => status = Some(f.status()),
            DATA if f.stream == 1 => body.extend_from_slice(&f.payload),
            RST_STREAM if f.stream == 1 => panic!("stream 1 reset: {:#x}", f.error_code()),
            GOAWAY => assert!(f.last_stream_id() >= 1, "{f:?}"),
            _ => {}
        }
        if f.stream == 1 && f.flags & END_STREAM != 0 && matches!(f.kind, HEADERS | DATA) {
            break;
        }
    }
    assert_eq!(status, Some(200));
    assert_eq!(body, b"finished");
    raw.until_closed().await;
    tokio::time::timeout(LIMIT, proxy.wait())
        .await
        .expect("the proxy stopped in time");
}

// ---------------------------------------------------------------------------
// Requests Sluice answers itself, and idle connections
// ---------------------------------------------------------------------------

#[tokio::test]
async fn plain_connect_gets_405_and_too_many_fields_get_431_without_reaching_the_backend() {
    let backend = Backend::start("a").await;
    let proxy = start_proxy(&simple_config(&[&backend], "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut raw = Raw::h2c(addr).await;

    let connect = [(":method", "CONNECT"), (":authority", "h2.test:443")];
    raw.send(&headers(1, &connect, false)).await;
    assert_eq!(raw.outcome(1).await, Outcome::Status(405), "CONNECT");

    let names: Vec<String> = (0..101).map(|i| format!("x-field-{i}")).collect();
    let mut fields = get_fields("/");
    fields.extend(names.iter().map(|n| (n.as_str(), "1")));
    raw.send(&headers(3, &fields, true)).await;
    assert_eq!(raw.outcome(3).await, Outcome::Status(431), "101 fields");

    raw.send(&headers(5, &get_fields("/"), true)).await;
    assert_eq!(
        raw.outcome(5).await,
        Outcome::Status(200),
        "a valid request"
    );
    assert_eq!(
        backend.hits(),
        1,
        "only the valid request reached the backend"
    );
}

#[tokio::test]
async fn an_idle_h2c_connection_gets_goaway_after_the_idle_timeout() {
    let backend = Backend::start("a").await;
    let cfg = simple_config(&[&backend], "").replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\ntimeouts = { client_header = \"5s\", idle = \"300ms\" }\n",
    );
    let proxy = start_proxy(&cfg).await;
    let addr = proxy.listener_addr("web").expect("web");
    let mut raw = Raw::h2c(addr).await;
    raw.send(&headers(1, &get_fields("/"), true)).await;
    assert_eq!(raw.outcome(1).await, Outcome::Status(200));
    let goaway = raw.goaway().await;
    assert_eq!(goaway.error_code(), NO_ERROR);
    assert_eq!(goaway.last_stream_id(), 1, "{goaway:?}");
    raw.until_closed().await;
}

// ---------------------------------------------------------------------------
// 13: response heads through the HPACK dynamic table
// ---------------------------------------------------------------------------

/// Many responses on one connection whose fields repeat, change and evict
/// each other in the encoder's dynamic table reach an `h2` client exactly,
/// whatever table size the client allows (none, less than one response's
/// fields, the default): its decoder stays in step with the proxy's encoder.
#[tokio::test]
async fn repeated_and_changing_response_fields_decode_exactly_at_every_table_size() {
    let backend = serve(|req: Request<Incoming>| async move {
        let n: usize = req.uri().path()[1..].parse().expect("number");
        let mut r = Response::new(text(format!("body {n}")));
        let h = r.headers_mut();
        h.insert("server", "backend/1".parse().expect("valid"));
        h.insert("x-repeat", "same on every response".parse().expect("valid"));
        h.insert("x-n", n.to_string().parse().expect("valid"));
        h.insert("x-kind", ["odd", "even"][n % 2].parse().expect("valid"));
        h.insert("set-cookie", format!("id={n}").parse().expect("valid"));
        // Every fifth response: a field that fills most of a small table.
        if n.is_multiple_of(5) {
            h.insert("x-big", "b".repeat(90 + n).parse().expect("valid"));
        }
        r
    })
    .await;
    let proxy = start_proxy(&config_for(backend, "")).await;
    let addr = proxy.listener_addr("web").expect("web");
    for table_size in [None, Some(0), Some(150)] {
        let mut builder = h2::client::Builder::new();
        if let Some(size) = table_size {
            builder.header_table_size(size);
        }
        let send = h2_connect(addr, &builder).await;
        let run = async move {
            let mut send = send.ready().await.expect("ready");
            for n in 0..40usize {
                let (response, _) = send
                    .send_request(h2_get(&format!("/{n}")), true)
                    .expect("send request");
                let response = response.await.expect("response head");
                assert_eq!(response.status(), StatusCode::OK);
                let h = response.headers();
                let field = |name: &str| h.get(name).map(|v| v.to_str().expect("ascii").to_owned());
                assert_eq!(field("server").as_deref(), Some("backend/1"), "{n}");
                assert_eq!(field("x-repeat").as_deref(), Some("same on every response"));
                assert_eq!(field("x-n"), Some(n.to_string()), "{n}");
                assert_eq!(field("x-kind").as_deref(), Some(["odd", "even"][n % 2]));
                assert_eq!(field("set-cookie"), Some(format!("id={n}")));
                assert_eq!(
                    field("x-big"),
                    n.is_multiple_of(5).then(|| "b".repeat(90 + n))
                );
                let body = read_h2_body(&mut response.into_body()).await;
                assert_eq!(body, format!("body {n}").as_bytes());
                send = send.ready().await.expect("ready");
            }
        };
        tokio::time::timeout(LIMIT, run)
            .await
            .unwrap_or_else(|_| panic!("answered in time (table {table_size:?})"));
    }
}
