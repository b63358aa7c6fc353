use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

// ---- building ClientHellos -------------------------------------------------

/// The first flight of a real rustls client connecting to `server`.
fn rustls_hello(server: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server.to_string())
        .expect("test names are valid server names");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)
            .expect("writing to a Vec cannot fail");
    }
    out
}

fn be16(n: usize) -> [u8; 2] {
    u16::try_from(n)
        .expect("test lengths fit u16")
        .to_be_bytes()
}

fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut e = ty.to_be_bytes().to_vec();
    e.extend(be16(data.len()));
    e.extend(data);
    e
}

/// A server_name extension body with the given (name type, name) entries.
fn sni_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (ty, name) in entries {
        list.push(*ty);
        list.extend(be16(name.len()));
        list.extend(*name);
    }
    let mut d = be16(list.len()).to_vec();
    d.extend(list);
    d
}

fn sni_ext(name: &[u8]) -> Vec<u8> {
    ext(0, &sni_data(&[(0, name)]))
}

/// A ClientHello body; length prefixes are computed from the slices.
fn body_with(
    version: [u8; 2],
    sid: &[u8],
    suites: &[u8],
    comp: &[u8],
    exts: Option<&[u8]>,
) -> Vec<u8> {
    let mut b = version.to_vec();
    b.extend([0xAB; 32]);
    b.push(u8::try_from(sid.len()).expect("test session ids fit u8"));
    b.extend(sid);
    b.extend(be16(suites.len()));
    b.extend(suites);
    b.push(u8::try_from(comp.len()).expect("test methods fit u8"));
    b.extend(comp);
    if let Some(exts) = exts {
        b.extend(be16(exts.len()));
        b.extend(exts);
    }
    b
}

fn body(exts: Option<&[u8]>) -> Vec<u8> {
    body_with([3, 3], &[7; 32], &[0x13, 0x01, 0xC0, 0x2F], &[0], exts)
}

fn handshake(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("fits u32").to_be_bytes();
    let mut h = vec![1, len[1], len[2], len[3]];
    h.extend(body);
    h
}

fn record_of(ct: u8, payload: &[u8]) -> Vec<u8> {
    let mut r = vec![ct, 3, 1];
    r.extend(be16(payload.len()));
    r.extend(payload);
    r
}

/// `hs` split into handshake records at the given offsets.
fn records(hs: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain([&hs.len()]) {
        out.extend(record_of(22, &hs[start..end]));
        start = end;
    }
    out
}

fn hello(exts: Option<&[u8]>) -> Vec<u8> {
    records(&handshake(&body(exts)), &[])
}

fn hello_for(name: &str) -> Vec<u8> {
    let mut exts = ext(0x000a, &[0, 2, 0, 0x1d]);
    exts.extend(sni_ext(name.as_bytes()));
    hello(Some(&exts))
}

fn sni_of(buf: &[u8]) -> Option<String> {
    match parse_client_hello(buf) {
        Ok(Peek::Complete(name)) => name,
        other => panic!("expected a complete hello, got {other:?}"),
    }
}

fn long_name() -> String {
    // 63 + 1 + 63 + 1 + 63 + 1 + 61 = 253 bytes, the longest allowed.
    format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "B".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    )
}

// ---- parse_client_hello ----------------------------------------------------

#[test]
fn sni_is_read_from_rustls_client_hellos() {
    let long = long_name();
    let cases = [
        ("example.com", "example.com".to_string()),
        ("API.Example.COM", "api.example.com".to_string()),
        ("a-b.c-d.example", "a-b.c-d.example".to_string()),
        ("localhost", "localhost".to_string()),
        (long.as_str(), long.to_ascii_lowercase()),
    ];
    for (server, want) in cases {
        let bytes = rustls_hello(server);
        assert_eq!(sni_of(&bytes), Some(want), "server {server}");
    }
}

#[test]
fn sni_is_absent_when_rustls_connects_by_ip_address() {
    assert_eq!(sni_of(&rustls_hello("127.0.0.1")), None);
    assert_eq!(sni_of(&rustls_hello("::1")), None);
}

#[test]
fn sni_every_prefix_of_a_valid_hello_is_incomplete() {
    let split = records(&handshake(&body(Some(&sni_ext(b"x.test")))), &[3, 40]);
    for full in [rustls_hello("prefix.example.com"), split, hello(None)] {
        assert!(matches!(parse_client_hello(&full), Ok(Peek::Complete(_))));
        for n in 0..full.len() {
            match parse_client_hello(&full[..n]) {
                Ok(Peek::Incomplete) => {}
                other => panic!("prefix of {n}/{} bytes gave {other:?}", full.len()),
            }
        }
    }
}

#[test]
fn sni_hello_without_extensions_has_no_name() {
    assert_eq!(sni_of(&hello(None)), None);
    assert_eq!(sni_of(&hello(Some(&[]))), None);
}

