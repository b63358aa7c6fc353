//! Reads the server name (SNI) from a TLS ClientHello without terminating
//! TLS, so a passthrough listener can route on it and then forward the
//! client's bytes to the backend untouched.
//!
//! [`parse_client_hello`] is a pure function over the bytes seen so far;
//! [`peek_sni`] drives it with `TcpStream::peek`, which leaves the bytes in
//! the socket for the backend. Terminating TLS (and SNI-based certificate
//! selection) is a different concern and does not live here.
//!
//! Policy limits, all enforced before any bytes are buffered past them:
//! - a TLS record may carry at most [`MAX_RECORD_LEN`] bytes (2^14 + 2048,
//!   the RFC 8446 ciphertext limit; a plaintext ClientHello fragment must be
//!   smaller still, but we leave that to the backend);
//! - the ClientHello handshake message (4-byte header included) may be at
//!   most [`MAX_CLIENT_HELLO`] bytes, and may be split across at most
//!   [`MAX_RECORDS`] records;
//! - so [`DEFAULT_PEEK_MAX`] bytes of peek buffer always suffice.

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use super::peek::{peek_until, Look, PeekError};

/// Largest record payload accepted: 2^14 + 2048 bytes (RFC 8446 §5.2).
pub const MAX_RECORD_LEN: usize = 16384 + 2048;
/// Largest ClientHello accepted, 4-byte handshake header included. Real
/// ClientHellos are a few hundred bytes; a post-quantum key share brings
/// them to about 2 KiB.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// Most TLS records a ClientHello may be split across. Legitimate clients
/// use one or two; many tiny records only cost us work.
pub const MAX_RECORDS: usize = 32;
/// Peek buffer size that holds any ClientHello within the limits above.
pub const DEFAULT_PEEK_MAX: usize = MAX_CLIENT_HELLO + MAX_RECORDS * RECORD_HEADER_LEN;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;
const MAX_DNS_NAME_LEN: usize = 253;
const MAX_DNS_LABEL_LEN: usize = 63;

/// The outcome of looking at the bytes a client has sent so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// A whole, well-formed ClientHello: its `host_name` (lowercased), or
    /// `None` when it carries no server_name extension or no `host_name`
    /// entry in it.
    Complete(Option<String>),
    /// Everything so far is a valid prefix; more bytes are needed.
    Incomplete,
}

