//! Request heads and trailers from decoded header blocks (RFC 9113
//! section 8.2 and 8.3).
//!
//! The decoder hands over each field as borrowed bytes; [`Fields`] copies
//! the values into one buffer per block, so the head's `HeaderValue`s share
//! one allocation instead of taking one each. A request that breaks the
//! rules of section 8 is malformed: its stream is reset and nothing is
//! forwarded.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri, Version};

use crate::proxy::h1::chunked;

/// Why a header block cannot become a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Breaks RFC 9113 section 8: the stream is reset with PROTOCOL_ERROR.
    Malformed(&'static str),
    /// Over the advertised header list size or field count: answered 431.
    TooLarge,
}

/// The fields of one header block as they are decoded.
pub(super) struct Fields {
    values: BytesMut,
    regular: Vec<(HeaderName, Range<usize>)>,
    method: Option<Range<usize>>,
    scheme: Option<Range<usize>>,
    authority: Option<Range<usize>>,
    path: Option<Range<usize>>,
    /// Bytes counted against the header list limit (RFC 9113 section 6.5.2).
    size: usize,
    max_size: usize,
    max_fields: usize,
    trailers: bool,
    refusal: Option<Refusal>,
}

impl Fields {
    pub fn new(max_size: usize, max_fields: usize) -> Self {
        Fields {
            values: BytesMut::new(),
            regular: Vec::new(),
            method: None,
            scheme: None,
            authority: None,
            path: None,
            size: 0,
            max_size,
            max_fields,
            trailers: false,
            refusal: None,
        }
    }

    /// Lets go of the values buffer (the connection went idle).
    pub fn release(&mut self) {
        self.values = BytesMut::new();
    }

    /// Starts a block; `trailers` when it ends a request body.
    pub fn start(&mut self, trailers: bool) {
        self.regular.clear();
        self.method = None;
        self.scheme = None;
        self.authority = None;
        self.path = None;
        self.size = 0;
        self.trailers = trailers;
        self.refusal = None;
        self.values.clear();
        // Shared by the heads of the requests it serves (each takes its
        // part): one allocation for several requests.
        if self.values.capacity() < 256 {
            self.values.reserve(2048);
        }
    }

    fn refuse(&mut self, why: Refusal) {
        self.refusal.get_or_insert(why);
    }

    /// Takes one decoded field.
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.refusal.is_some() {
            return;
        }
        self.size += name.len() + value.len() + 32;
        if self.size > self.max_size || self.regular.len() >= self.max_fields {
            return self.refuse(Refusal::TooLarge);
        }
        if value.first().is_some_and(|b| *b == b' ' || *b == b'\t')
            || value.last().is_some_and(|b| *b == b' ' || *b == b'\t')
        {
            return self.refuse(Refusal::Malformed("field value with surrounding space"));
        }
        let start = self.values.len();
        self.values.put_slice(value);
        let range = start..self.values.len();
        if let Some(pseudo) = name.strip_prefix(b":") {
            if self.trailers || !self.regular.is_empty() {
                return self.refuse(Refusal::Malformed("misplaced pseudo-header"));
            }
            let slot = match pseudo {
                b"method" => &mut self.method,
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                b"path" => &mut self.path,
                _ => return self.refuse(Refusal::Malformed("unknown pseudo-header")),
            };
            if slot.replace(range).is_some() {
                return self.refuse(Refusal::Malformed("repeated pseudo-header"));
            }
            return;
        }
        if name.iter().any(u8::is_ascii_uppercase) {
            return self.refuse(Refusal::Malformed("upper-case field name"));
        }
        let Ok(name) = HeaderName::from_bytes(name) else {
            return self.refuse(Refusal::Malformed("invalid field name"));
        };
        if is_connection_specific(&name) {
            return self.refuse(Refusal::Malformed("connection-specific field"));
        }
        if name == header::TE && value != b"trailers" {
            return self.refuse(Refusal::Malformed("te other than trailers"));
        }
        self.regular.push((name, range));
    }

    /// The request the block's fields make, with its declared length.
    pub fn request(&mut self) -> Result<(Request<()>, Option<u64>), Refusal> {
        if let Some(refusal) = self.refusal {
            return Err(refusal);
        }
        let values = self.values.split().freeze();
        let method = self
            .method
            .clone()
            .and_then(|r| Method::from_bytes(&values[r]).ok())
            .ok_or(Refusal::Malformed("missing or invalid :method"))?;
        let mut uri = http::uri::Parts::default();
        let authority = match self.authority.clone() {
            Some(r) => Some(
                Authority::from_maybe_shared(values.slice(r.clone()))
                    .map_err(|_| Refusal::Malformed("invalid :authority"))?,
            )
            .map(|a| (a, r)),
            None => None,
        };
        if method == Method::CONNECT {
            // Plain CONNECT: only :method and :authority (section 8.5).
            if self.scheme.is_some() || self.path.is_some() || authority.is_none() {
                return Err(Refusal::Malformed("invalid CONNECT"));
            }
        } else {
            let scheme = match self.scheme.clone().map(|r| &values[r]) {
                Some(b"http") => Scheme::HTTP,
                Some(b"https") => Scheme::HTTPS,
                Some(other) => {
                    Scheme::try_from(other).map_err(|_| Refusal::Malformed("invalid :scheme"))?
                }
                None => return Err(Refusal::Malformed("missing :scheme")),
            };
            let path = self
                .path
                .clone()
                .filter(|r| !r.is_empty())
                .ok_or(Refusal::Malformed("missing :path"))?;
            let path = PathAndQuery::from_maybe_shared(values.slice(path))
                .map_err(|_| Refusal::Malformed("invalid :path"))?;
            uri.scheme = Some(scheme);
            uri.path_and_query = Some(path);
        }
        // Room for the Host made from `:authority`.
        let mut headers = HeaderMap::with_capacity(self.regular.len() + 1);
        let mut length = None;
        let mut cookies = 0;
        for (name, range) in &self.regular {
            let value = HeaderValue::from_maybe_shared(values.slice(range.clone()))
                .map_err(|_| Refusal::Malformed("invalid field value"))?;
            if name == header::CONTENT_LENGTH {
                let n = chunked::decimal(value.as_bytes())
                    .ok_or(Refusal::Malformed("invalid content-length"))?;
                if length.is_some_and(|m| m != n) {
                    return Err(Refusal::Malformed("conflicting content-length"));
                }
                length = Some(n);
            }
            if name == header::COOKIE {
                cookies += 1;
            }
            headers.append(name.clone(), value);
        }
        if cookies > 1 {
            join_cookies(&mut headers);
        }
        if let Some((authority, range)) = authority {
            // An HTTP/1.1 backend needs Host (section 8.3.1).
            if !headers.contains_key(header::HOST) {
                let host = HeaderValue::from_maybe_shared(values.slice(range))
                    .map_err(|_| Refusal::Malformed("invalid :authority"))?;
                headers.insert(header::HOST, host);
            }
            uri.authority = Some(authority);
        }
        let uri = Uri::from_parts(uri).map_err(|_| Refusal::Malformed("invalid target"))?;
        let mut request = Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        *request.headers_mut() = headers;
        Ok((request, length))
    }

    /// The block's fields as trailers.
    pub fn trailers(&mut self) -> Result<HeaderMap, Refusal> {
        if let Some(refusal) = self.refusal {
            return Err(refusal);
        }
        let values = self.values.split().freeze();
        let mut trailers = HeaderMap::with_capacity(self.regular.len());
        for (name, range) in self.regular.drain(..) {
            let value = HeaderValue::from_maybe_shared(values.slice(range))
                .map_err(|_| Refusal::Malformed("invalid field value"))?;
            trailers.append(name, value);
        }
        Ok(trailers)
    }
}

