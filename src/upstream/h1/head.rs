//! The pure parts of the HTTP/1.1 client: a request head out, a response
//! head in, and the framing each implies (RFC 9112 sections 6 and 9).

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
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
/// fields are replaced by ours; a missing Host is filled in with `authority`.
pub fn encode_request(
    buf: &mut BytesMut,
    parts: &Parts,
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
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        put_field(buf, name.as_str().as_bytes(), value.as_bytes());
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

/// Writes a chunk-size line for `len` bytes.
pub fn put_chunk_size(buf: &mut BytesMut, len: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&digits[i..]);
    buf.put_slice(b"\r\n");
}

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
}

/// Parses a response head at the start of `buf`; `Ok(None)` when it is not
/// complete yet. Field values share one copy of the head's bytes, so `buf`
/// itself is not kept alive by the result.
pub fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
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
    let head = Bytes::copy_from_slice(&buf[..len]);
    let base = buf.as_ptr() as usize;
    let mut headers = HeaderMap::with_capacity(res.headers.len());
    for field in res.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError("invalid field name"))?;
        let start = field.value.as_ptr() as usize - base;
        let value = HeaderValue::from_maybe_shared(head.slice(start..start + field.value.len()))
            .map_err(|_| HeadError("invalid field value"))?;
        headers.append(name, value);
    }
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(ResponseHead { parts, len }))
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

/// The framing of a response to a request with `method`, and whether the
/// connection can carry another request after it.
pub fn response_framing(
    method: &Method,
    head: &response::Parts,
) -> Result<(ResponseFraming, bool), HeadError> {
    let headers = &head.headers;
    let mut keep_alive = match head.version {
        Version::HTTP_10 => has_token(headers, header::CONNECTION, b"keep-alive"),
        _ => !has_token(headers, header::CONNECTION, b"close"),
    };
    let status = head.status;
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((ResponseFraming::Empty, keep_alive));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Transfer-Encoding wins over Content-Length; a message with both
        // is suspect, so its connection is not reused.
        keep_alive &= !headers.contains_key(header::CONTENT_LENGTH);
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") => (ResponseFraming::Chunked, keep_alive),
            _ => (ResponseFraming::Close, false),
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = trim(part);
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
                return Err(HeadError("invalid content-length"));
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if length.is_some_and(|l| l != n) {
                return Err(HeadError("conflicting content-length"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (ResponseFraming::Length(n), keep_alive),
        None => (ResponseFraming::Close, false),
    })
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &[u8]) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| trim(t).eq_ignore_ascii_case(token))
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
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
    use super::*;
    use http::Request;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    fn encode(req: Request<()>, end: bool, exact: Option<u64>) -> (String, RequestFraming) {
        let mut buf = BytesMut::new();
        let framing = encode_request(&mut buf, &parts(req), "10.0.0.1:80", end, exact);
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

    #[test]
    fn response_heads_parse_whole_or_not_at_all() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b c\r\n\r\nabc";
        assert!(parse_response(&raw[..20]).unwrap().is_none());
        let head = parse_response(raw).unwrap().unwrap();
        assert_eq!(head.len, raw.len() - 3);
        assert_eq!(head.parts.status, StatusCode::OK);
        assert_eq!(head.parts.headers["x-a"], "b c");
        assert_eq!(
            response_framing(&Method::GET, &head.parts).unwrap(),
            (ResponseFraming::Length(3), true)
        );
        assert_eq!(
            response_framing(&Method::HEAD, &head.parts).unwrap(),
            (ResponseFraming::Empty, true)
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |raw: &[u8]| {
            let head = parse_response(raw).unwrap().unwrap();
            response_framing(&Method::GET, &head.parts)
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
        assert!(parse_response(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nbad field\r\n\r\n").is_err());
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        big.resize(MAX_RESPONSE_HEAD + 10, b'a');
        assert!(parse_response(&big).is_err());
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_RESPONSE_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(parse_response(&many).is_err());
    }
}
