//! Request heads: httparse does the tokenising, this file applies our
//! framing and smuggling rules (SPEC section 3, "Limits and bad input") and
//! builds the `http` types without copying header values out of the read
//! buffer.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};

use super::H1Settings;

/// Header slots kept on the stack; a larger `max_headers` uses the heap.
const STACK_HEADERS: usize = 128;

/// A request refused before the handler sees it, answered by a generated
/// response and a closed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: StatusCode,
    /// The `sluice-error` value.
    pub reason: &'static str,
    /// What exactly was wrong; goes in the body and the debug log.
    pub detail: &'static str,
}

impl Reject {
    pub(crate) const fn bad_request(detail: &'static str) -> Self {
        Reject {
            status: StatusCode::BAD_REQUEST,
            reason: "bad-request",
            detail,
        }
    }
    pub(crate) const fn timeout() -> Self {
        Reject {
            status: StatusCode::REQUEST_TIMEOUT,
            reason: "request-timeout",
            detail: "request head not received in time",
        }
    }
    const fn headers_too_large(detail: &'static str) -> Self {
        Reject {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason: "headers-too-large",
            detail,
        }
    }
    const fn uri_too_long() -> Self {
        Reject {
            status: StatusCode::URI_TOO_LONG,
            reason: "uri-too-long",
            detail: "request line too long",
        }
    }
    const fn version() -> Self {
        Reject {
            status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            reason: "version-not-supported",
            detail: "only HTTP/1.0 and HTTP/1.1 are served here",
        }
    }
    const fn connect() -> Self {
        Reject {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "method-not-allowed",
            detail: "CONNECT is not supported",
        }
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

/// A parsed and validated request head.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The client allows the connection to be reused after this request.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent (and removed from `headers`).
    pub expect_continue: bool,
    /// The `Upgrade` value when the request asks for one (Connection: upgrade).
    pub upgrade: Option<HeaderValue>,
}

/// Where one header's name and value sit in the head.
#[derive(Clone, Copy, Default)]
struct Span {
    name: (usize, usize),
    value: (usize, usize),
    skip: bool,
}

/// Looks for the end of the head in `buf[*scanned..]` and, once there, parses
/// and validates it, splitting it off `buf`. `Ok(None)`: not complete yet.
/// `scanned` lets repeated calls skip bytes already searched, so a client
/// trickling bytes does not make us re-parse the head each time.
pub fn parse_head(
    buf: &mut BytesMut,
    scanned: &mut usize,
    settings: &H1Settings,
) -> Result<Option<Head>, Reject> {
    let from = scanned.saturating_sub(3);
    let ended = has_head_end(&buf[from..]);
    *scanned = buf.len();
    if !ended && buf.len() <= settings.max_head_bytes {
        return Ok(None);
    }
    let max_headers = settings.max_headers;
    if max_headers <= STACK_HEADERS {
        let mut spans = [Span::default(); STACK_HEADERS];
        let scanned = {
            let mut headers =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
            scan(&buf[..], settings, &mut headers[..max_headers], &mut spans)?
        };
        scanned.map(|s| build(buf, s, &spans)).transpose()
    } else {
        let mut spans = vec![Span::default(); max_headers];
        let scanned = {
            let mut headers = vec![MaybeUninit::<httparse::Header<'_>>::uninit(); max_headers];
            scan(&buf[..], settings, &mut headers, &mut spans)?
        };
        scanned.map(|s| build(buf, s, &spans)).transpose()
    }
}

fn has_head_end(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', bytes)
        .any(|i| matches!(&bytes[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// What the header loop learns about framing and connection handling.
#[derive(Default)]
struct Facts {
    content_length: Option<u64>,
    transfer_encoding: usize,
    hosts: usize,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    upgrade: Option<usize>,
    expect_continue: bool,
}

/// The result of [`scan`]: offsets into the buffer, no borrows.
struct Scanned {
    len: usize,
    method: Method,
    version: Version,
    path: (usize, usize),
    count: usize,
    facts: Facts,
}

/// Parses and validates the head in `buf`, recording where each header sits.
fn scan<'b>(
    buf: &'b [u8],
    settings: &H1Settings,
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
    spans: &mut [Span],
) -> Result<Option<Scanned>, Reject> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return partial_limits(buf, settings),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::headers_too_large("too many header fields"))
        }
        Err(httparse::Error::Version) => return Err(version_error(buf)),
        Err(_) => return Err(Reject::bad_request("malformed request head")),
    };
    if len > settings.max_head_bytes {
        return Err(size_error(buf, settings));
    }
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };

