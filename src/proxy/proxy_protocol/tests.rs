use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::*;
use ProxyProtocolError as E;

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test addresses are valid")
}

fn proxied(source: &str, destination: &str) -> ProxyHeader {
    ProxyHeader::Proxied {
        source: addr(source),
        destination: addr(destination),
    }
}

/// A v2 header with the given version/command and family bytes, declared
/// length and block (which may disagree with the length on purpose).
fn v2(version_command: u8, family: u8, length: u16, block: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(version_command);
    out.push(family);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(block);
    out
}

/// An IPv4 PROXY header, 192.0.2.1:5000 -> 198.51.100.2:443, followed by
/// `tlvs` (counted in the length).
fn v2_inet_with_tlvs(tlvs: &[u8]) -> Vec<u8> {
    let mut block = vec![192, 0, 2, 1, 198, 51, 100, 2];
    block.extend_from_slice(&5000u16.to_be_bytes());
    block.extend_from_slice(&443u16.to_be_bytes());
    block.extend_from_slice(tlvs);
    let length = u16::try_from(block.len()).expect("test blocks are small");
    v2(0x21, 0x11, length, &block)
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    let length = u16::try_from(value.len()).expect("test values are small");
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn complete(buf: &[u8]) -> (ProxyHeader, usize) {
    match parse(buf) {
        Ok(Parse::Complete { header, consumed }) => (header, consumed),
        other => panic!("expected a complete header for {buf:?}, got {other:?}"),
    }
}

fn valid_headers() -> Vec<(&'static str, Vec<u8>, ProxyHeader)> {
    let tlvs = [tlv(0x01, b"h2"), tlv(0x02, b"example.com"), tlv(0x04, b"")].concat();
    let longest_v1 = {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 2, b'x');
        line.extend_from_slice(b"\r\n");
        line
    };
    vec![
        (
            "v1 tcp4",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec(),
            proxied("192.0.2.1:56324", "198.51.100.2:443"),
        ),
        (
            "v1 tcp6",
            b"PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n".to_vec(),
            proxied("[2001:db8::1]:0", "[2001:db8::2]:65535"),
        ),
        (
            "v1 unknown",
            b"PROXY UNKNOWN\r\n".to_vec(),
            ProxyHeader::Local,
        ),
        (
            "v1 unknown with addresses",
            b"PROXY UNKNOWN ::1 ::2 1 2\r\n".to_vec(),
            ProxyHeader::Local,
        ),
        ("v1 of the maximum length", longest_v1, ProxyHeader::Local),
        (
            "v2 tcp4",
            encode_v2(addr("192.0.2.1:5000"), addr("198.51.100.2:443")),
            proxied("192.0.2.1:5000", "198.51.100.2:443"),
        ),
        (
            "v2 tcp6",
            encode_v2(addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2")),
            proxied("[2001:db8::1]:1", "[2001:db8::2]:2"),
        ),
        ("v2 local", encode_v2_local(), ProxyHeader::Local),
        (
            "v2 with tlvs",
            v2_inet_with_tlvs(&tlvs),
            proxied("192.0.2.1:5000", "198.51.100.2:443"),
        ),
        (
            "v2 unix",
            v2(0x21, 0x31, 216, &[b'/'; 216]),
            ProxyHeader::Local,
        ),
        (
            "v2 proxy unspec",
            v2(0x21, 0x00, 0, &[]),
            ProxyHeader::Local,
        ),
    ]
}

#[test]
fn v1_round_trips_tcp4_and_tcp6() {
    for (source, destination) in [
        ("192.0.2.1:56324", "198.51.100.2:443"),
        ("0.0.0.0:0", "255.255.255.255:65535"),
        ("[2001:db8::1]:1", "[2001:db8::2]:2"),
        (
            "[::ffff:192.0.2.1]:80",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        ),
    ] {
        let bytes = encode_v1(addr(source), addr(destination));
        assert!(bytes.len() <= V1_MAX_LEN);
        assert_eq!(
            complete(&bytes),
            (proxied(source, destination), bytes.len())
        );
    }
}

#[test]
fn v1_encodes_mixed_families_as_unknown_which_parses_as_local() {
    let bytes = encode_v1(addr("192.0.2.1:1"), addr("[2001:db8::2]:2"));
    assert_eq!(bytes, b"PROXY UNKNOWN\r\n");
    assert_eq!(complete(&bytes), (ProxyHeader::Local, bytes.len()));
}

#[test]
fn v2_round_trips_tcp4_tcp6_and_local() {
    for (source, destination) in [
        ("192.0.2.1:56324", "198.51.100.2:443"),
        ("[2001:db8::1]:0", "[2001:db8::2]:65535"),
    ] {
        let bytes = encode_v2(addr(source), addr(destination));
        assert_eq!(
            complete(&bytes),
            (proxied(source, destination), bytes.len())
        );
    }
    let local = encode_v2_local();
    assert_eq!(complete(&local), (ProxyHeader::Local, 16));
}

#[test]
fn v2_maps_ipv4_to_v4_mapped_ipv6_when_families_mix() {
    let bytes = encode_v2(addr("192.0.2.1:1"), addr("[2001:db8::2]:2"));
    let mapped = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped();
    assert_eq!(
        complete(&bytes).0,
        ProxyHeader::Proxied {
            source: SocketAddr::new(IpAddr::V6(mapped), 1),
            destination: addr("[2001:db8::2]:2"),
        }
    );
}

#[test]
fn v2_skips_tlvs_and_consumes_exactly_the_declared_length() {
    let tlvs = [tlv(0x01, b"h2"), tlv(0x20, &[0; 300]), tlv(0x04, b"")].concat();
    let mut bytes = v2_inet_with_tlvs(&tlvs);
    let header_len = bytes.len();
    bytes.extend_from_slice(b"\x16\x03\x01 client hello");
    assert_eq!(
        complete(&bytes),
        (proxied("192.0.2.1:5000", "198.51.100.2:443"), header_len)
    );
}

#[test]
fn v2_local_ignores_its_family_and_address_block() {
    let bytes = v2(0x20, 0xff, 3, b"abc");
    assert_eq!(complete(&bytes), (ProxyHeader::Local, 19));
}

#[test]
fn bytes_after_a_header_are_never_examined() {
    for (name, header, expected) in valid_headers() {
        for trailer in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\r\n\n\0garbage",
            b"PROXY again",
        ] {
            let bytes = [header.as_slice(), trailer].concat();
            assert_eq!(complete(&bytes), (expected, header.len()), "{name}");
        }
    }
}

