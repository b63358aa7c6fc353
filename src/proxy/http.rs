//! The L7 pipeline: one request from the client to a backend and back.
//!
//! [`handle`] reads top to bottom as the steps of a request: load the
//! snapshot, route, take an in-flight permit, pick a backend, rewrite the
//! head, call the backend under its timeouts, and wrap the response body so
//! that its bookkeeping is recorded when the body ends. Every generated
//! answer goes through [`error_response`].

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use tokio::time::Instant;

use crate::admin::metrics::Outcome;
use crate::balance;
use crate::config::{BalancerKind, HashKey, LogFormat, UpstreamConfig, UpstreamProtocol};
use crate::proxy::access_log::{self, Entry};
use crate::proxy::body::{Exchange, ProxyBody, RequestBody, RequestLog};
use crate::proxy::error::ProxyError;
use crate::proxy::forwarded::{Forwarded, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::proxy::h1;
use crate::proxy::route::request_host;
use crate::resilience::retry::{self, RetryOn};
use crate::runtime::busy_poll;
use crate::state::{ListenerRuntime, Shared};
use crate::upstream::client::TryLimit;

/// What a request knows about the connection it came on.
#[derive(Clone)]
pub struct ConnInfo {
    /// Index of the listener in the snapshot it was accepted under.
    pub listener: usize,
    pub listener_name: Arc<str>,
    /// The client: the TCP peer, or the source named by a PROXY header.
    pub peer: SocketAddr,
    /// The address the client connected to (from a PROXY header when
    /// there was one).
    pub destination: SocketAddr,
    /// Set on connections that came in over TLS.
    pub tls: Option<Arc<TlsInfo>>,
    /// `peer`'s IP address as a header value for each request's
    /// X-Forwarded-For, formatted by the connection's first request (a TCP
    /// session never needs it).
    peer_ip: OnceLock<HeaderValue>,
}

/// What the TLS handshake of a client connection established.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The subject of the client certificate the handshake verified
    /// (`listener.tls.client_ca`), for the access log.
    pub client_subject: Option<Arc<str>>,
}

impl ConnInfo {
    /// `http` or `https`, for X-Forwarded-Proto.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The verified client certificate's subject, on a TLS connection.
    pub fn client_subject(&self) -> Option<Arc<str>> {
        self.tls.as_ref()?.client_subject.clone()
    }

    /// The client's IP address as a header value (X-Forwarded-For).
    pub fn peer_ip_header(&self) -> HeaderValue {
        self.peer_ip
            .get_or_init(|| ip_header(self.peer.ip()))
            .clone()
    }

    /// What the requests of a connection from `peer` to `destination`
    /// accepted by listener `listener` know of it (`tls` is set after the
    /// handshake).
    pub fn new(
        listener: usize,
        listener_name: Arc<str>,
        peer: SocketAddr,
        destination: SocketAddr,
    ) -> Self {
        ConnInfo {
            listener,
            listener_name,
            peer,
            destination,
            tls: None,
            peer_ip: OnceLock::new(),
        }
    }
}

/// An IP address as a header value. IPv4 is written octet by octet with
/// `itoa`: through `fmt` it cost about 900 instructions, once per
/// connection.
fn ip_header(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 48];
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                let octet = digits.format(octet).as_bytes();
                buf[len..len + octet.len()].copy_from_slice(octet);
                len += octet.len();
            }
            len
        }
        IpAddr::V6(_) => {
            let mut w = &mut buf[..];
            // An IP address always fits in 48 bytes.
            let _ = write!(w, "{ip}");
            48 - w.len()
        }
    };
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("unknown"))
}

const SLUICE_ERROR: HeaderName = HeaderName::from_static("sluice-error");

