//! The HAProxy PROXY protocol, versions 1 (text) and 2 (binary).
//!
//! A strict, pure codec ([`parse`], [`encode_v1`], [`encode_v2`]) plus one
//! async reader ([`read_header`]) that takes exactly the header off a
//! `TcpStream` and leaves every byte after it (an HTTP request, a TLS
//! ClientHello) in the socket. Deciding *whether* a listener expects the
//! header, and which peers may send it, belongs to `listener.rs`.
//!
//! The reference is HAProxy's `proxy-protocol.txt` (2.9). Policy choices
//! beyond it are documented on the items below:
//!
//! - v1 is parsed strictly: single spaces, ports in canonical decimal, and
//!   addresses of the declared family only. After `UNKNOWN` the rest of the
//!   line is ignored, as the spec requires.
//! - A v2 header longer than [`DEFAULT_MAX_HEADER_LEN`] bytes is rejected
//!   although the format allows `16 + 65535`.
//! - v2 TLVs are skipped without interpretation, but their framing must fit
//!   the header exactly.
//! - v2 `LOCAL` ignores the family and the whole address block, as the spec
//!   requires; v2 `PROXY` with `UNSPEC` or `AF_UNIX` addresses yields
//!   [`ProxyHeader::Local`] because neither gives an IP source to use.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::peek::{peek_until, Look, PeekError};

/// The 12-byte signature that opens every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 header, `CRLF` included (spec section 2.1).
pub const V1_MAX_LEN: usize = 107;

/// The longest v2 header [`parse`] and [`read_header`] accept, in bytes
/// (16-byte fixed part included).
///
/// The format allows `16 + 65535`; real senders stay far below 4096 (even an
/// `AF_UNIX` block with a few TLVs), and the bound caps what a client can
/// make us buffer before it has proved anything.
pub const DEFAULT_MAX_HEADER_LEN: usize = 4096;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_FIXED_LEN: usize = 16;
const V2_VERSION: u8 = 2;
const V2_COMMAND_LOCAL: u8 = 0;
const V2_COMMAND_PROXY: u8 = 1;
const V2_INET_STREAM: u8 = 0x11;
const V2_INET6_STREAM: u8 = 0x21;
const V2_INET_LEN: u16 = 12;
const V2_INET6_LEN: u16 = 36;
const V2_UNIX_LEN: u16 = 216;

/// What a PROXY protocol header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// Keep the real peer: a v2 `LOCAL` (a health check from the load
    /// balancer itself), a v1 `UNKNOWN`, or a v2 `PROXY` whose addresses are
    /// `UNSPEC` or `AF_UNIX` and so give no IP endpoint.
    Local,
    /// The connection was relayed for `source`, which connected to
    /// `destination`. Both have the same family; a v2 sender that mixed
    /// families shows IPv4 as v4-mapped IPv6, which is returned as is.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

/// The outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// A whole header: it occupies exactly `buf[..consumed]`.
    Complete {
        header: ProxyHeader,
        consumed: usize,
    },
    /// Every byte seen so far is a valid start of a header; more are needed.
    Incomplete,
}