    let method = req.method.ok_or(Reject::bad_request("missing method"))?;
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| Reject::bad_request("invalid method"))?;
    if method == Method::CONNECT {
        return Err(Reject::connect());
    }
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(Reject::version()),
    };
    let path = offset(
        req.path
            .ok_or(Reject::bad_request("missing target"))?
            .as_bytes(),
    );

    let mut facts = Facts::default();
    let count = req.headers.len();
    for (i, h) in req.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let value = trim_ows(h.value);
        let span = &mut spans[i];
        *span = Span {
            name: offset(name),
            value: offset(h.value),
            skip: false,
        };
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value)?;
            match facts.content_length {
                Some(m) if m != n => {
                    return Err(Reject::bad_request("conflicting content-length values"))
                }
                Some(_) => span.skip = true,
                None => facts.content_length = Some(n),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            facts.transfer_encoding += 1;
            if facts.transfer_encoding > 1 {
                return Err(Reject::bad_request("several transfer-encoding fields"));
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Err(Reject::bad_request("transfer-encoding other than chunked"));
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            facts.hosts += 1;
            if facts.hosts > 1 {
                return Err(Reject::bad_request("several host fields"));
            }
            if !is_valid_host(value) {
                return Err(Reject::bad_request("invalid host"));
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim_ows) {
                if token.eq_ignore_ascii_case(b"close") {
                    facts.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    facts.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    facts.upgrade_token = true;
                } else if token.eq_ignore_ascii_case(b"content-length")
                    || token.eq_ignore_ascii_case(b"transfer-encoding")
                    || token.eq_ignore_ascii_case(b"host")
                {
                    return Err(Reject::bad_request("connection names an end-to-end field"));
                }
            }
        } else if name.eq_ignore_ascii_case(b"expect")
            && value.eq_ignore_ascii_case(b"100-continue")
        {
            facts.expect_continue = true;
            span.skip = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            facts.upgrade = Some(i);
        }
    }
    if facts.transfer_encoding > 0 && facts.content_length.is_some() {
        return Err(Reject::bad_request(
            "both content-length and transfer-encoding",
        ));
    }
    if facts.transfer_encoding > 0 && version == Version::HTTP_10 {
        return Err(Reject::bad_request(
            "transfer-encoding in an HTTP/1.0 request",
        ));
    }
    if facts.hosts == 0 && version == Version::HTTP_11 {
        return Err(Reject::bad_request("missing host"));
    }
    Ok(Some(Scanned {
        len,
        method,
        version,
        path,
        count,
        facts,
    }))
}

/// Splits the validated head off the read buffer and builds the `http`
/// types; header values and the target are slices of the head, not copies.
fn build(buf: &mut BytesMut, s: Scanned, spans: &[Span]) -> Result<Head, Reject> {
    let head: Bytes = buf.split_to(s.len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(s.path.0..s.path.1))
        .map_err(|_| Reject::bad_request("invalid request target"))?;
    check_target_form(&s.method, &uri)?;

    let mut map = HeaderMap::with_capacity(s.count);
    let mut upgrade = None;
    for (i, span) in spans[..s.count].iter().enumerate() {
        if span.skip {
            continue;
        }
        let name = HeaderName::from_bytes(&head[span.name.0..span.name.1])
            .map_err(|_| Reject::bad_request("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(span.value.0..span.value.1))
            .map_err(|_| Reject::bad_request("invalid header value"))?;
        if s.facts.upgrade == Some(i) && s.facts.upgrade_token {
            upgrade = Some(value.clone());
        }
        map.append(name, value);
    }

    let framing = if s.facts.transfer_encoding > 0 {
        Framing::Chunked
    } else {
        match s.facts.content_length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    let keep_alive = match s.version {
        Version::HTTP_11 => !s.facts.close,
        _ => s.facts.keep_alive && !s.facts.close,
    };
    Ok(Head {
        method: s.method,
        uri,
        version: s.version,
        headers: map,
        framing,
        keep_alive,
        expect_continue: s.facts.expect_continue,
        upgrade,
    })
}

/// The head is not complete: fine while within the size limit.
fn partial_limits<T>(buf: &[u8], settings: &H1Settings) -> Result<Option<T>, Reject> {
    if buf.len() > settings.max_head_bytes {
        Err(size_error(buf, settings))
    } else {
        Ok(None)
    }
}

/// 414 when the request line alone is over the limit, else 431.
fn size_error(buf: &[u8], settings: &H1Settings) -> Reject {
    let limit = settings.max_head_bytes.min(buf.len());
    // Leading empty lines are allowed before the request line (RFC 9112 section 2.2).
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(limit);
    let line_end = buf[start..]
        .iter()
        .position(|&b| b == b'\n')
        .map(|p| start + p);
    match line_end {
        Some(end) if end <= settings.max_head_bytes => {
            Reject::headers_too_large("request head too large")
        }
        _ => Reject::uri_too_long(),
    }
}

/// httparse refused the version: 505 for a well-formed `HTTP/x.y` other
/// than 1.0 and 1.1, 400 for anything else.
fn version_error(buf: &[u8]) -> Reject {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let line = &buf[start..];
    let line = &line[..line
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(line.len())];
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Reject::version()
        }
        [b'H', b'T', b'T', b'P', b'/', major] if major.is_ascii_digit() => Reject::version(),
        _ => Reject::bad_request("malformed request line"),
    }
}

/// Origin-form, absolute-form, or `*` for OPTIONS (RFC 9112 section 3.2);
/// authority-form is CONNECT's, which is refused earlier.
fn check_target_form(method: &Method, uri: &Uri) -> Result<(), Reject> {
    if uri.scheme().is_some() {
        if uri.host().is_none() {
            return Err(Reject::bad_request("absolute target without a host"));
        }
        return Ok(());
    }
    if uri.authority().is_some() {
        return Err(Reject::bad_request("authority-form target"));
    }
    match uri.path() {
        "*" if *method == Method::OPTIONS && uri.query().is_none() => Ok(()),
        p if p.starts_with('/') => Ok(()),
        _ => Err(Reject::bad_request("invalid request target")),
    }
}

/// 1*DIGIT, nothing else (no sign, no list, no whitespace inside).
fn parse_content_length(value: &[u8]) -> Result<u64, Reject> {
    if value.is_empty() {
        return Err(Reject::bad_request("empty content-length"));
    }
    if !value.iter().all(u8::is_ascii_digit) {
        return Err(Reject::bad_request(
            "content-length is not a decimal number",
        ));
    }
    decimal(value).ok_or(Reject::bad_request("content-length overflows"))
}

/// A Content-Length value: 1*DIGIT that fits a `u64`, else `None` (the
/// HTTP/2 codec reads its `content-length` fields with it too).
pub(crate) fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// `uri-host [ ":" port ]` or empty (RFC 9112 section 3.2), checked in
/// place: a registered name or IPv4 address of unreserved and sub-delim
/// characters, or a bracketed IP literal, then an optional decimal port.
/// Stricter than RFC 3986 where a proxy has no use for the latitude: no
/// percent-encoding outside brackets and no empty host before a port.
fn is_valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    let (host, port) = match value.strip_prefix(b"[") {
        Some(rest) => {
            let Some(close) = rest.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = &rest[..close];
            if literal.is_empty() || !literal.iter().all(|&b| is_literal_char(b)) {
                return false;
            }
            match &rest[close + 1..] {
                [] => return true,
                [b':', port @ ..] => (None, port),
                _ => return false,
            }
        }
        None => match value.iter().position(|&b| b == b':') {
            Some(colon) => (Some(&value[..colon]), &value[colon + 1..]),
            None => (Some(value), &[][..]),
        },
    };
    if let Some(host) = host {
        if host.is_empty() || !host.iter().all(|&b| is_reg_name_char(b)) {
            return false;
        }
    }
    port.iter().all(u8::is_ascii_digit)
}

