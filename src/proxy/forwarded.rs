//! The X-Forwarded-* fields Sluice sets on a request to a backend.
//!
//! They are decided once per request and travel beside the client's head
//! instead of being written into its `HeaderMap`: Sluice's HTTP/1.1 client
//! writes them after the client's fields, skipping the ones they replace,
//! so a request costs no map insertions (and no name hashing) for them.
//! The HTTP/2 client, which takes a map, gets them with [`Forwarded::apply`].

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What a request's X-Forwarded-* fields become on the way to a backend.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// X-Forwarded-For; replaces every one the client sent.
    pub for_: HeaderValue,
    /// X-Forwarded-Proto to send instead of the client's; `None` keeps the
    /// client's (it came through a trusted proxy).
    pub proto: Option<&'static str>,
    /// Whether X-Forwarded-Host is Sluice's (a copy of the request's Host,
    /// none when it has no Host) rather than the client's.
    pub replace_host: bool,
}

impl Forwarded {
    /// Whether the client's field `name` gives way to Sluice's.
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == X_FORWARDED_FOR
            || (self.proto.is_some() && *name == X_FORWARDED_PROTO)
            || (self.replace_host && *name == X_FORWARDED_HOST)
    }

    /// The fields Sluice sends, in order, for a request with `headers`.
    pub fn fields<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> impl Iterator<Item = (&'static str, &'a [u8])> {
        let host = self
            .replace_host
            .then(|| headers.get(header::HOST))
            .flatten();
        std::iter::once(("x-forwarded-for", self.for_.as_bytes()))
            .chain(self.proto.map(|p| ("x-forwarded-proto", p.as_bytes())))
            .chain(host.map(|h| ("x-forwarded-host", h.as_bytes())))
    }

    /// Writes the fields into a request's header map, replacing the
    /// client's.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(X_FORWARDED_FOR, self.for_.clone());
        if let Some(proto) = self.proto {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if self.replace_host {
            match headers.get(header::HOST).cloned() {
                Some(host) => {
                    headers.insert(X_FORWARDED_HOST, host);
                }
                None => {
                    headers.remove(X_FORWARDED_HOST);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(proto: Option<&'static str>, replace_host: bool) -> Forwarded {
        Forwarded {
            for_: HeaderValue::from_static("10.0.0.1, 10.0.0.2"),
            proto,
            replace_host,
        }
    }

    fn client_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(X_FORWARDED_HOST, HeaderValue::from_static("edge.example"));
        h
    }

    #[test]
    fn the_map_and_the_field_list_agree() {
        for (proto, replace_host) in [(Some("http"), true), (None, false), (None, true)] {
            let f = forwarded(proto, replace_host);
            // What the HTTP/1.1 client writes: the client's fields that
            // stay, then Sluice's.
            let client = client_headers();
            let mut map = HeaderMap::new();
            for (name, value) in &client {
                if !f.replaces(name) {
                    map.append(name, value.clone());
                }
            }
            for (name, value) in f.fields(&client) {
                map.append(name, HeaderValue::from_bytes(value).expect("value"));
            }
            let mut applied = client_headers();
            f.apply(&mut applied);
            assert_eq!(map, applied, "proto {proto:?}, replace_host {replace_host}");
        }
    }

    #[test]
    fn a_trusted_proxys_proto_and_host_stay() {
        let f = forwarded(None, false);
        let mut h = client_headers();
        f.apply(&mut h);
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_FORWARDED_HOST], "edge.example");
        assert_eq!(f.fields(&client_headers()).count(), 1);
        assert!(!f.replaces(&X_FORWARDED_PROTO));
        assert!(!f.replaces(&X_FORWARDED_HOST));
        assert!(f.replaces(&X_FORWARDED_FOR));
    }

    #[test]
    fn no_host_drops_the_clients_forwarded_host() {
        let f = forwarded(Some("http"), true);
        let mut h = client_headers();
        h.remove(header::HOST);
        assert_eq!(f.fields(&h).count(), 2);
        f.apply(&mut h);
        assert!(h.get(X_FORWARDED_HOST).is_none());
        assert!(f.replaces(&X_FORWARDED_HOST));
    }
}