#[test]
fn sni_extension_is_found_after_other_extensions() {
    let mut exts = ext(0x000a, &[0, 4, 0, 0x1d, 0, 0x17]);
    exts.extend(ext(0x002b, &[2, 3, 4]));
    exts.extend(ext(0xFE0D, &[]));
    exts.extend(sni_ext(b"Late.Example.net"));
    exts.extend(ext(0x0015, &[0; 100]));
    assert_eq!(sni_of(&hello(Some(&exts))), Some("late.example.net".into()));
}

#[test]
fn sni_duplicate_server_name_extension_is_malformed() {
    let mut exts = sni_ext(b"a.example");
    exts.extend(ext(0x000a, &[0, 2, 0, 0x1d]));
    exts.extend(sni_ext(b"b.example"));
    let err = parse_client_hello(&hello(Some(&exts))).expect_err("duplicate");
    assert!(matches!(err, SniError::Malformed(_)), "{err:?}");
}

#[test]
fn sni_duplicate_host_name_entries_are_malformed() {
    let data = sni_data(&[(0, b"a.example"), (0, b"b.example")]);
    let err = parse_client_hello(&hello(Some(&ext(0, &data)))).expect_err("duplicate");
    assert!(matches!(err, SniError::Malformed(_)), "{err:?}");
}

#[test]
fn sni_unknown_name_types_are_skipped() {
    // Only a non-host_name entry: no name to route on, but not an error.
    let only_other = ext(0, &sni_data(&[(7, b"opaque bytes, not a name")]));
    assert_eq!(sni_of(&hello(Some(&only_other))), None);
    // An unknown entry before the host_name does not hide it.
    let both = ext(0, &sni_data(&[(9, b"\x00\x01"), (0, b"Host.Example")]));
    assert_eq!(sni_of(&hello(Some(&both))), Some("host.example".into()));
}

#[test]
fn sni_hello_split_across_records_is_reassembled() {
    let hs = handshake(&body(Some(&sni_ext(b"split.example"))));
    // Split inside the handshake header, inside the body, and byte by byte
    // near the name, within the record-count limit.
    let many: Vec<usize> = (hs.len() - 20..hs.len()).collect();
    for cuts in [vec![2], vec![hs.len() / 2], vec![1, 2, 3, 60], many] {
        assert_eq!(
            sni_of(&records(&hs, &cuts)),
            Some("split.example".into()),
            "cuts {cuts:?}"
        );
    }
    // A real client's hello, split in two.
    let real = rustls_hello("two.records.example");
    let hs = &real[5..];
    assert_eq!(
        sni_of(&records(hs, &[hs.len() / 3])),
        Some("two.records.example".into())
    );
}

#[test]
fn sni_bytes_after_the_hello_are_not_inspected() {
    let mut bytes = hello_for("tail.example");
    // A middlebox-compatibility ChangeCipherSpec and some early data.
    bytes.extend(record_of(20, &[1]));
    bytes.extend(record_of(23, &[0xEE; 64]));
    assert_eq!(sni_of(&bytes), Some("tail.example".into()));
}

#[derive(Debug, PartialEq)]
enum Kind {
    NotTls,
    NotClientHello,
    TooLarge,
    Malformed,
    BadName,
}

fn kind(e: &SniError) -> Kind {
    match e {
        SniError::NotTls => Kind::NotTls,
        SniError::NotClientHello => Kind::NotClientHello,
        SniError::TooLarge(_) => Kind::TooLarge,
        SniError::Malformed(_) => Kind::Malformed,
        SniError::BadName(_) => Kind::BadName,
        SniError::Timeout | SniError::Io(_) | SniError::Closed => {
            panic!("parse_client_hello does no i/o: {e:?}")
        }
    }
}