/// RFC 3986 `unreserved` and `sub-delims`.
fn is_reg_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
}

/// Inside `[` `]`: an IPv6 address (with an RFC 6874 zone) or IPvFuture.
fn is_literal_char(b: u8) -> bool {
    is_reg_name_char(b) || b == b':' || b == b'%'
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::{is_valid_host, parse_head};
    use crate::proxy::h1::H1Settings;

    /// Feeds `head` one byte at a time, as a slow client would send it; the
    /// head must be found complete at its last byte and not before, even
    /// when its blank line is split across reads.
    fn parsed_at(head: &[u8], extra: &[u8]) -> Option<usize> {
        let settings = H1Settings::default();
        let mut buf = BytesMut::new();
        let mut scanned = 0;
        for (i, &b) in head.iter().chain(extra).enumerate() {
            buf.extend_from_slice(&[b]);
            match parse_head(&mut buf, &mut scanned, &settings) {
                Ok(Some(parsed)) => {
                    assert_eq!(
                        parsed.headers.get("host").map(|v| v.as_bytes()),
                        Some(&b"a"[..])
                    );
                    assert_eq!(&buf[..], &extra[..i + 1 - head.len()]);
                    return Some(i + 1);
                }
                Ok(None) => {}
                Err(_) => panic!("{head:?} refused at byte {i}"),
            }
        }
        None
    }

    #[test]
    fn head_end_is_found_across_reads() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-Long: 0123456789012345678901234567890123456789\r\n\r\n",
        ] {
            assert_eq!(parsed_at(head, b""), Some(head.len()), "{head:?}");
            assert_eq!(parsed_at(head, b"GET"), Some(head.len()), "{head:?} + next");
        }
        assert_eq!(parsed_at(b"GET / HTTP/1.1\r\nHost: a\r\n\r", b""), None);
        assert_eq!(parsed_at(b"GET / HTTP/1.1\r\nHost: a\r\n", b""), None);
    }

    #[test]
    fn hosts_are_checked_in_place() {
        for ok in [
            "",
            "a",
            "example.com",
            "example.com:8080",
            "example.com:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "[fe80::1%25eth0]:80",
            "xn--bcher-kva.example",
            "a_b~c!$&'()*+,;=",
        ] {
            assert!(is_valid_host(ok.as_bytes()), "{ok:?} refused");
        }
        for bad in [
            "a b",
            "a/b",
            "a?b",
            "a#b",
            "user@example.com",
            "example.com:80:80",
            "example.com:8x",
            ":80",
            "[::1",
            "::1]",
            "[]",
            "[::1]x",
            "[::1]:8x",
            "[[::1]]",
            "a%20b",
            "a\"b",
            "a<b>",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad:?} accepted");
        }
    }
}
