//! The pure parts of the HTTP/1.1 client: a request head out, a response
//! head in, and the framing each implies (RFC 9112 sections 6 and 9).

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::proxy::forwarded::Forwarded;
use crate::proxy::h1::chunked::trim_ows;
use crate::proxy::h1::EncodedFields;
use crate::proxy::http::HOP_BY_HOP;
use http::request::Parts;
use http::response;
use http::{Method, Response, StatusCode, Version};

/// Most header fields accepted in a response head.
pub const MAX_RESPONSE_HEADERS: usize = 128;
/// Largest response head accepted.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
}

/// Writes the request line and header fields of `parts` into `buf` and
/// returns the body's framing. `end_stream` and `exact` describe the body
/// (already ended; its exact length when known). The client's framing
/// fields are replaced by ours, and its X-Forwarded-* fields by
/// `forwarded`'s; a missing Host is filled in with `authority`.
pub fn encode_request(
    buf: &mut BytesMut,
    parts: &Parts,
    forwarded: Option<&Forwarded>,
    authority: &str,
    end_stream: bool,
    exact: Option<u64>,
) -> RequestFraming {
    buf.put_slice(parts.method.as_str().as_bytes());
    buf.put_u8(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    buf.put_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    buf.put_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(header::HOST) {
        put_field(buf, b"host", authority.as_bytes());
    }
    let mut declared = false;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            declared = true;
            continue;
        }
        if name == header::TRANSFER_ENCODING || forwarded.is_some_and(|f| f.replaces(name)) {
            continue;
        }
        put_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in forwarded.into_iter().flat_map(|f| f.fields(&parts.headers)) {
        put_field(buf, name.as_bytes(), value);
    }
    let framing = if end_stream {
        // A body-carrying method says "empty" explicitly, as it would have.
        if declared || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            put_field(buf, b"content-length", b"0");
        }
        RequestFraming::Empty
    } else if let Some(n) = exact {
        put_field(
            buf,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        );
        RequestFraming::Length(n)
    } else {
        put_field(buf, b"transfer-encoding", b"chunked");
        RequestFraming::Chunked
    };
    buf.put_slice(b"\r\n");
    framing
}

fn put_field(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.put_slice(name);
    buf.put_slice(b": ");
    buf.put_slice(value);
    buf.put_slice(b"\r\n");
}

pub(crate) use crate::proxy::h1::chunked::put_chunk_size;