fn malformed_cases() -> Vec<(&'static str, Vec<u8>, Kind)> {
    use Kind::*;
    let ok_body = body(Some(&sni_ext(b"ok.example")));
    let mut bad_type = handshake(&ok_body);
    bad_type[0] = 2; // ServerHello
    let mut huge_record = hello_for("x.example");
    huge_record[3..5].copy_from_slice(&be16(MAX_RECORD_LEN + 1));
    let huge_hello = {
        let mut r = vec![22, 3, 1, 0, 4, 1];
        let len = u32::try_from(MAX_CLIENT_HELLO).expect("fits").to_be_bytes();
        r.extend(&len[1..]);
        r
    };
    let interleaved = {
        let hs = handshake(&ok_body);
        let mut r = record_of(22, &hs[..10]);
        r.extend(record_of(23, &hs[10..]));
        r
    };
    let too_many_records = {
        let hs = handshake(&ok_body);
        let cuts: Vec<usize> = (1..=MAX_RECORDS).collect();
        records(&hs, &cuts)
    };
    let name = |n: &[u8]| hello(Some(&sni_ext(n)));
    let hs_body = |b: Vec<u8>| records(&handshake(&b), &[]);
    vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec(),
            NotTls,
        ),
        ("first byte alone", b"P".to_vec(), NotTls),
        ("sslv2 hello", vec![0x80, 0x2E, 0x01, 0x03, 0x01], NotTls),
        ("record major version", vec![22, 2, 0], NotTls),
        ("record minor version", vec![22, 3, 5, 0, 10], NotTls),
        ("application data first", record_of(23, &[1, 2, 3]), NotTls),
        ("server hello", records(&bad_type, &[]), NotClientHello),
        ("record over policy", huge_record, TooLarge),
        ("hello over policy", huge_hello, TooLarge),
        ("too many records", too_many_records, TooLarge),
        ("empty record", vec![22, 3, 1, 0, 0], Malformed),
        ("interleaved record", interleaved, Malformed),
        (
            "legacy version",
            hs_body(body_with([2, 0], &[], &[0, 0x2F], &[0], None)),
            Malformed,
        ),
        (
            "session id of 33",
            hs_body(body_with([3, 3], &[1; 33], &[0, 0x2F], &[0], None)),
            Malformed,
        ),
        (
            "odd cipher suites",
            hs_body(body_with([3, 3], &[], &[0, 0x2F, 0], &[0], None)),
            Malformed,
        ),
        (
            "no cipher suites",
            hs_body(body_with([3, 3], &[], &[], &[0], None)),
            Malformed,
        ),
        (
            "no compression methods",
            hs_body(body_with([3, 3], &[], &[0, 0x2F], &[], None)),
            Malformed,
        ),
        (
            "extension past the block end",
            hello(Some(&[0x00, 0x0A, 0x00, 0x10, 1, 2])),
            Malformed,
        ),
        (
            "extensions block past the message end",
            hs_body({
                let mut b = body(Some(&sni_ext(b"a.example")));
                let at = b.len() - sni_ext(b"a.example").len() - 2;
                b[at..at + 2].copy_from_slice(&be16(500));
                b
            }),
            Malformed,
        ),
        (
            "bytes after the extensions",
            hs_body({
                let mut b = body(Some(&[]));
                b.push(0);
                b
            }),
            Malformed,
        ),
        (
            "empty server name list",
            hello(Some(&ext(0, &[0, 0]))),
            Malformed,
        ),
        (
            "server name list shorter than extension",
            hello(Some(&ext(0, &[0, 0, 0, 0]))),
            Malformed,
        ),
        (
            "host name past the list end",
            hello(Some(&ext(0, &[0, 4, 0, 0, 9, b'a']))),
            Malformed,
        ),
        ("name with a space", name(b"bad name.example"), BadName),
        ("empty label", name(b"a..example"), BadName),
        ("leading dot", name(b".example"), BadName),
        ("trailing dot", name(b"example.com."), BadName),
        ("empty name", name(b""), BadName),
        ("underscore", name(b"under_score.example"), BadName),
        ("non-ascii", name("bücher.example".as_bytes()), BadName),
        (
            "name of 254 bytes",
            name(format!("{}x", long_name()).as_bytes()),
            BadName,
        ),
        (
            "label of 64 bytes",
            name(format!("{}.example", "a".repeat(64)).as_bytes()),
            BadName,
        ),
    ]
}

#[test]
fn sni_malformed_inputs_give_the_right_error() {
    let cases = malformed_cases();
    assert!(cases.len() >= 15);
    for (what, bytes, want) in cases {
        match parse_client_hello(&bytes) {
            Err(e) => assert_eq!(kind(&e), want, "{what}: {e}"),
            Ok(p) => panic!("{what}: expected {want:?}, got {p:?}"),
        }
    }
}

#[test]
fn sni_malformation_is_reported_before_the_rest_arrives() {
    // Cut right after the bad length field: the bytes already prove it.
    let mut bad_sid = hello(None);
    bad_sid[5 + 4 + 2 + 32] = 33;
    let cut = 5 + 4 + 2 + 32 + 1;
    let err = parse_client_hello(&bad_sid[..cut]).expect_err("session id");
    assert_eq!(kind(&err), Kind::Malformed);
    // A record header declaring more than the policy, with no payload yet.
    let err = parse_client_hello(&[22, 3, 3, 0xFF, 0xFF]).expect_err("record");
    assert_eq!(kind(&err), Kind::TooLarge);
}