/// Why a connection's PROXY protocol header was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("input starts with neither the v1 nor the v2 signature")]
    BadSignature,
    #[error("v1 header has no line ending within {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("v1 header has a cr or lf that is not its final crlf")]
    V1BadLineEnding,
    #[error("v1 header has an empty field (leading, doubled or trailing space)")]
    V1BadSpacing,
    #[error("v1 header ends before its {what}")]
    V1MissingField { what: &'static str },
    #[error("v1 header has an invalid {what}")]
    V1BadField { what: &'static str },
    #[error("v1 {what} is not of the declared address family")]
    V1FamilyMismatch { what: &'static str },
    #[error("v1 header has data after the destination port")]
    V1TrailingData,
    #[error("v2 header has version {version}, expected 2")]
    V2BadVersion { version: u8 },
    #[error("v2 header has command {command}, expected 0 (local) or 1 (proxy)")]
    V2BadCommand { command: u8 },
    #[error("v2 header has invalid family and transport byte {byte:#04x}")]
    V2BadFamily { byte: u8 },
    #[error("v2 header length {length} is shorter than its {needed}-byte address block")]
    V2AddressTruncated { length: u16, needed: u16 },
    #[error("v2 header of {total} bytes exceeds the {limit}-byte limit")]
    V2TooLong { total: usize, limit: usize },
    #[error("v2 tlv at byte {offset} overruns the header")]
    V2BadTlv { offset: usize },
    #[error("no complete proxy protocol header within {after:?}")]
    Timeout { after: Duration },
    #[error("reading the proxy protocol header failed")]
    Io(#[from] io::Error),
    #[error("connection closed before a complete proxy protocol header")]
    Closed,
}

/// Parses a v1 or v2 header at the start of `buf`, rejecting v2 headers
/// longer than [`DEFAULT_MAX_HEADER_LEN`].
///
/// Returns `Incomplete` only while every byte seen is a valid start of a
/// header, and an error as soon as the bytes seen prove malformation; a
/// buffer of [`DEFAULT_MAX_HEADER_LEN`] bytes is always enough to decide.
/// Bytes after the header are never looked at.
pub fn parse(buf: &[u8]) -> Result<Parse, ProxyProtocolError> {
    parse_with_limit(buf, DEFAULT_MAX_HEADER_LEN)
}

/// [`parse`] with a caller-chosen bound on the total v2 header length.
///
/// A `max_v2_len` below 52 (16 + an IPv6 address block) rejects every IPv6
/// header. A buffer of `max(max_v2_len, V1_MAX_LEN)` bytes is always enough
/// to decide.
pub fn parse_with_limit(buf: &[u8], max_v2_len: usize) -> Result<Parse, ProxyProtocolError> {
    if buf.is_empty() {
        return Ok(Parse::Incomplete);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf, max_v2_len);
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return parse_v1(buf);
    }
    Err(ProxyProtocolError::BadSignature)
}

fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyProtocolError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let lf = window.iter().position(|&b| b == b'\n');
    let end = lf.unwrap_or(window.len());
    // The only CR allowed is the one right before the LF (or, while the LF
    // has not arrived, the last byte seen).
    if window[..end]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\r' && i + 1 != end)
    {
        return Err(ProxyProtocolError::V1BadLineEnding);
    }
    let line = match lf {
        Some(lf) => match window[..lf].strip_suffix(b"\r") {
            Some(line) => line,
            None => return Err(ProxyProtocolError::V1BadLineEnding),
        },
        None if buf.len() >= V1_MAX_LEN => return Err(ProxyProtocolError::V1TooLong),
        None => window.strip_suffix(b"\r").unwrap_or(window),
    };
    // The caller matched the signature on the bytes available; a shorter
    // line is still waiting for the rest of it.
    let Some(fields) = line.strip_prefix(V1_PREFIX) else {
        return Ok(Parse::Incomplete);
    };
    match (parse_v1_fields(fields, lf.is_some())?, lf) {
        (Some(header), Some(lf)) => Ok(Parse::Complete {
            header,
            consumed: lf + 1,
        }),
        _ => Ok(Parse::Incomplete),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum V1Family {
    Tcp4,
    Tcp6,
}

const V1_FIELDS: [&str; 5] = [
    "protocol",
    "source address",
    "destination address",
    "source port",
    "destination port",
];

/// Validates the fields after `PROXY `. With `complete` false the last field
/// may be cut short and is checked as a prefix; `Ok(None)` then means "valid
/// so far".
fn parse_v1_fields(
    fields: &[u8],
    complete: bool,
) -> Result<Option<ProxyHeader>, ProxyProtocolError> {
    let count = fields.split(|&b| b == b' ').count();
    let mut family = V1Family::Tcp4;
    let mut addrs = [IpAddr::V4(Ipv4Addr::UNSPECIFIED); 2];
    let mut ports = [0u16; 2];
    for (i, token) in fields.split(|&b| b == b' ').enumerate() {
        let is_last = i + 1 == count;
        let partial = is_last && !complete;
        let Some(&what) = V1_FIELDS.get(i) else {
            return Err(ProxyProtocolError::V1TrailingData);
        };
        if token.is_empty() {
            return if partial {
                Ok(None)
            } else if is_last {
                Err(ProxyProtocolError::V1MissingField { what })
            } else {
                Err(ProxyProtocolError::V1BadSpacing)
            };
        }
        match i {
            0 => match token {
                b"TCP4" => family = V1Family::Tcp4,
                b"TCP6" => family = V1Family::Tcp6,
                // Spec 2.1: after UNKNOWN the receiver ignores the rest of
                // the line and keeps the real connection's endpoints.
                b"UNKNOWN" if !partial => return Ok(complete.then_some(ProxyHeader::Local)),
                _ if partial
                    && [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
                        .iter()
                        .any(|p| p.starts_with(token)) => {}
                _ => return Err(ProxyProtocolError::V1BadField { what }),
            },
            1 | 2 => {
                if let Some(addr) = v1_address(token, family, partial, what)? {
                    addrs[i - 1] = addr;
                }
            }
            _ => {
                if let Some(port) = v1_port(token, partial, what)? {
                    ports[i - 3] = port;
                }
            }
        }
        if partial {
            return Ok(None);
        }
    }
    if let Some(&what) = V1_FIELDS.get(count) {
        return Err(ProxyProtocolError::V1MissingField { what });
    }
    Ok(Some(ProxyHeader::Proxied {
        source: SocketAddr::new(addrs[0], ports[0]),
        destination: SocketAddr::new(addrs[1], ports[1]),
    }))
}

/// Checks one v1 address of `family`; a `partial` token is only checked as a
/// possible prefix and gives `Ok(None)`.
fn v1_address(
    token: &[u8],
    family: V1Family,
    partial: bool,
    what: &'static str,
) -> Result<Option<IpAddr>, ProxyProtocolError> {
    let bad = ProxyProtocolError::V1BadField { what };
    let mismatch = ProxyProtocolError::V1FamilyMismatch { what };
    let (max_len, allowed): (usize, fn(&u8) -> bool) = match family {
        V1Family::Tcp4 => (15, |b| b.is_ascii_digit() || *b == b'.'),
        V1Family::Tcp6 => (45, |b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.'),
    };
    if let Some(b) = token.iter().find(|b| !allowed(b)) {
        return Err(if family == V1Family::Tcp4 && *b == b':' {
            mismatch
        } else {
            bad
        });
    }
    if token.len() > max_len {
        return Err(bad);
    }
    if partial {
        return Ok(None);
    }
    // Only ASCII passed the check above, so this cannot fail.
    let text = std::str::from_utf8(token).map_err(|_| bad)?;
    let (own, other) = match family {
        V1Family::Tcp4 => (
            text.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            text.parse::<Ipv6Addr>().is_ok(),
        ),
        V1Family::Tcp6 => (
            text.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            text.parse::<Ipv4Addr>().is_ok(),
        ),
    };
    match own {
        Some(addr) => Ok(Some(addr)),
        None if other => Err(mismatch),
        None => Err(ProxyProtocolError::V1BadField { what }),
    }
}

/// Checks one v1 port: 1 to 5 ASCII digits, no leading zero except `0`
/// itself, at most 65535. A `partial` token gives `Ok(None)`.
fn v1_port(
    token: &[u8],
    partial: bool,
    what: &'static str,
) -> Result<Option<u16>, ProxyProtocolError> {
    let bad = ProxyProtocolError::V1BadField { what };
    if token.len() > 5
        || !token.iter().all(u8::is_ascii_digit)
        || (token.len() > 1 && token[0] == b'0')
    {
        return Err(bad);
    }
    let value = token
        .iter()
        .fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'));
    // More digits only make a partial value larger.
    let port = u16::try_from(value).map_err(|_| bad)?;
    Ok((!partial).then_some(port))
}

fn parse_v2(buf: &[u8], max_len: usize) -> Result<Parse, ProxyProtocolError> {
    let Some(&version_command) = buf.get(12) else {
        return Ok(Parse::Incomplete);
    };
    let version = version_command >> 4;
    if version != V2_VERSION {
        return Err(ProxyProtocolError::V2BadVersion { version });
    }
    let command = version_command & 0x0f;
    if command != V2_COMMAND_LOCAL && command != V2_COMMAND_PROXY {
        return Err(ProxyProtocolError::V2BadCommand { command });
    }
    let Some(&family) = buf.get(13) else {
        return Ok(Parse::Incomplete);
    };
    let is_local = command == V2_COMMAND_LOCAL;
    // Spec 2.2: with LOCAL the receiver discards the protocol block,
    // family included, so only PROXY validates it.
    let needed = if is_local {
        0
    } else {
        match family {
            0x00 => 0,
            0x11 | 0x12 => V2_INET_LEN,
            0x21 | 0x22 => V2_INET6_LEN,
            0x31 | 0x32 => V2_UNIX_LEN,
            byte => return Err(ProxyProtocolError::V2BadFamily { byte }),
        }
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parse::Incomplete);
    };
    let length = u16::from_be_bytes([hi, lo]);
    let total = V2_FIXED_LEN + usize::from(length);
    if total > max_len {
        return Err(ProxyProtocolError::V2TooLong {
            total,
            limit: max_len,
        });
    }
    if length < needed {
        return Err(ProxyProtocolError::V2AddressTruncated { length, needed });
    }
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(Parse::Incomplete);
    };
    let header = if is_local || family == 0x00 {
        // No address block to interpret; nothing after it is framed.
        ProxyHeader::Local
    } else {
        let (addresses, tlvs) = block.split_at(usize::from(needed));
        v2_skip_tlvs(tlvs, V2_FIXED_LEN + addresses.len())?;
        v2_addresses(family, addresses)
    };
    Ok(Parse::Complete {
        header,
        consumed: total,
    })
}

/// Decodes the address block of a validated `family`, already cut to its
/// exact size.
fn v2_addresses(family: u8, block: &[u8]) -> ProxyHeader {
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match family >> 4 {
        1 => {
            let ip =
                |at: usize| Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]);
            ProxyHeader::Proxied {
                source: SocketAddr::V4(SocketAddrV4::new(ip(0), port(8))),
                destination: SocketAddr::V4(SocketAddrV4::new(ip(4), port(10))),
            }
        }
        2 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            ProxyHeader::Proxied {
                source: SocketAddr::V6(SocketAddrV6::new(ip(0), port(32), 0, 0)),
                destination: SocketAddr::V6(SocketAddrV6::new(ip(16), port(34), 0, 0)),
            }
        }
        // AF_UNIX: paths are no IP endpoint, so keep the real peer.
        _ => ProxyHeader::Local,
    }
}