/// Writes the last chunk and `trailers`.
pub fn put_trailers(buf: &mut BytesMut, trailers: &HeaderMap) {
    buf.put_slice(b"0\r\n");
    for (name, value) in trailers {
        put_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    buf.put_slice(b"\r\n");
}

/// Why a response head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid response head: {0}")]
pub struct HeadError(pub &'static str);

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub parts: response::Parts,
    /// Bytes of the buffer the head took.
    pub len: usize,
    pub framing: ResponseFraming,
    /// The connection can carry another request after this response.
    pub keep_alive: bool,
    /// The fields in wire form, when asked for; `parts.headers` is then
    /// empty.
    pub encoded: Option<EncodedFields>,
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

/// What the framing and connection fields of a head say.
#[derive(Default)]
struct Facts {
    close: bool,
    keep_alive: bool,
    /// `Connection` names a field other than `close` and `keep-alive`.
    names_fields: bool,
    transfer_encoding: bool,
    chunked_last: bool,
    has_length: bool,
    length: Option<u64>,
    length_error: Option<&'static str>,
}

impl Facts {
    fn scan(fields: &[httparse::Header<'_>]) -> Self {
        let mut facts = Facts::default();
        for field in fields {
            let name = field.name.as_bytes();
            if name.eq_ignore_ascii_case(b"connection") {
                for token in tokens(field.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        facts.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        facts.keep_alive = true;
                    } else {
                        facts.names_fields = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                facts.transfer_encoding = true;
                if let Some(last) = tokens(field.value).last() {
                    facts.chunked_last = last.eq_ignore_ascii_case(b"chunked");
                }
            } else if name.eq_ignore_ascii_case(b"content-length") {
                facts.has_length = true;
                for part in field.value.split(|&b| b == b',').map(trim_ows) {
                    if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
                        facts.length_error = Some("invalid content-length");
                        continue;
                    }
                    let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                    if facts.length.is_some_and(|l| l != n) {
                        facts.length_error = Some("conflicting content-length");
                    }
                    facts.length = Some(n);
                }
            }
        }
        facts
    }

    /// The framing of a response with `status` to a request with `method`
    /// (RFC 9112 section 6.3), and whether the connection stays usable.
    fn framing(
        &self,
        method: &Method,
        status: StatusCode,
        version: Version,
    ) -> Result<(ResponseFraming, bool), HeadError> {
        let keep_alive = match version {
            Version::HTTP_10 => self.keep_alive,
            _ => !self.close,
        };
        if *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((ResponseFraming::Empty, keep_alive));
        }
        if self.transfer_encoding {
            // Transfer-Encoding wins over Content-Length; a message with
            // both is suspect, so its connection is not reused.
            return Ok(if self.chunked_last {
                (ResponseFraming::Chunked, keep_alive && !self.has_length)
            } else {
                (ResponseFraming::Close, false)
            });
        }
        if let Some(e) = self.length_error {
            return Err(HeadError(e));
        }
        Ok(match self.length {
            Some(n) => (ResponseFraming::Length(n), keep_alive),
            None => (ResponseFraming::Close, false),
        })
    }
}

/// The non-empty, trimmed tokens of a comma-separated field value.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Fields that belong to one connection or to the framing; relayed fields
/// leave them out (the length travels beside them).
fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
        || name.eq_ignore_ascii_case(b"content-length")
}

/// Where `field`'s line sits in `buf` when it is exactly what
/// [`put_field`] would write for it: `name: value` and CRLF.
fn canonical_line(buf: &[u8], field: &httparse::Header<'_>) -> Option<Range<usize>> {
    let base = buf.as_ptr() as usize;
    let start = (field.name.as_ptr() as usize).checked_sub(base)?;
    let value_start = start + field.name.len() + 2;
    let end = value_start + field.value.len() + 2;
    let line = buf.get(start..end)?;
    let canonical = field.value.as_ptr() as usize == base + value_start
        && line[field.name.len()..].starts_with(b": ")
        && line.ends_with(b"\r\n");
    canonical.then_some(start..end)
}

/// Whether a `Connection` field among `fields` names `name`.
fn named_by_connection(fields: &[httparse::Header<'_>], name: &[u8]) -> bool {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("connection"))
        .flat_map(|f| tokens(f.value))
        .any(|t| t.eq_ignore_ascii_case(name))
}

/// Parses a response head to a request with `method` at the start of
/// `buf`; `Ok(None)` when it is not complete yet. With `encode` (and not a
/// 1xx), the fields come back in wire form for an HTTP/1.1 client, less
/// framing and hop-by-hop fields; otherwise as a `HeaderMap` whose values
/// share one copy of the head's bytes. Either way `buf` is not kept alive
/// by the result.
pub fn parse_response(
    buf: &[u8],
    method: &Method,
    encode: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    // Left uninitialised: httparse fills what it parses, and zeroing 4 KiB
    // of fields per response would cost more than the parse.
    let mut fields =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(HeadError("head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError("too many header fields")),
        Err(_) => return Err(HeadError("malformed head")),
    };
    if len > MAX_RESPONSE_HEAD {
        return Err(HeadError("head too large"));
    }
    let status = res
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(HeadError("invalid status code"))?;
    let version = match res.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let fields = &*res.headers;
    let facts = Facts::scan(fields);
    let (framing, keep_alive) = facts.framing(method, status, version)?;
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    let encoded = if encode && !status.is_informational() {
        let mut lines = BytesMut::with_capacity(len);
        // Consecutive kept lines already in the form we would write go
        // out as one copy: a backend's head is mostly such lines.
        let mut run = 0..0;
        for field in fields {
            let name = field.name.as_bytes();
            if is_hop_by_hop(name) || (facts.names_fields && named_by_connection(fields, name)) {
                continue;
            }
            match canonical_line(buf, field) {
                Some(line) if !run.is_empty() && line.start == run.end => run.end = line.end,
                Some(line) => {
                    lines.put_slice(&buf[run]);
                    run = line;
                }
                None => {
                    lines.put_slice(&buf[run]);
                    run = 0..0;
                    put_field(&mut lines, name, field.value);
                }
            }
        }
        lines.put_slice(&buf[run]);
        let content_length = match framing {
            ResponseFraming::Length(n) => Some(n),
            ResponseFraming::Empty if facts.length_error.is_none() => facts.length,
            _ => None,
        };
        Some(EncodedFields {
            lines: lines.freeze(),
            content_length,
        })
    } else {
        let head = Bytes::copy_from_slice(&buf[..len]);
        let base = buf.as_ptr() as usize;
        let mut headers = HeaderMap::with_capacity(fields.len());
        for field in fields {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| HeadError("invalid field name"))?;
            let start = field.value.as_ptr() as usize - base;
            let value =
                HeaderValue::from_maybe_shared(head.slice(start..start + field.value.len()))
                    .map_err(|_| HeadError("invalid field value"))?;
            headers.append(name, value);
        }
        parts.headers = headers;
        None
    };
    Ok(Some(ResponseHead {
        parts,
        len,
        framing,
        keep_alive,
        encoded,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    fn encode(req: Request<()>, end: bool, exact: Option<u64>) -> (String, RequestFraming) {
        let mut buf = BytesMut::new();
        let framing = encode_request(&mut buf, &parts(req), None, "10.0.0.1:80", end, exact);
        (String::from_utf8(buf.to_vec()).unwrap(), framing)
    }

    #[test]
    fn a_get_is_written_as_it_came() {
        let req = Request::get("/a/b?c=d")
            .header("host", "example.com")
            .header("x-one", "1")
            .body(())
            .unwrap();
        let (head, framing) = encode(req, true, Some(0));
        assert_eq!(
            head,
            "GET /a/b?c=d HTTP/1.1\r\nhost: example.com\r\nx-one: 1\r\n\r\n"
        );
        assert_eq!(framing, RequestFraming::Empty);
    }

    #[test]
    fn a_missing_host_is_the_backend_address() {
        let (head, _) = encode(Request::get("/").body(()).unwrap(), true, None);
        assert_eq!(head, "GET / HTTP/1.1\r\nhost: 10.0.0.1:80\r\n\r\n");
    }

    #[test]
    fn bodies_get_our_framing_not_the_clients() {
        let req = || {
            Request::post("/")
                .header("host", "a")
                .header("content-length", "999")
                .header("transfer-encoding", "gzip")
                .body(())
                .unwrap()
        };
        let (head, framing) = encode(req(), false, Some(5));
        assert_eq!(
            head,
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(framing, RequestFraming::Length(5));
        let (head, framing) = encode(req(), false, None);
        assert_eq!(
            head,
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(framing, RequestFraming::Chunked);
        let (head, framing) = encode(req(), true, Some(0));
        assert_eq!(
            head,
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(framing, RequestFraming::Empty);
    }

    #[test]
    fn chunk_sizes_are_hex() {
        let mut buf = BytesMut::new();
        put_chunk_size(&mut buf, 0x1a2f);
        put_chunk_size(&mut buf, 0);
        assert_eq!(&buf[..], b"1a2f\r\n0\r\n");
    }

    fn parse(raw: &[u8], method: Method) -> ResponseHead {
        parse_response(raw, &method, false).unwrap().unwrap()
    }

    #[test]
    fn response_heads_parse_whole_or_not_at_all() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b c\r\n\r\nabc";
        assert!(parse_response(&raw[..20], &Method::GET, false)
            .unwrap()
            .is_none());
        let head = parse(raw, Method::GET);
        assert_eq!(head.len, raw.len() - 3);
        assert_eq!(head.parts.status, StatusCode::OK);
        assert_eq!(head.parts.headers["x-a"], "b c");
        assert_eq!(
            (head.framing, head.keep_alive),
            (ResponseFraming::Length(3), true)
        );
        let head = parse(raw, Method::HEAD);
        assert_eq!(
            (head.framing, head.keep_alive),
            (ResponseFraming::Empty, true)
        );
    }

    #[test]
    fn encoded_fields_leave_out_framing_and_hop_by_hop_fields() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive, X-Hop\r\n\
            x-hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nx-b:  y \r\n\r\nok";
        let head = parse_response(raw, &Method::GET, true).unwrap().unwrap();
        assert!(head.parts.headers.is_empty());
        let fields = head.encoded.expect("encoded");
        assert_eq!(&fields.lines[..], b"Server: x\r\nx-b: y\r\n");
        assert_eq!(fields.content_length, Some(2));
        let head = parse_response(raw, &Method::HEAD, true).unwrap().unwrap();
        assert_eq!(head.encoded.expect("encoded").content_length, Some(2));
        let head = parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: ws\r\n\r\n",
            &Method::GET,
            true,
        )
        .unwrap()
        .unwrap();
        assert!(head.encoded.is_none(), "an upgrade keeps its HeaderMap");
        assert_eq!(head.parts.headers["upgrade"], "ws");
    }

    #[test]
    fn lines_in_our_form_are_copied_whole_and_the_rest_rewritten() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: x\r\nDate: d\r\nKeep-Alive: 5\r\n\
            ETag: e\r\nx-ows:\tv \r\nx-bare: b\nContent-Length: 0\r\nx-last: z\r\n\r\n";
        let head = parse_response(raw, &Method::GET, true).unwrap().unwrap();
        assert_eq!(
            &head.encoded.expect("encoded").lines[..],
            b"Server: x\r\nDate: d\r\nETag: e\r\nx-ows: v\r\nx-bare: b\r\nx-last: z\r\n"
        );
    }

    proptest::proptest! {
        /// Relaying lines whole writes exactly what writing each kept
        /// field on its own would, whatever the spacing and line ends.
        #[test]
        fn relayed_lines_are_what_field_by_field_writing_gives(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["Server", "x-a", "ETag", "keep-alive", "TE", "upgrade", "Vary"]),
                    proptest::sample::select(vec!["", " ", "  ", "\t"]),
                    "[!-~]{0,3}( [!-~]{1,3})?",
                    proptest::sample::select(vec!["", " ", "\t "]),
                    proptest::sample::select(vec!["\r\n", "\n"]),
                ),
                0..10,
            )
        ) {
            let mut raw = String::from("HTTP/1.1 200 OK\r\n");
            for (name, before, value, after, end) in &fields {
                raw.push_str(&format!("{name}:{before}{value}{after}{end}"));
            }
            raw.push_str("content-length: 0\r\n\r\n");
            let head = parse_response(raw.as_bytes(), &Method::GET, true).unwrap().unwrap();

            let mut parsed = [httparse::EMPTY_HEADER; 16];
            let mut res = httparse::Response::new(&mut parsed);
            res.parse(raw.as_bytes()).unwrap();
            let mut want = BytesMut::new();
            for field in res.headers.iter() {
                if !is_hop_by_hop(field.name.as_bytes()) {
                    put_field(&mut want, field.name.as_bytes(), field.value);
                }
            }
            proptest::prop_assert_eq!(&head.encoded.expect("encoded").lines[..], &want[..]);
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |raw: &[u8]| {
            parse_response(raw, &Method::GET, false).map(|h| {
                let h = h.unwrap();
                (h.framing, h.keep_alive)
            })
        };
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Ok((ResponseFraming::Chunked, true))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"),
            Ok((ResponseFraming::Chunked, false))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            Ok((ResponseFraming::Close, false))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\n\r\n"),
            Ok((ResponseFraming::Close, false))
        );
        assert_eq!(
            framing(b"HTTP/1.1 204 No Content\r\ncontent-length: 4\r\n\r\n"),
            Ok((ResponseFraming::Empty, true))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\nconnection: close\r\n\r\n"),
            Ok((ResponseFraming::Length(4), false))
        );
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\n"),
            Ok((ResponseFraming::Length(4), false))
        );
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\nconnection: keep-alive\r\n\r\n"),
            Ok((ResponseFraming::Length(4), true))
        );
        assert!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n").is_err()
        );
        assert!(framing(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
        assert!(
            framing(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n").is_err()
        );
    }

    #[test]
    fn bad_heads_are_errors() {
        let parse = |raw: &[u8]| parse_response(raw, &Method::GET, false);
        assert!(parse(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nbad field\r\n\r\n").is_err());
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        big.resize(MAX_RESPONSE_HEAD + 10, b'a');
        assert!(parse(&big).is_err());
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_RESPONSE_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(parse(&many).is_err());
    }
}