#[test]
fn every_prefix_of_a_valid_header_is_incomplete() {
    for (name, header, _) in valid_headers() {
        for end in 0..header.len() {
            match parse(&header[..end]) {
                Ok(Parse::Incomplete) => {}
                other => panic!("{name}: prefix of {end} bytes gave {other:?}"),
            }
        }
    }
}

type Expect = fn(&ProxyProtocolError) -> bool;

fn malformed_headers() -> Vec<(&'static str, Vec<u8>, Expect)> {
    let v1 = |text: &str| text.as_bytes().to_vec();
    let too_long_no_crlf = {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(120, b'x');
        line
    };
    let crlf_at_108 = {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 1, b'x');
        line.extend_from_slice(b"\r\n");
        line
    };
    vec![
        ("http request", v1("GET / HTTP/1.1\r\n"), |e| {
            matches!(e, E::BadSignature)
        }),
        ("tls client hello", b"\x16\x03\x01\x02\x00".to_vec(), |e| {
            matches!(e, E::BadSignature)
        }),
        (
            "lowercase proxy",
            v1("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            |e| matches!(e, E::BadSignature),
        ),
        ("no space after PROXY", v1("PROXY\r\n"), |e| {
            matches!(e, E::BadSignature)
        }),
        (
            "v2 signature typo",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c".to_vec(),
            |e| matches!(e, E::BadSignature),
        ),
        (
            "double space",
            v1("PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n"),
            |e| matches!(e, E::V1BadSpacing),
        ),
        (
            "space before protocol",
            v1("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            |e| matches!(e, E::V1BadSpacing),
        ),
        (
            "missing destination port",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1MissingField {
                        what: "destination port"
                    }
                )
            },
        ),
        ("missing addresses", v1("PROXY TCP4\r\n"), |e| {
            matches!(
                e,
                E::V1MissingField {
                    what: "source address"
                }
            )
        }),
        ("empty protocol", v1("PROXY \r\n"), |e| {
            matches!(e, E::V1MissingField { what: "protocol" })
        }),
        (
            "port 65536",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source port"
                    }
                )
            },
        ),
        (
            "port 99999",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "destination port"
                    }
                )
            },
        ),
        (
            "port with plus sign",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source port"
                    }
                )
            },
        ),
        (
            "port with minus sign",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source port"
                    }
                )
            },
        ),
        (
            "port with leading zero",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source port"
                    }
                )
            },
        ),
        (
            "port with six digits",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source port"
                    }
                )
            },
        ),
        (
            "junk glued to the port",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 443x\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "destination port"
                    }
                )
            },
        ),
        (
            "unknown protocol",
            v1("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"),
            |e| matches!(e, E::V1BadField { what: "protocol" }),
        ),
        (
            "lowercase protocol",
            v1("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
            |e| matches!(e, E::V1BadField { what: "protocol" }),
        ),
        (
            "ipv6 under tcp4",
            v1("PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1FamilyMismatch {
                        what: "source address"
                    }
                )
            },
        ),
        (
            "ipv4 under tcp6",
            v1("PROXY TCP6 ::1 5.6.7.8 1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1FamilyMismatch {
                        what: "destination address"
                    }
                )
            },
        ),
        (
            "ipv4 octet over 255",
            v1("PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source address"
                    }
                )
            },
        ),
        (
            "ipv4 with leading zero",
            v1("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source address"
                    }
                )
            },
        ),
        (
            "ipv4 with three octets",
            v1("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source address"
                    }
                )
            },
        ),
        (
            "ipv6 with a zone",
            v1("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source address"
                    }
                )
            },
        ),
        (
            "hostname",
            v1("PROXY TCP4 localhost 5.6.7.8 1 2\r\n"),
            |e| {
                matches!(
                    e,
                    E::V1BadField {
                        what: "source address"
                    }
                )
            },
        ),
        ("108 bytes without crlf", too_long_no_crlf, |e| {
            matches!(e, E::V1TooLong)
        }),
        ("crlf ending at byte 108", crlf_at_108, |e| {
            matches!(e, E::V1TooLong)
        }),
        (
            "lf without cr",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
            |e| matches!(e, E::V1BadLineEnding),
        ),
        (
            "cr inside the line",
            v1("PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n"),
            |e| matches!(e, E::V1BadLineEnding),
        ),
        ("cr inside unknown", v1("PROXY UNKNOWN a\rb\r\n"), |e| {
            matches!(e, E::V1BadLineEnding)
        }),
        (
            "trailing field",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 x\r\n"),
            |e| matches!(e, E::V1TrailingData),
        ),
        (
            "trailing space",
            v1("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
            |e| matches!(e, E::V1TrailingData),
        ),
        ("v2 version 1", v2(0x11, 0x11, 12, &[0; 12]), |e| {
            matches!(e, E::V2BadVersion { version: 1 })
        }),
        ("v2 version 3", v2(0x31, 0x11, 12, &[0; 12]), |e| {
            matches!(e, E::V2BadVersion { version: 3 })
        }),
        ("v2 command 2", v2(0x22, 0x11, 12, &[0; 12]), |e| {
            matches!(e, E::V2BadCommand { command: 2 })
        }),
        ("v2 command 15", v2(0x2f, 0x11, 12, &[0; 12]), |e| {
            matches!(e, E::V2BadCommand { command: 15 })
        }),
        ("v2 family 4", v2(0x21, 0x41, 12, &[0; 12]), |e| {
            matches!(e, E::V2BadFamily { byte: 0x41 })
        }),
        ("v2 transport 3", v2(0x21, 0x13, 12, &[0; 12]), |e| {
            matches!(e, E::V2BadFamily { byte: 0x13 })
        }),
        (
            "v2 unspec family with stream",
            v2(0x21, 0x01, 0, &[]),
            |e| matches!(e, E::V2BadFamily { byte: 0x01 }),
        ),
        (
            "v2 inet with unspec transport",
            v2(0x21, 0x10, 12, &[0; 12]),
            |e| matches!(e, E::V2BadFamily { byte: 0x10 }),
        ),
        (
            "v2 inet block too short",
            v2(0x21, 0x11, 11, &[0; 11]),
            |e| {
                matches!(
                    e,
                    E::V2AddressTruncated {
                        length: 11,
                        needed: 12
                    }
                )
            },
        ),
        (
            "v2 inet6 block too short",
            v2(0x21, 0x21, 12, &[0; 12]),
            |e| {
                matches!(
                    e,
                    E::V2AddressTruncated {
                        length: 12,
                        needed: 36
                    }
                )
            },
        ),
        (
            "v2 unix block too short",
            v2(0x21, 0x31, 108, &[0; 108]),
            |e| {
                matches!(
                    e,
                    E::V2AddressTruncated {
                        length: 108,
                        needed: 216
                    }
                )
            },
        ),
        (
            "v2 over the length limit",
            v2(0x21, 0x11, 4081, &[0; 4081]),
            |e| {
                matches!(
                    e,
                    E::V2TooLong {
                        total: 4097,
                        limit: 4096
                    }
                )
            },
        ),
        (
            "v2 at the format maximum",
            v2(0x20, 0x00, u16::MAX, &[]),
            |e| {
                matches!(
                    e,
                    E::V2TooLong {
                        total: 65551,
                        limit: 4096
                    }
                )
            },
        ),
        (
            "v2 tlv header cut short",
            v2_inet_with_tlvs(&[0x01, 0x00]),
            |e| matches!(e, E::V2BadTlv { offset: 28 }),
        ),
        (
            "v2 tlv value overruns",
            v2_inet_with_tlvs(&[0x04, 0x00, 0x00, 0x01, 0x00, 0x05, b'h']),
            |e| matches!(e, E::V2BadTlv { offset: 31 }),
        ),
    ]
}