/// Why no server name could be read.
#[derive(Debug, thiserror::Error)]
pub enum SniError {
    /// The first bytes are not a TLS handshake record (for example a
    /// plain-text HTTP request, or an SSLv2-style hello).
    #[error("not a tls handshake record")]
    NotTls,
    /// A TLS handshake, but its first message is not a ClientHello.
    #[error("first handshake message is not a clienthello")]
    NotClientHello,
    /// A policy limit was exceeded; the text names which one.
    #[error("clienthello exceeds the {0} limit")]
    TooLarge(&'static str),
    /// The bytes break the TLS grammar; the text names the field.
    #[error("malformed clienthello: {0}")]
    Malformed(&'static str),
    /// The server_name host_name is not a valid DNS name.
    #[error("server name is not a valid dns name: {0}")]
    BadName(&'static str),
    /// No complete ClientHello arrived within the timeout.
    #[error("no complete clienthello within the timeout")]
    Timeout,
    /// Reading the socket failed.
    #[error("reading the clienthello failed")]
    Io(#[source] io::Error),
    /// The client closed the connection before a complete ClientHello.
    #[error("client closed the connection before a complete clienthello")]
    Closed,
}

/// Looks at the bytes a client sent first.
///
/// Returns `Peek::Incomplete` while `buf` is a valid prefix of a ClientHello
/// (any prefix of a valid one is never an error), and an error as soon as the
/// bytes prove otherwise: a first byte other than 0x16 is `NotTls`, a length
/// field that overruns its enclosing structure is `Malformed`, a declared
/// size over policy is `TooLarge`, without waiting for the rest.
///
/// Bytes after the end of the ClientHello (in its last record or in later
/// records, such as early data) are not looked at. A server_name entry of an
/// unknown name type is skipped (RFC 6066 gives every type a 16-bit length
/// prefix); if no `host_name` entry remains the result is `Complete(None)`.
/// A server_name extension that appears twice, or two `host_name` entries in
/// one list, are `Malformed` (RFC 8446 §4.2, RFC 6066 §3): a router and a
/// backend must not be able to disagree about which name was meant.
pub fn parse_client_hello(buf: &[u8]) -> Result<Peek, SniError> {
    match parse(buf) {
        Ok(name) => Ok(Peek::Complete(name)),
        Err(Stop::Incomplete) => Ok(Peek::Incomplete),
        Err(Stop::Fail(e)) => Err(e),
    }
}

/// Peeks (does not consume) the ClientHello on `stream` and returns its
/// server name, so the untouched bytes can then be forwarded to a backend.
///
/// At most `max` bytes are peeked (the buffer is allocated once);
/// [`DEFAULT_PEEK_MAX`] fits every ClientHello within policy. A hello that
/// does not fit is `TooLarge`. The whole call is bounded by `timeout`
/// (tokio time); a client that stalls mid-hello gets `Timeout`.
///
/// A client that closes before completing the hello gets `Closed` when the
/// platform reports the half-close (epoll does); otherwise it gets
/// `Timeout`. Between peeks that see no new bytes the task sleeps 1 ms,
/// doubling up to 16 ms, since readiness stays set while unread bytes wait
/// and a plain `readable().await` would spin.
pub async fn peek_sni(
    stream: &TcpStream,
    timeout: Duration,
    max: usize,
) -> Result<Option<String>, SniError> {
    let decide = |buf: &[u8]| {
        parse_client_hello(buf).map(|peek| match peek {
            Peek::Complete(name) => Look::Done(name),
            Peek::Incomplete => Look::More,
        })
    };
    peek_until(stream, timeout, max, decide)
        .await
        .map_err(|e| match e {
            PeekError::Rejected(e) => e,
            PeekError::Timeout => SniError::Timeout,
            PeekError::Closed => SniError::Closed,
            PeekError::TooLarge => SniError::TooLarge("peek buffer"),
            PeekError::Io(e) => SniError::Io(e),
        })
}

/// Why parsing stopped: more bytes are needed, or the input is bad.
enum Stop {
    Incomplete,
    Fail(SniError),
}

impl From<SniError> for Stop {
    fn from(e: SniError) -> Self {
        Stop::Fail(e)
    }
}

fn malformed(what: &'static str) -> Stop {
    Stop::Fail(SniError::Malformed(what))
}

/// Reassembles the handshake bytes from the records in `buf`, checks the
/// handshake header, then parses the ClientHello body.
fn parse(buf: &[u8]) -> Result<Option<String>, Stop> {
    let (hs, total) = reassemble(buf)?;
    // `hs` may hold fewer bytes than `total`; the reader reports Incomplete
    // only when a field that fits in `total` is not there yet.
    let body = hs.get(HANDSHAKE_HEADER_LEN..).unwrap_or(&[]);
    let body_len = total - HANDSHAKE_HEADER_LEN;
    let name = parse_body(&mut Reader::new(body, body_len))?;
    // The parse skips extension bodies it does not need without looking at
    // them; "complete" still means every byte of the message is here.
    if body.len() < body_len {
        return Err(Stop::Incomplete);
    }
    Ok(name)
}

/// Concatenates the handshake fragments of the records in `buf`, up to the
/// end of the first handshake message. Returns the bytes available and the
/// message's declared total length (header included).
fn reassemble(buf: &[u8]) -> Result<(Cow<'_, [u8]>, usize), Stop> {
    let mut hs: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut total: Option<usize> = None;
    let mut pos = 0usize;
    let mut records = 0usize;
    loop {
        if let Some(t) = total {
            if hs.len() >= t {
                return Ok((hs, t));
            }
        }
        if records > 0 && pos == buf.len() {
            break;
        }
        if records == MAX_RECORDS {
            return Err(SniError::TooLarge("record count").into());
        }
        let rest = &buf[pos..];
        let len = match record_header(rest, records == 0) {
            Ok(len) => len,
            Err(Stop::Incomplete) => break,
            Err(e) => return Err(e),
        };
        let frag = &rest[RECORD_HEADER_LEN..rest.len().min(RECORD_HEADER_LEN + len)];
        if hs.is_empty() {
            hs = Cow::Borrowed(frag);
        } else {
            hs.to_mut().extend_from_slice(frag);
        }
        if total.is_none() {
            total = handshake_header(&hs)?;
        }
        if frag.len() < len {
            break;
        }
        pos += RECORD_HEADER_LEN + len;
        records += 1;
    }
    // Out of bytes mid-message: hand over what there is, so the body parse
    // can still fail early on what has arrived.
    match total {
        Some(t) => Ok((hs, t)),
        None => Err(Stop::Incomplete),
    }
}

/// Checks a record header (as much of it as `rest` holds) and returns the
/// record's payload length. Content type and version errors on the first
/// record mean "not TLS at all"; on later ones, a broken TLS stream.
fn record_header(rest: &[u8], first: bool) -> Result<usize, Stop> {
    let bad = |what| {
        if first {
            Stop::Fail(SniError::NotTls)
        } else {
            malformed(what)
        }
    };
    if let Some(&ct) = rest.first() {
        // RFC 8446 §5.1: handshake messages must not be interleaved with
        // other record types, so every fragment is a handshake record.
        if ct != CONTENT_TYPE_HANDSHAKE {
            return Err(bad("record interleaved with a non-handshake record"));
        }
    }
    if let Some(&major) = rest.get(1) {
        if major != 3 {
            return Err(bad("record version"));
        }
    }
    if let Some(&minor) = rest.get(2) {
        if minor > 4 {
            return Err(bad("record version"));
        }
    }
    let Some(&[hi, lo]) = rest.get(3..RECORD_HEADER_LEN) else {
        return Err(Stop::Incomplete);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len == 0 {
        // RFC 8446 §5.1: no zero-length handshake fragments.
        return Err(malformed("empty handshake record"));
    }
    if len > MAX_RECORD_LEN {
        return Err(SniError::TooLarge("record length").into());
    }
    Ok(len)
}

/// Checks the handshake header in `hs`; returns the message's total length
/// once all four header bytes are there.
fn handshake_header(hs: &[u8]) -> Result<Option<usize>, Stop> {
    if let Some(&ty) = hs.first() {
        if ty != HANDSHAKE_CLIENT_HELLO {
            return Err(SniError::NotClientHello.into());
        }
    }
    let Some(&[a, b, c]) = hs.get(1..HANDSHAKE_HEADER_LEN) else {
        return Ok(None);
    };
    let total =
        HANDSHAKE_HEADER_LEN + ((usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c));
    if total > MAX_CLIENT_HELLO {
        return Err(SniError::TooLarge("clienthello size").into());
    }
    Ok(Some(total))
}

/// Parses a ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
fn parse_body(r: &mut Reader<'_>) -> Result<Option<String>, Stop> {
    let [major, _minor] = r.array::<2>("legacy_version")?;
    if major != 3 {
        return Err(malformed("legacy_version"));
    }
    r.take(32, "random")?;
    let sid_len = r.u8("session id length")?;
    if sid_len > 32 {
        return Err(malformed("session id longer than 32 bytes"));
    }
    r.take(usize::from(sid_len), "session id")?;
    let cs_len = r.u16("cipher suites length")?;
    if cs_len < 2 || cs_len % 2 != 0 {
        return Err(malformed("cipher suites length"));
    }
    r.take(usize::from(cs_len), "cipher suites")?;
    let comp_len = r.u8("compression methods length")?;
    if comp_len < 1 {
        return Err(malformed("no compression methods"));
    }
    r.take(usize::from(comp_len), "compression methods")?;
    if r.is_at_end() {
        // RFC 5246 §7.4.1.2: a ClientHello may end without extensions.
        return Ok(None);
    }
    let ext_len = r.u16("extensions length")?;
    let mut exts = r.sub(usize::from(ext_len), "extensions")?;
    if !r.is_at_end() {
        return Err(malformed("bytes after the extensions"));
    }
    let mut name = None;
    let mut seen_sni = false;
    while !exts.is_at_end() {
        let ty = exts.u16("extension type")?;
        let len = exts.u16("extension length")?;
        let mut data = exts.sub(usize::from(len), "extension data")?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if seen_sni {
            return Err(malformed("duplicate server_name extension"));
        }
        seen_sni = true;
        name = parse_server_name(&mut data)?;
    }
    Ok(name)
}

/// Parses a server_name extension body (RFC 6066 §3) and returns its
/// validated host_name, if any.
fn parse_server_name(r: &mut Reader<'_>) -> Result<Option<String>, Stop> {
    let list_len = r.u16("server name list length")?;
    let mut list = r.sub(usize::from(list_len), "server name list")?;
    if !r.is_at_end() {
        return Err(malformed("bytes after the server name list"));
    }
    if list.is_at_end() {
        return Err(malformed("empty server name list"));
    }
    let mut host = None;
    while !list.is_at_end() {
        let ty = list.u8("server name type")?;
        let len = list.u16("server name length")?;
        let name = list.take(usize::from(len), "server name")?;
        if ty != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(malformed("duplicate host_name entry"));
        }
        host = Some(validate_dns_name(name)?);
    }
    Ok(host)
}

/// Validates a host_name as an ASCII DNS name (letters, digits, hyphens,
/// dots; no empty labels, so no trailing dot, which RFC 6066 forbids;
/// labels up to 63 and names up to 253 bytes) and lowercases it.
fn validate_dns_name(name: &[u8]) -> Result<String, SniError> {
    if name.is_empty() {
        return Err(SniError::BadName("empty name"));
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err(SniError::BadName("longer than 253 bytes"));
    }
    for label in name.split(|&b| b == b'.') {
        if label.is_empty() {
            return Err(SniError::BadName("empty label"));
        }
        if label.len() > MAX_DNS_LABEL_LEN {
            return Err(SniError::BadName("label longer than 63 bytes"));
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(SniError::BadName(
                "character outside letters, digits, hyphen",
            ));
        }
    }
    // Every byte was checked to be ASCII above.
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// A cursor over the bytes of a structure that may not have arrived yet.
///
/// `buf` holds the bytes available; `end` is where the enclosing structure
/// ends by its declared length, possibly past `buf`. Reading past `end` is
/// malformation; reading past `buf` (but within `end`) is `Incomplete`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], end: usize) -> Self {
        let buf = &buf[..buf.len().min(end)];
        Reader { buf, pos: 0, end }
    }

    fn is_at_end(&self) -> bool {
        self.pos == self.end
    }

    /// Claims the next `n` bytes of the structure, without needing them yet.
    fn skip(&mut self, n: usize, what: &'static str) -> Result<usize, Stop> {
        let start = self.pos;
        let stop = start
            .checked_add(n)
            .filter(|&s| s <= self.end)
            .ok_or_else(|| malformed(what))?;
        self.pos = stop;
        Ok(start)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Stop> {
        let start = self.skip(n, what)?;
        self.buf.get(start..self.pos).ok_or(Stop::Incomplete)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Stop> {
        <[u8; N]>::try_from(self.take(N, what)?).map_err(|_| Stop::Incomplete)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Stop> {
        let [b] = self.array::<1>(what)?;
        Ok(b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Stop> {
        Ok(u16::from_be_bytes(self.array::<2>(what)?))
    }

    /// A reader over the next `n` bytes, which this one then skips.
    fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, Stop> {
        let start = self.skip(n, what)?;
        Ok(Reader {
            buf: self.buf,
            pos: start,
            end: self.pos,
        })
    }
}

#[cfg(test)]
mod tests;
