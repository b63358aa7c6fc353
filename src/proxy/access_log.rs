//! The access log: one line per HTTP request or TCP session, on stdout.
//!
//! The data path never waits for it. A finished request or session hands
//! its [`Entry`] to [`AccessLog::record`], which only tries to put it in a
//! bounded queue ([`QUEUE_CAPACITY`] entries); a dedicated writer thread
//! takes entries off the queue, formats them (`log.format`: logfmt-style
//! text or JSON) and writes them in batches. When the queue is full (stdout
//! is a slow pipe or terminal, or a reader stopped reading) the entry is
//! dropped and counted in `sluice_access_log_dropped_total` instead of
//! stalling a request. Diagnostic logs stay on stderr (`tracing`).
//!
//! The writer thread starts with the first entry, so a proxy without an
//! access log holds neither the thread nor the queue.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use tokio::time::Instant;

use crate::config::LogFormat;

/// Entries the queue holds before new ones are dropped: at 50,000 requests
/// a second, 80 ms of a stalled stdout.
pub const QUEUE_CAPACITY: usize = 4096;

/// A batch is written once it holds this many bytes, or the queue is empty.
const BATCH_BYTES: usize = 64 * 1024;

/// What a line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Tcp,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Tcp => "tcp",
        }
    }
}

/// One access log line, as the data path hands it over.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The format of the snapshot the request ran on.
    pub format: LogFormat,
    pub kind: Kind,
    /// When the request or session began.
    pub time: SystemTime,
    pub listener: Arc<str>,
    /// The client: the TCP peer, or the source of a PROXY protocol header.
    pub client: SocketAddr,
    /// HTTP only.
    pub method: Option<http::Method>,
    /// HTTP: the Host header (or :authority); TCP with TLS passthrough: the
    /// ClientHello's server name.
    pub host: Option<String>,
    /// HTTP only.
    pub path: Option<String>,
    /// HTTP only: the status sent to the client.
    pub status: Option<u16>,
    pub upstream: Option<Arc<str>>,
    /// The backend of the last attempt.
    pub backend: Option<Arc<str>>,
    /// Backend calls (HTTP, retries included) or connects (TCP) made.
    pub attempts: u32,
    /// Body bytes from the client (HTTP), or every byte from it (TCP).
    pub bytes_in: u64,
    /// Body bytes to the client (HTTP), or every byte to it (TCP).
    pub bytes_out: u64,
    pub duration: Duration,
    /// The `sluice-error` reason when Sluice answered or ended it itself.
    pub error: Option<&'static str>,
    /// TCP only: how the session ended.
    pub close: Option<&'static str>,
    /// HTTP over TLS: the subject of the client certificate the handshake
    /// verified (`listener.tls.client_ca`).
    pub client_subject: Option<Arc<str>>,
}

impl Entry {
    /// An entry of `kind` with every optional field empty.
    pub fn new(
        format: LogFormat,
        kind: Kind,
        time: SystemTime,
        listener: Arc<str>,
        client: SocketAddr,
    ) -> Self {
        Entry {
            format,
            kind,
            time,
            listener,
            client,
            method: None,
            host: None,
            path: None,
            status: None,
            upstream: None,
            backend: None,
            attempts: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            error: None,
            close: None,
            client_subject: None,
        }
    }
}

enum Msg {
    Line(Box<Entry>),
    Stop,
}

/// Where an [`AccessLog`] writes.
pub type Sink = Box<dyn Write + Send>;

/// The access log of one running Sluice.
pub struct AccessLog {
    dropped: IntCounter,
    capacity: usize,
    /// Taken by the writer thread when it starts.
    sink: Mutex<Option<Sink>>,
    /// `None` inside when the thread could not be started.
    writer: OnceLock<Option<Writer>>,
}

struct Writer {
    queue: SyncSender<Msg>,
    /// Disconnected once the thread has ended.
    finished: Mutex<Receiver<()>>,
}

impl AccessLog {
    /// An access log writing to stdout.
    pub fn stdout(dropped: IntCounter) -> Self {
        AccessLog::new(Box::new(std::io::stdout()), QUEUE_CAPACITY, dropped)
    }