#[test]
fn malformed_headers_are_rejected_with_their_kind() {
    let cases = malformed_headers();
    assert!(cases.len() >= 25);
    for (name, bytes, expected) in cases {
        match parse(&bytes) {
            Err(error) => assert!(expected(&error), "{name}: wrong error {error:?}"),
            Ok(parse) => panic!("{name}: expected an error, got {parse:?}"),
        }
    }
}

#[test]
fn no_prefix_of_a_malformed_header_is_complete() {
    for (name, bytes, _) in malformed_headers() {
        for end in 0..bytes.len() {
            if let Ok(Parse::Complete { .. }) = parse(&bytes[..end]) {
                panic!("{name}: prefix of {end} bytes parsed as complete");
            }
        }
    }
}

#[test]
fn malformation_is_reported_as_soon_as_the_bytes_prove_it() {
    let cases: [(&[u8], Expect); 8] = [
        (b"G", |e| matches!(e, E::BadSignature)),
        (b"PROXY TCP4  ", |e| matches!(e, E::V1BadSpacing)),
        (b"PROXY TCP4 ::", |e| {
            matches!(e, E::V1FamilyMismatch { .. })
        }),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 08", |e| {
            matches!(e, E::V1BadField { .. })
        }),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536", |e| {
            matches!(e, E::V1BadField { .. })
        }),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", |e| {
            matches!(e, E::V1TrailingData)
        }),
        (b"\r\n\r\n\0\r\nQUIT\n\x31", |e| {
            matches!(e, E::V2BadVersion { .. })
        }),
        // The length alone proves the header too long; nothing else arrived.
        (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff", |e| {
            matches!(e, E::V2TooLong { .. })
        }),
    ];
    for (bytes, expected) in cases {
        match parse(bytes) {
            Err(error) => assert!(expected(&error), "{bytes:?}: wrong error {error:?}"),
            Ok(parse) => panic!("{bytes:?}: expected an error, got {parse:?}"),
        }
    }
}