/// Walks the TLVs after the address block: each is a type byte and a
/// big-endian u16 length, and together they must fill the header exactly.
/// `offset` is where `tlvs` starts in the header, for the error.
fn v2_skip_tlvs(mut tlvs: &[u8], mut offset: usize) -> Result<(), ProxyProtocolError> {
    while !tlvs.is_empty() {
        let &[_, hi, lo, ..] = tlvs else {
            return Err(ProxyProtocolError::V2BadTlv { offset });
        };
        let size = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        let Some(rest) = tlvs.get(size..) else {
            return Err(ProxyProtocolError::V2BadTlv { offset });
        };
        tlvs = rest;
        offset += size;
    }
    Ok(())
}

/// Encodes a v1 header for a backend: `TCP4` or `TCP6` when both addresses
/// share a family, else `PROXY UNKNOWN\r\n` (v1 cannot mix families).
/// IPv6 scope ids and flow labels are not carried.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let protocol = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {protocol} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// Encodes a v2 `PROXY` header (TCP over IPv4 or IPv6, no TLVs) for a
/// backend. Mixed families are sent as IPv6 with the IPv4 side v4-mapped.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + usize::from(V2_INET6_LEN));
    out.extend_from_slice(&V2_SIGNATURE);
    out.push((V2_VERSION << 4) | V2_COMMAND_PROXY);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(V2_INET_STREAM);
            out.extend_from_slice(&V2_INET_LEN.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        _ => {
            let v6 = |addr: SocketAddr| match addr.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.push(V2_INET6_STREAM);
            out.extend_from_slice(&V2_INET6_LEN.to_be_bytes());
            out.extend_from_slice(&v6(source).octets());
            out.extend_from_slice(&v6(destination).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// Encodes a v2 `LOCAL` header: the connection is the sender's own (a
/// health check), and the receiver keeps the real peer.
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push((V2_VERSION << 4) | V2_COMMAND_LOCAL);
    out.push(0x00);
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// Reads exactly one v1 or v2 header (policy as in [`parse`]) off `stream`
/// within `timeout`, leaving every byte after it unread in the socket.
///
/// It peeks until [`parse`] decides, then reads exactly the header's bytes.
/// Errors: any [`parse`] error; `Closed` if the peer closes before a whole
/// header arrived; `Timeout` if no decision is reached in time; `Io` for
/// socket errors.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyProtocolError> {
    // Large enough for parse to always decide (see DEFAULT_MAX_HEADER_LEN).
    let max = DEFAULT_MAX_HEADER_LEN.max(V1_MAX_LEN) + 1;
    let decide = |buf: &[u8]| {
        parse(buf).map(|p| match p {
            Parse::Complete { header, consumed } => Look::Done((header, consumed)),
            Parse::Incomplete => Look::More,
        })
    };
    let (header, consumed) =
        peek_until(stream, timeout, max, decide)
            .await
            .map_err(|e| match e {
                PeekError::Rejected(e) => e,
                // `max` always suffices for `parse` to decide, so running
                // out of room means the same as running out of time.
                PeekError::Timeout | PeekError::TooLarge => {
                    ProxyProtocolError::Timeout { after: timeout }
                }
                PeekError::Closed => ProxyProtocolError::Closed,
                PeekError::Io(e) => ProxyProtocolError::Io(e),
            })?;
    let mut taken = vec![0u8; consumed];
    stream.read_exact(&mut taken).await?;
    Ok(header)
}

#[cfg(test)]
mod tests;