/// Proxies one request and returns the response to send to the client.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<RequestBody>,
) -> Response<ProxyBody> {
    busy_poll::note_work();
    let started = Instant::now();
    let snapshot = shared.snapshot.load_full();
    let (mut parts, body) = req.into_parts();
    let Some(listener) = snapshot.listener(conn.listener, &conn.listener_name) else {
        // The listener was removed by a reload; its connections drain.
        return error_response(&ProxyError::NoRoute, None);
    };
    let log = snapshot
        .config
        .log
        .access_log
        .then(|| request_log(shared, snapshot.config.log.format, listener, conn, &parts));
    let Some(up_index) = listener.router.route(&parts) else {
        let exchange = new_exchange(listener, None, started, log);
        return error_response(&ProxyError::NoRoute, Some(exchange));
    };
    let upstream = &snapshot.upstreams[up_index];
    let mut exchange = new_exchange(listener, Some(up_index), started, log);
    let body = match exchange.log.as_mut() {
        Some(log) => {
            log.entry.upstream = Some(Arc::clone(&upstream.name));
            body.counted(Arc::clone(&log.bytes_in))
        }
        None => body,
    };

    let Some(permit) = upstream.limit.try_acquire() else {
        upstream.shed.overloaded.inc();
        let err = ProxyError::Overloaded {
            upstream: upstream.name.to_string(),
        };
        return error_response(&err, Some(exchange));
    };
    exchange.permit = Some(permit);

    let key = request_hash(&upstream.config, &parts, conn.peer.ip());
    let upgrade = is_upgrade(&parts);
    let forwarded = match rewrite_request(
        &mut parts,
        conn,
        listener,
        upstream.config.protocol,
        upgrade,
    ) {
        Ok(forwarded) => forwarded,
        Err(err) => return error_response(&err, Some(exchange)),
    };

    // Only a request that can be sent again unchanged is retried: an
    // idempotent one with no body (a streamed body cannot be replayed).
    let policy = &upstream.config.retry;
    upstream.budget.deposit(started);
    let retryable =
        policy.attempts > 1 && !upgrade && body.is_end_stream() && is_idempotent(&parts);
    let timeouts = &upstream.config.timeouts;
    let deadline = started + timeouts.request;
    // The head is lent to each attempt; the body goes with the first (a
    // retried request has none).
    let mut first_body = Some(body);
    let mut tried = Vec::new();
    let mut attempt = 1;
    let (mut guard, backend, mut response) = loop {
        let now = if attempt == 1 {
            started
        } else {
            Instant::now()
        };
        let started_call = upstream.start_call(key, &mut tried, now).or_else(|| {
            // A retry goes to another backend when there is one, else
            // to one already tried.
            if attempt > 1 {
                tried.clear();
                upstream.start_call(key, &mut tried, now)
            } else {
                None
            }
        });
        let Some(mut guard) = started_call else {
            return error_response(&upstream.no_backend(), Some(exchange));
        };
        let backend = Arc::clone(guard.backend());
        let body = match first_body.take() {
            Some(body) => body,
            None if retryable => RequestBody::Empty,
            None => {
                guard.abandon();
                return error_response(&ProxyError::BadRequest { what: "retry" }, Some(exchange));
            }
        };
        exchange.attempts = attempt;
        let left = deadline.saturating_duration_since(now);
        let limit = timeouts.per_try.min(left);
        // The client guard is released before waiting.
        let try_limit = TryLimit {
            start: now,
            after: limit,
        };
        let result = backend
            .client()
            .send(
                backend.addr,
                &backend.authority,
                &parts,
                &forwarded,
                body,
                try_limit,
            )
            .await;
        let condition = match &result {
            Ok(response) => RetryOn::from_status(response.status().as_u16()),
            Err(err) => err.retry_condition(),
        };
        let retry = retryable
            && attempt < policy.attempts
            && condition.is_some_and(|c| policy.on.contains(c))
            && upstream.budget.try_withdraw();
        match (result, retry, condition) {
            (result, true, Some(condition)) => {
                guard.set_outcome(match &result {
                    Ok(_) => Outcome::Http5xx,
                    Err(err) => err.outcome().unwrap_or(Outcome::Reset),
                });
                drop(result);
                drop(guard);
                upstream.retries(condition).inc();
                tried.push(backend);
                let unit = fastrand::f64();
                let wait = retry::backoff(policy.backoff_base, policy.backoff_max, attempt, unit);
                tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                attempt += 1;
            }
            (Ok(response), _, _) => break (guard, backend, response),
            (Err(err), _, _) => {
                if let Some(outcome) = err.outcome() {
                    guard.set_outcome(outcome);
                }
                tracing::debug!(upstream = &*upstream.name, backend = &*backend.key.address, error = %err, "backend call failed");
                exchange.guard = Some(guard);
                return error_response(&err, Some(exchange));
            }
        }
    };

    let status = response.status();
    guard.set_outcome(if status.is_server_error() {
        Outcome::Http5xx
    } else {
        Outcome::Success
    });
    exchange.guard = Some(guard);
    exchange.status = status.as_u16();

    if status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade || response.extensions().get::<h1::UpgradeIo>().is_none() {
            let err = ProxyError::UpgradeFailed { addr: backend.addr };
            return error_response(&err, Some(exchange));
        }
    } else {
        remove_hop_by_hop(response.headers_mut(), false);
    }
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, ProxyBody::upstream(body, exchange))
}