/// Fields HTTP/2 forbids (RFC 9113 section 8.2.2).
pub(super) fn is_connection_specific(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Joins the cookie crumbs HTTP/2 sends as separate fields into the one
/// field an HTTP/1.1 backend expects (RFC 9113 section 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut joined = BytesMut::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.put_slice(b"; ");
        }
        joined.put_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> Result<(Request<()>, Option<u64>), Refusal> {
        let mut f = Fields::new(16 * 1024, 100);
        f.start(false);
        for (n, v) in fields {
            f.field(n.as_bytes(), v.as_bytes());
        }
        f.request()
    }

    const GET: [(&str, &str); 4] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "example.com"),
        (":path", "/a?b"),
    ];

    #[test]
    fn a_request_gets_its_target_and_a_host() {
        let (req, length) = request(&GET).unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "https://example.com/a?b");
        assert_eq!(req.headers()["host"], "example.com");
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(length, None);
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut fields = GET.to_vec();
        fields.extend([("cookie", "a=1"), ("x", "y"), ("cookie", "b=2")]);
        let (req, _) = request(&fields).unwrap();
        let cookies: Vec<_> = req.headers().get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![(":method", "GET"), (":scheme", "http"), (":authority", "a")],
            vec![(":method", "GET"), (":path", "/"), (":authority", "a")],
            [&GET[..], &[("Upper", "1")]].concat(),
            [&GET[..], &[("connection", "keep-alive")]].concat(),
            [&GET[..], &[("te", "gzip")]].concat(),
            [&GET[..], &[(":path", "/again")]].concat(),
            [&[("x", "1")], &GET[..]].concat(),
            [&GET[..], &[(":protocol", "websocket")]].concat(),
            [&GET[..], &[("x", " padded")]].concat(),
            [
                &GET[..],
                &[("content-length", "1"), ("content-length", "2")],
            ]
            .concat(),
            [&GET[..], &[("content-length", "-1")]].concat(),
        ];
        for case in cases {
            assert!(
                matches!(request(&case), Err(Refusal::Malformed(_))),
                "{case:?} was accepted"
            );
        }
    }

    #[test]
    fn too_many_bytes_is_too_large() {
        let big = "v".repeat(20_000);
        let fields = [&GET[..], &[("x-big", big.as_str())]].concat();
        assert_eq!(request(&fields).unwrap_err(), Refusal::TooLarge);
    }

    #[test]
    fn te_trailers_and_a_length_pass() {
        let fields = [&GET[..], &[("te", "trailers"), ("content-length", "12")]].concat();
        let (req, length) = request(&fields).unwrap();
        assert_eq!(req.headers()["te"], "trailers");
        assert_eq!(length, Some(12));
    }
}