#[test]
fn sni_mutated_hellos_never_panic() {
    // Every single-byte change and a few thousand random multi-byte ones, each
    // also truncated: the parser must answer, never panic or loop.
    let hs = handshake(&body(Some(&sni_ext(b"mutate.example"))));
    let seeds = [rustls_hello("mutate.example"), records(&hs, &[30, 31, 90])];
    let mut rng = fastrand::Rng::with_seed(0x5EED_5A1C);
    for seed in seeds {
        for i in 0..seed.len() {
            for v in [0x00, 0x01, 0x20, 0x7F, 0x80, 0xFF] {
                let mut m = seed.clone();
                m[i] = v;
                let _ = parse_client_hello(&m);
            }
        }
        for _ in 0..2000 {
            let mut m = seed.clone();
            for _ in 0..rng.usize(1..6) {
                let at = rng.usize(..m.len());
                m[at] = rng.u8(..);
            }
            let cut = rng.usize(..=m.len());
            let _ = parse_client_hello(&m[..cut]);
        }
    }
}

// ---- peek_sni over loopback ------------------------------------------------

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    (client, accepted.expect("accept").0)
}

#[tokio::test]
async fn sni_peek_handles_tiny_writes_and_consumes_nothing() {
    let (mut client, server) = pair().await;
    let hello = rustls_hello("Tiny.Writes.Example");
    let mut sent = hello.clone();
    sent.extend(b"after the hello");
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        let mut pos = 0;
        let mut step = 0;
        while pos < to_send.len() {
            let n = (step % 7 + 1).min(to_send.len() - pos);
            client.write_all(&to_send[pos..pos + n]).await?;
            pos += n;
            step += 1;
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        client.shutdown().await
    });
    let name = peek_sni(&server, Duration::from_secs(20), DEFAULT_PEEK_MAX).await;
    assert_eq!(name.expect("sni"), Some("tiny.writes.example".into()));
    writer.await.expect("writer task").expect("writes");
    let mut server = server;
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.expect("read back");
    assert_eq!(got, sent, "peek must leave every byte in the socket");
}

// Real time, not paused time: the crate's dev tokio has no test-util, and a
// short limit keeps this fast.
#[tokio::test]
async fn sni_peek_times_out_on_half_a_hello() {
    let (mut client, server) = pair().await;
    let hello = hello_for("half.example");
    client
        .write_all(&hello[..hello.len() / 2])
        .await
        .expect("write");
    let limit = Duration::from_millis(300);
    let start = tokio::time::Instant::now();
    let err = peek_sni(&server, limit, DEFAULT_PEEK_MAX)
        .await
        .expect_err("timeout");
    assert!(matches!(err, SniError::Timeout), "{err:?}");
    let took = start.elapsed();
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "{took:?}"
    );
    drop(client);
}

#[tokio::test]
async fn sni_peek_rejects_a_hello_larger_than_the_buffer() {
    let (mut client, server) = pair().await;
    // A valid hello with a padding extension, split over two records.
    let mut exts = sni_ext(b"big.example");
    exts.extend(ext(0x0015, &[0u8; 12_000]));
    let hs = handshake(&body(Some(&exts)));
    let bytes = records(&hs, &[8000]);
    assert_eq!(sni_of(&bytes), Some("big.example".into()));
    client.write_all(&bytes).await.expect("write");
    let err = peek_sni(&server, Duration::from_secs(5), 4096)
        .await
        .expect_err("large");
    assert!(matches!(err, SniError::TooLarge(_)), "{err:?}");
}

#[tokio::test]
async fn sni_peek_rejects_a_declared_oversized_hello_at_once() {
    let (mut client, server) = pair().await;
    let mut bytes = vec![22, 3, 1, 0x40, 0x00, 1, 0x00, 0x50, 0x00];
    bytes.extend([0; 100]);
    client.write_all(&bytes).await.expect("write");
    let err = peek_sni(&server, Duration::from_secs(5), DEFAULT_PEEK_MAX)
        .await
        .expect_err("large");
    assert!(matches!(err, SniError::TooLarge(_)), "{err:?}");
}

#[tokio::test]
async fn sni_peek_reports_a_client_that_closes_early() {
    let (client, server) = pair().await;
    drop(client);
    let err = peek_sni(&server, Duration::from_secs(5), DEFAULT_PEEK_MAX)
        .await
        .expect_err("closed");
    assert!(matches!(err, SniError::Closed), "{err:?}");

    let (mut client, server) = pair().await;
    let hello = hello_for("closing.example");
    client.write_all(&hello[..20]).await.expect("write");
    client.shutdown().await.expect("shutdown");
    let err = peek_sni(&server, Duration::from_secs(5), DEFAULT_PEEK_MAX)
        .await
        .expect_err("closed");
    assert!(matches!(err, SniError::Closed), "{err:?}");
}

#[tokio::test]
async fn sni_peek_rejects_plain_http() {
    let (mut client, server) = pair().await;
    client
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let err = peek_sni(&server, Duration::from_secs(5), DEFAULT_PEEK_MAX)
        .await
        .expect_err("not tls");
    assert!(matches!(err, SniError::NotTls), "{err:?}");
}