/// The consistent-hash key of a request per the upstream's `hash_key`, or
/// `None` for other balancers and for requests without the key (those are
/// spread over the ring at random).
fn request_hash(config: &UpstreamConfig, parts: &Parts, peer: IpAddr) -> Option<u64> {
    if !matches!(config.balancer, BalancerKind::ConsistentHash { .. }) {
        return None;
    }
    match &config.hash_key {
        HashKey::ClientIp => Some(client_ip_hash(peer)),
        HashKey::Header(name) => parts
            .headers
            .get(name)
            .map(|v| balance::hash_key(v.as_bytes())),
        HashKey::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| balance::hash_key(v.as_bytes())),
        HashKey::Query(name) => parts
            .uri
            .query()?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| balance::hash_key(v.as_bytes())),
        HashKey::Path => Some(balance::hash_key(parts.uri.path().as_bytes())),
    }
}

/// The hash of a client address (an IPv4-mapped IPv6 address hashes as the
/// IPv4 address, so dual-stack listeners agree).
pub fn client_ip_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => balance::hash_key(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => balance::hash_key(&v4.octets()),
            None => balance::hash_key(&v6.octets()),
        },
    }
}

fn new_exchange(
    listener: &ListenerRuntime,
    upstream: Option<usize>,
    started: Instant,
    log: Option<RequestLog>,
) -> Exchange {
    let route = match upstream {
        Some(i) => Arc::clone(listener.route_metrics(i)),
        None => Arc::clone(&listener.unrouted),
    };
    Exchange {
        route,
        started,
        status: 0,
        attempts: 0,
        guard: None,
        permit: None,
        log,
    }
}

/// The start of a request's access log line.
fn request_log(
    shared: &Shared,
    format: LogFormat,
    listener: &ListenerRuntime,
    conn: &ConnInfo,
    parts: &Parts,
) -> RequestLog {
    let mut entry = Entry::new(
        format,
        access_log::Kind::Http,
        SystemTime::now(),
        Arc::clone(&listener.name),
        conn.peer,
    );
    entry.method = Some(parts.method.clone());
    entry.host = request_host(parts).map(str::to_owned);
    entry.path = Some(parts.uri.path().to_owned());
    entry.client_subject = conn.client_subject();
    RequestLog {
        sink: Arc::clone(&shared.access_log),
        entry: Box::new(entry),
        bytes_in: Arc::new(AtomicU64::new(0)),
    }
}

/// Counts a request that the HTTP/1.1 or HTTP/2 codec refused before routing (400,
/// 408, 431, ...), in `sluice_http_requests_total` with an empty upstream
/// and in the access log.
pub fn record_refused(shared: &Shared, conn: &ConnInfo, status: u16, reason: &'static str) {
    let snapshot = shared.snapshot.load();
    let Some(listener) = snapshot.listener(conn.listener, &conn.listener_name) else {
        return;
    };
    listener.unrouted.count(status);
    if snapshot.config.log.access_log {
        let mut entry = Entry::new(
            snapshot.config.log.format,
            access_log::Kind::Http,
            SystemTime::now(),
            Arc::clone(&listener.name),
            conn.peer,
        );
        entry.status = Some(status);
        entry.error = Some(reason);
        entry.client_subject = conn.client_subject();
        shared.access_log.record(Box::new(entry));
    }
}