#[test]
fn parse_with_limit_applies_the_callers_bound() {
    let bytes = v2_inet_with_tlvs(&tlv(0x04, &[0; 100]));
    assert!(matches!(
        parse_with_limit(&bytes, 64),
        Err(E::V2TooLong {
            total: 131,
            limit: 64
        })
    ));
    assert!(matches!(
        parse_with_limit(&bytes, 131),
        Ok(Parse::Complete { consumed: 131, .. })
    ));
}

#[test]
fn errors_render_lower_case_without_a_trailing_period() {
    let error = E::V1BadField {
        what: "source port",
    };
    assert_eq!(error.to_string(), "v1 header has an invalid source port");
    let error = E::V2BadFamily { byte: 0x41 };
    assert_eq!(
        error.to_string(),
        "v2 header has invalid family and transport byte 0x41"
    );
}

/// A connected loopback pair: (client, server side).
async fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let local = listener.local_addr().expect("local addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(local), listener.accept());
    let client = client.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    (client, accepted.expect("accept").0)
}

/// Sends `bytes` in `chunk`-byte writes with a pause after each, so the
/// server sees the header arrive in pieces, then closes the write side.
async fn trickle(mut client: TcpStream, bytes: Vec<u8>, chunk: usize) -> TcpStream {
    for piece in bytes.chunks(chunk) {
        client.write_all(piece).await.expect("write");
        // The pause is the point here: it splits the header across reads.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client.shutdown().await.expect("shutdown");
    client
}

async fn header_then_payload(header: Vec<u8>, payload: &[u8], chunk: usize) -> ProxyHeader {
    let (client, mut server) = connected_pair().await;
    let sender = tokio::spawn(trickle(client, [header, payload.to_vec()].concat(), chunk));
    let parsed = read_header(&mut server, Duration::from_secs(5))
        .await
        .expect("header parses");
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.expect("read payload");
    assert_eq!(rest, payload, "payload after the header is intact");
    drop(sender.await.expect("sender"));
    parsed
}

#[tokio::test]
async fn read_header_takes_a_trickled_v1_header_and_leaves_the_payload() {
    let header = encode_v1(addr("192.0.2.1:56324"), addr("198.51.100.2:443"));
    let payload = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n";
    for chunk in [1, 3, 7, 200] {
        let parsed = header_then_payload(header.clone(), payload, chunk).await;
        assert_eq!(parsed, proxied("192.0.2.1:56324", "198.51.100.2:443"));
    }
}

#[tokio::test]
async fn read_header_takes_a_trickled_v2_header_and_leaves_the_payload() {
    let header = v2_inet_with_tlvs(&[tlv(0x01, b"h2"), tlv(0x02, b"example.com")].concat());
    // Starts like a TLS ClientHello and holds every byte value.
    let payload: Vec<u8> = [0x16, 0x03, 0x01].into_iter().chain(0..=255).collect();
    for chunk in [1, 5, 16, 1000] {
        let parsed = header_then_payload(header.clone(), &payload, chunk).await;
        assert_eq!(parsed, proxied("192.0.2.1:5000", "198.51.100.2:443"));
    }
}

#[tokio::test]
async fn read_header_detects_v1_v2_and_local() {
    let cases = [
        (
            encode_v1(addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2")),
            proxied("[2001:db8::1]:1", "[2001:db8::2]:2"),
        ),
        (
            encode_v2(addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2")),
            proxied("[2001:db8::1]:1", "[2001:db8::2]:2"),
        ),
        (b"PROXY UNKNOWN\r\n".to_vec(), ProxyHeader::Local),
        (encode_v2_local(), ProxyHeader::Local),
    ];
    for (header, expected) in cases {
        assert_eq!(header_then_payload(header, b"after", 1000).await, expected);
    }
}

#[tokio::test]
async fn read_header_times_out_on_half_a_header() {
    let (mut client, mut server) = connected_pair().await;
    let header = encode_v2(addr("192.0.2.1:1"), addr("198.51.100.2:2"));
    client.write_all(&header[..10]).await.expect("write");
    let limit = Duration::from_millis(200);
    let started = Instant::now();
    let result = read_header(&mut server, limit).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(E::Timeout { after }) if after == limit),
        "{result:?}"
    );
    assert!(elapsed >= limit, "gave up early, after {elapsed:?}");
    assert!(
        elapsed < limit + Duration::from_secs(1),
        "overran, {elapsed:?}"
    );
    drop(client);
}

#[tokio::test]
async fn read_header_rejects_a_plain_request_without_consuming_it() {
    let (mut client, mut server) = connected_pair().await;
    let request = b"GET / HTTP/1.1\r\n\r\n";
    client.write_all(request).await.expect("write");
    client.shutdown().await.expect("shutdown");
    let result = read_header(&mut server, Duration::from_secs(5)).await;
    assert!(matches!(result, Err(E::BadSignature)), "{result:?}");
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.expect("read");
    assert_eq!(rest, request);
}

#[tokio::test]
async fn read_header_reports_a_peer_that_closes_without_sending() {
    let (client, mut server) = connected_pair().await;
    drop(client);
    let result = read_header(&mut server, Duration::from_secs(5)).await;
    assert!(matches!(result, Err(E::Closed)), "{result:?}");
}

#[tokio::test]
async fn read_header_resumes_after_the_peer_stalls_mid_header() {
    let (mut client, mut server) = connected_pair().await;
    let header = encode_v1(addr("192.0.2.1:1"), addr("198.51.100.2:2"));
    let (first, second) = header.split_at(9);
    let payload = b"\x16\x03\x01hello";
    let reader = tokio::spawn(async move {
        let parsed = read_header(&mut server, Duration::from_secs(5)).await;
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("read payload");
        (parsed, rest)
    });
    client.write_all(first).await.expect("write");
    // Long enough for the reader's retry wait to reach its maximum.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client
        .write_all(&[second, payload].concat())
        .await
        .expect("write");
    client.shutdown().await.expect("shutdown");
    let (parsed, rest) = reader.await.expect("reader");
    assert_eq!(
        parsed.expect("header parses"),
        proxied("192.0.2.1:1", "198.51.100.2:2")
    );
    assert_eq!(rest, payload);
}

#[tokio::test]
async fn read_header_reports_a_peer_that_closes_mid_header_at_once() {
    let (mut client, mut server) = connected_pair().await;
    client.write_all(b"PROXY TCP4 1.2").await.expect("write");
    client.shutdown().await.expect("shutdown");
    // Far longer than the test may take: the close is seen, not waited out.
    let limit = Duration::from_secs(30);
    let started = std::time::Instant::now();
    let result = read_header(&mut server, limit).await;
    assert!(matches!(result, Err(E::Closed)), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