    /// An access log writing to `sink` through a queue of `capacity`
    /// entries, counting dropped entries in `dropped`.
    pub fn new(sink: Sink, capacity: usize, dropped: IntCounter) -> Self {
        AccessLog {
            dropped,
            capacity: capacity.max(1),
            sink: Mutex::new(Some(sink)),
            writer: OnceLock::new(),
        }
    }

    /// Queues `entry` for writing, or drops and counts it when the queue is
    /// full. Never blocks.
    pub fn record(&self, entry: Box<Entry>) {
        let queued = match self.writer() {
            Some(w) => w.queue.try_send(Msg::Line(entry)).is_ok(),
            None => false,
        };
        if !queued {
            self.dropped.inc();
        }
    }

    /// Writes what is queued and stops the writer, waiting at most `limit`
    /// (a writer stuck on a blocked stdout is left behind). Entries recorded
    /// afterwards are dropped and counted.
    pub fn close(&self, limit: Duration) {
        let Some(Some(writer)) = self.writer.get() else {
            return;
        };
        let deadline = Instant::now() + limit;
        loop {
            match writer.queue.try_send(Msg::Stop) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(_)) => {
                    if Instant::now() >= deadline {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let finished = writer.finished.lock().unwrap_or_else(|e| e.into_inner());
        let left = deadline.saturating_duration_since(Instant::now());
        match finished.recv_timeout(left) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => {}
        }
    }

    fn writer(&self) -> Option<&Writer> {
        self.writer
            .get_or_init(|| {
                let sink = self
                    .sink
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()?;
                let (queue, entries) = mpsc::sync_channel(self.capacity);
                let (done, finished) = mpsc::channel();
                let dropped = self.dropped.clone();
                let spawned = std::thread::Builder::new()
                    .name("sluice-access-log".into())
                    .spawn(move || {
                        write_entries(entries, sink, &dropped);
                        drop(done);
                    });
                match spawned {
                    Ok(_) => Some(Writer {
                        queue,
                        finished: Mutex::new(finished),
                    }),
                    Err(err) => {
                        tracing::error!(error = %err, "cannot start the access log writer; access log lines are dropped");
                        None
                    }
                }
            })
            .as_ref()
    }
}

/// The writer thread: formats entries as they come and writes them in
/// batches, until told to stop or every sender is gone.
fn write_entries(entries: Receiver<Msg>, mut sink: Sink, dropped: &IntCounter) {
    let mut buf = Vec::with_capacity(BATCH_BYTES);
    let mut lines = 0u64;
    let mut stop = false;
    while !stop {
        match entries.recv() {
            Ok(Msg::Line(entry)) => {
                format_entry(&entry, &mut buf);
                lines += 1;
            }
            Ok(Msg::Stop) | Err(_) => break,
        }
        while buf.len() < BATCH_BYTES {
            match entries.try_recv() {
                Ok(Msg::Line(entry)) => {
                    format_entry(&entry, &mut buf);
                    lines += 1;
                }
                Ok(Msg::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if sink.write_all(&buf).and_then(|()| sink.flush()).is_err() {
            // stdout closed or failing: these lines are lost too.
            dropped.inc_by(lines);
        }
        buf.clear();
        lines = 0;
    }
}

/// Appends `entry` as one line in its format.
pub fn format_entry(entry: &Entry, out: &mut Vec<u8>) {
    match entry.format {
        LogFormat::Text => format_text(entry, out),
        LogFormat::Json => format_json(entry, out),
    }
}

fn time(entry: &Entry) -> String {
    humantime::format_rfc3339_millis(entry.time).to_string()
}

fn duration_ms(entry: &Entry) -> String {
    format!("{:.3}", entry.duration.as_secs_f64() * 1000.0)
}

/// `key=value` pairs separated by spaces; `-` for a field that does not
/// apply; values that need it are quoted with `\` escapes.
fn format_text(e: &Entry, out: &mut Vec<u8>) {
    let mut field = |key: &str, value: Option<&str>| {
        if !out.is_empty() && out.last() != Some(&b'\n') {
            out.push(b' ');
        }
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        match value {
            None => out.push(b'-'),
            Some(v) => push_logfmt(out, v),
        }
    };
    let status = e.status.map(|s| s.to_string());
    field("time", Some(&time(e)));
    field("kind", Some(e.kind.as_str()));
    field("listener", Some(&e.listener));
    field("client", Some(&e.client.to_string()));
    field("method", e.method.as_ref().map(http::Method::as_str));
    field("host", e.host.as_deref());
    field("path", e.path.as_deref());
    field("status", status.as_deref());
    field("upstream", e.upstream.as_deref());
    field("backend", e.backend.as_deref());
    field("attempts", Some(&e.attempts.to_string()));
    field("bytes_in", Some(&e.bytes_in.to_string()));
    field("bytes_out", Some(&e.bytes_out.to_string()));
    field("duration_ms", Some(&duration_ms(e)));
    field("error", e.error);
    field("close", e.close);
    field("client_subject", e.client_subject.as_deref());
    out.push(b'\n');
}

fn push_logfmt(out: &mut Vec<u8>, v: &str) {
    let plain = !v.is_empty()
        && v != "-"
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=' && b != b'\\');
    if plain {
        out.extend_from_slice(v.as_bytes());
        return;
    }
    out.push(b'"');
    for c in v.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// One JSON object per line; `null` for a field that does not apply.
fn format_json(e: &Entry, out: &mut Vec<u8>) {
    let mut first = true;
    let mut key = |out: &mut Vec<u8>, k: &str| {
        out.push(if first { b'{' } else { b',' });
        first = false;
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
    };
    let string = |out: &mut Vec<u8>, v: Option<&str>| match v {
        // Serialising a &str into a Vec cannot fail.
        Some(v) => {
            let _ = serde_json::to_writer(&mut *out, v);
        }
        None => out.extend_from_slice(b"null"),
    };
    key(out, "time");
    string(out, Some(&time(e)));
    key(out, "kind");
    string(out, Some(e.kind.as_str()));
    key(out, "listener");
    string(out, Some(&e.listener));
    key(out, "client");
    string(out, Some(&e.client.to_string()));
    key(out, "method");
    string(out, e.method.as_ref().map(http::Method::as_str));
    key(out, "host");
    string(out, e.host.as_deref());
    key(out, "path");
    string(out, e.path.as_deref());
    key(out, "status");
    match e.status {
        Some(s) => {
            let _ = write!(out, "{s}");
        }
        None => out.extend_from_slice(b"null"),
    }
    key(out, "upstream");
    string(out, e.upstream.as_deref());
    key(out, "backend");
    string(out, e.backend.as_deref());
    key(out, "attempts");
    let _ = write!(out, "{}", e.attempts);
    key(out, "bytes_in");
    let _ = write!(out, "{}", e.bytes_in);
    key(out, "bytes_out");
    let _ = write!(out, "{}", e.bytes_out);
    key(out, "duration_ms");
    out.extend_from_slice(duration_ms(e).as_bytes());
    key(out, "error");
    string(out, e.error);
    key(out, "close");
    string(out, e.close);
    key(out, "client_subject");
    string(out, e.client_subject.as_deref());
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn http_entry(format: LogFormat) -> Entry {
        let mut e = Entry::new(
            format,
            Kind::Http,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            Arc::from("web"),
            "127.0.0.1:50000".parse().expect("addr"),
        );
        e.method = Some(http::Method::GET);
        e.host = Some("example.com".into());
        e.path = Some("/a b\"c".into());
        e.status = Some(502);
        e.upstream = Some(Arc::from("app"));
        e.backend = Some(Arc::from("10.0.0.1:8080"));
        e.attempts = 2;
        e.bytes_in = 10;
        e.bytes_out = 20;
        e.duration = Duration::from_micros(1500);
        e.error = Some("connect-failure");
        e.client_subject = Some(Arc::from("CN=alice, O=Example"));
        e
    }

    #[test]
    fn a_text_line_has_every_field_quoted_where_needed() {
        let mut out = Vec::new();
        format_entry(&http_entry(LogFormat::Text), &mut out);
        let line = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            line,
            "time=2023-11-14T22:13:20.123Z kind=http listener=web client=127.0.0.1:50000 \
             method=GET host=example.com path=\"/a b\\\"c\" status=502 upstream=app \
             backend=10.0.0.1:8080 attempts=2 bytes_in=10 bytes_out=20 duration_ms=1.500 \
             error=connect-failure close=- client_subject=\"CN=alice, O=Example\"\n"
        );
    }

    #[test]
    fn a_json_line_is_one_object_with_nulls_for_what_does_not_apply() {
        let mut tcp = Entry::new(
            LogFormat::Json,
            Kind::Tcp,
            SystemTime::UNIX_EPOCH,
            Arc::from("l4"),
            "[::1]:4000".parse().expect("addr"),
        );
        tcp.close = Some("idle-timeout");
        tcp.attempts = 1;
        let mut out = Vec::new();
        format_entry(&http_entry(LogFormat::Json), &mut out);
        format_entry(&tcp, &mut out);
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["path"], "/a b\"c");
        assert_eq!(lines[0]["status"], 502);
        assert_eq!(lines[0]["duration_ms"], 1.5);
        assert_eq!(lines[0]["error"], "connect-failure");
        assert_eq!(lines[1]["kind"], "tcp");
        assert_eq!(lines[1]["client"], "[::1]:4000");
        assert_eq!(lines[1]["method"], serde_json::Value::Null);
        assert_eq!(lines[1]["status"], serde_json::Value::Null);
        assert_eq!(lines[1]["close"], "idle-timeout");
        assert_eq!(lines[0]["client_subject"], "CN=alice, O=Example");
        assert_eq!(lines[1]["client_subject"], serde_json::Value::Null);
    }

    #[test]
    fn control_characters_cannot_forge_a_line() {
        let mut e = http_entry(LogFormat::Text);
        e.host = Some("evil\nkind=http".into());
        let mut out = Vec::new();
        format_entry(&e, &mut out);
        let line = String::from_utf8(out).expect("utf-8");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(line.contains("host=\"evil\\nkind=http\""), "{line}");
    }

    /// A sink that blocks every write until released, like a stdout pipe
    /// nobody reads.
    struct Stalled {
        released: Arc<AtomicBool>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            while !self.released.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let released = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Vec::new()));
        let dropped = IntCounter::new("dropped", "test").expect("counter");
        let sink = Stalled {
            released: Arc::clone(&released),
            written: Arc::clone(&written),
        };
        let log = AccessLog::new(Box::new(sink), 4, dropped.clone());
        // The writer takes at most one batch off the queue before it blocks
        // in write; the queue holds 4 more; everything else is dropped. If
        // record() blocked, this loop would never end.
        for _ in 0..1000 {
            log.record(Box::new(http_entry(LogFormat::Text)));
        }
        let lost = dropped.get();
        // At most one batch (64 KiB of ~250-byte lines) plus the queue
        // got through.
        assert!(
            (1000 - 4 - 300..=1000 - 4).contains(&lost),
            "dropped {lost}"
        );
        released.store(true, Ordering::Release);
        log.close(Duration::from_secs(10));
        let text = String::from_utf8(written.lock().expect("lock").clone()).expect("utf-8");
        let lines = text.lines().count() as u64;
        assert_eq!(lines + lost, 1000, "every entry is written or counted");
    }

    #[test]
    fn close_writes_everything_queued() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let sink = Stalled {
            released: Arc::new(AtomicBool::new(true)),
            written: Arc::clone(&written),
        };
        let dropped = IntCounter::new("dropped", "test").expect("counter");
        let log = AccessLog::new(Box::new(sink), 64, dropped.clone());
        for _ in 0..50 {
            log.record(Box::new(http_entry(LogFormat::Json)));
        }
        log.close(Duration::from_secs(10));
        assert_eq!(dropped.get(), 0);
        let text = String::from_utf8(written.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 50);
        log.record(Box::new(http_entry(LogFormat::Json)));
        assert_eq!(
            dropped.get(),
            1,
            "after close, entries are counted as dropped"
        );
    }
}