/// The answer Sluice gives itself: status, `sluice-error: <reason>` and a
/// one-line text body.
pub fn error_response(err: &ProxyError, exchange: Option<Exchange>) -> Response<ProxyBody> {
    let status = err.status();
    let exchange = exchange.map(|mut ex| {
        ex.status = status.as_u16();
        if let Some(log) = ex.log.as_mut() {
            log.entry.error = Some(err.reason());
        }
        ex
    });
    let text = format!("{} {}\n", status.as_u16(), err.reason());
    let mut response = Response::new(ProxyBody::full(Bytes::from(text), exchange));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(SLUICE_ERROR, HeaderValue::from_static(err.reason()));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether the client asks to switch protocols (WebSocket and the like).
fn is_upgrade(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && connection_has(&parts.headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Turns the client's request head into the one the backend gets, but for
/// the X-Forwarded-* fields, which are returned.
fn rewrite_request(
    parts: &mut Parts,
    conn: &ConnInfo,
    listener: &ListenerRuntime,
    protocol: UpstreamProtocol,
    upgrade: bool,
) -> Result<Forwarded, ProxyError> {
    // The client's host: the Host header, else the HTTP/2 authority.
    let authority = parts.uri.authority().cloned();
    if !parts.headers.contains_key(header::HOST) {
        if let Some(a) = &authority {
            let value = HeaderValue::from_str(a.as_str()).map_err(|_| ProxyError::BadRequest {
                what: "invalid authority",
            })?;
            parts.headers.insert(header::HOST, value);
        }
    }

    remove_hop_by_hop(&mut parts.headers, upgrade);
    if upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    let trusted = listener
        .config
        .trusted_proxies
        .iter()
        .any(|c| c.contains(conn.peer.ip()));
    // Only a trusted proxy's X-Forwarded-For is looked at.
    let prior = trusted
        .then(|| joined(&parts.headers, &X_FORWARDED_FOR))
        .flatten();
    let for_ = match prior {
        Some(prior) => {
            let client_ip = conn.peer.ip();
            HeaderValue::from_str(&format!("{prior}, {client_ip}")).map_err(|_| {
                ProxyError::BadRequest {
                    what: "invalid x-forwarded-for",
                }
            })?
        }
        None => conn.peer_ip_header(),
    };
    let forwarded = Forwarded {
        for_,
        proto: (!trusted || !parts.headers.contains_key(&X_FORWARDED_PROTO)).then(|| conn.scheme()),
        replace_host: !trusted || !parts.headers.contains_key(&X_FORWARDED_HOST),
    };

    // With `auto` the connection decides (ALPN); the HTTP/2 client takes
    // an HTTP/1.1 request as it is.
    parts.version = match protocol {
        UpstreamProtocol::Http1 | UpstreamProtocol::Auto => Version::HTTP_11,
        UpstreamProtocol::H2 => Version::HTTP_2,
    };
    Ok(forwarded)
}

/// Whether a request may be sent twice (RFC 9110 §9.2.2, or the client
/// said so with `Idempotency-Key`).
fn is_idempotent(parts: &Parts) -> bool {
    matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || parts.headers.contains_key("idempotency-key")
}

/// All values of a header joined with ", ", or `None` if absent.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_owned(), |mut acc, v| {
        acc.push_str(", ");
        acc.push_str(v);
        acc
    }))
}

/// Removes the headers that belong to one connection (RFC 9110 §7.6.1):
/// those named in `Connection` and the fixed hop-by-hop set. `te: trailers`
/// stays (gRPC needs it); `upgrade` stays when the exchange is an upgrade.
fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Which of them are present, as bits of their index in HOP_BY_HOP:
    // one pass over the names, no allocation, and most messages carry
    // none or just `Connection`.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name.as_str()) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    // The fields `Connection` names; its `close` and `keep-alive` are
    // options, not field names worth a lookup (and no allocation when
    // they are all it says).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 && !(upgrade && *name == "upgrade") {
            headers.remove(*name);
        }
    }
    for name in named {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The fields that belong to one connection (RFC 9110 section 7.6.1),
/// lower-case; fields named in `Connection` are hop-by-hop too.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];
// `remove_hop_by_hop` keeps one bit per entry.
const _: () = assert!(HOP_BY_HOP.len() <= 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_named_ones_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::PROXY_AUTHORIZATION).is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::UPGRADE).is_none());
        assert_eq!(
            h.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn upgrade_keeps_the_upgrade_header() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        remove_hop_by_hop(&mut h, true);
        assert!(h.get(header::UPGRADE).is_some());
    }

    /// Every request's future is built and then moved into its box, so its
    /// size is copied once per request (and held while it is in flight).
    #[test]
    fn the_request_future_stays_small() {
        use crate::proxy::output_size;
        let size = output_size(handle);
        println!("request future: {size} bytes");
        assert!(size <= 2304, "request future grew to {size} bytes");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let addrs = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.168.100.7",
            "127.9.10.99",
            "1.20.200.0",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ];
        for a in addrs {
            let ip: IpAddr = a.parse().expect("address");
            assert_eq!(ip_header(ip), ip.to_string().as_str(), "{a}");
        }
    }

    #[test]
    fn generated_answers_carry_their_reason() {
        let resp = error_response(
            &ProxyError::Overloaded {
                upstream: "app".into(),
            },
            None,
        );
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["sluice-error"], "overloaded");
    }
}
