//! From the spanned TOML document to a validated [`Config`].
//!
//! Each section has one function that reads its keys through
//! [`TableReader`] (`schema.rs`), checks each value, fills in defaults and
//! checks references (listener and route → upstream). Every problem goes
//! into [`Problems`] and the walk goes on, so one run reports them all;
//! `load.rs` turns them into file:line:column errors.
//!
//! Keys whose feature is not built yet are rejected here with "not
//! supported yet", never accepted and ignored.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use super::schema::{
    did_you_mean, expect_str, expect_table, join_index, join_key, Problems, TableReader, Value,
};
use super::{
    AdminConfig, Alpn, BackendConfig, BalancerKind, CertificateConfig, Cidr, CircuitBreakerConfig,
    ClientAuthConfig, Config, ConfigSource, DiscoveryConfig, HashKey, HealthCheckConfig,
    HealthCheckKind, HostMatch, ListenerConfig, ListenerProtocol, ListenerTimeouts,
    ListenerTlsConfig, LogConfig, LogFormat, PoolConfig, ProxyProtocolVersion, RetryConfig,
    RouteConfig, RouteTarget, RuntimeConfig, ShutdownConfig, SystemRoots, UpstreamConfig,
    UpstreamProtocol, UpstreamRoots, UpstreamTimeouts, UpstreamTlsConfig, DEFAULT_BOUNDED_LOAD,
    DEFAULT_VNODES,
};
use crate::tls::{self, files};

const ROOT_KEYS: &[&str] = &[
    "runtime", "admin", "log", "shutdown", "listener", "upstream",
];
const RUNTIME_KEYS: &[&str] = &["workers", "dns_servers", "busy_poll", "busy_poll_interval"];
const ADMIN_KEYS: &[&str] = &["listen", "token"];
const LOG_KEYS: &[&str] = &["format", "access_log"];
const SHUTDOWN_KEYS: &[&str] = &["drain_delay", "grace"];

const LISTENER_KEYS: &[&str] = &[
    "name",
    "listen",
    "protocol",
    "upstream",
    "max_connections",
    "proxy_protocol",
    "trusted_proxies",
    "timeouts",
    "tls_passthrough",
    "tls",
    "route",
];
const LISTENER_UNSUPPORTED: &[&str] = &[];
const LISTENER_TIMEOUT_KEYS: &[&str] = &["client_header", "idle"];
const LISTENER_TLS_KEYS: &[&str] = &["certificates", "alpn", "client_ca", "client_auth"];
const CERTIFICATE_KEYS: &[&str] = &["cert", "key"];

const ROUTE_KEYS: &[&str] = &["host", "path_prefix", "headers", "sni", "upstream", "split"];
const ROUTE_UNSUPPORTED: &[&str] = &[];
const SPLIT_KEYS: &[&str] = &["upstream", "weight"];

const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "balancer",
    "hash_key",
    "hash",
    "send_proxy_protocol",
    "health_check",
    "circuit_breaker",
    "retry",
    "backends",
    "discovery",
    "protocol",
    "max_in_flight",
    "max_in_flight_per_backend",
    "slow_start",
    "pool",
    "timeouts",
    "tls",
];
const UPSTREAM_TLS_KEYS: &[&str] = &["sni", "ca", "verify", "cert", "key"];
const HASH_KEYS: &[&str] = &["vnodes", "bounded_load"];
const BREAKER_KEYS: &[&str] = &[
    "consecutive_failures",
    "failure_rate",
    "min_requests",
    "window",
    "open_for",
    "open_for_max",
    "half_open_probes",
];
const HEALTH_KEYS: &[&str] = &[
    "kind",
    "path",
    "host",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "expect_status",
];
const UPSTREAM_UNSUPPORTED: &[&str] = &[];
const DISCOVERY_KEYS: &[&str] = &["dns", "refresh"];
const RETRY_KEYS: &[&str] = &["attempts", "on", "backoff_base", "backoff_max", "budget"];
const BACKEND_KEYS: &[&str] = &["address", "weight"];
const POOL_KEYS: &[&str] = &["max_idle_per_backend", "idle_timeout"];
const UPSTREAM_TIMEOUT_KEYS: &[&str] = &["connect", "request", "per_try"];

/// Every key that can be written without an error, per table (for the
/// test that the example file shows them all).
#[cfg(test)]
pub(super) const ACCEPTED_KEYS: &[&[&str]] = &[
    ROOT_KEYS,
    RUNTIME_KEYS,
    ADMIN_KEYS,
    LOG_KEYS,
    SHUTDOWN_KEYS,
    LISTENER_KEYS,
    LISTENER_TIMEOUT_KEYS,
    LISTENER_TLS_KEYS,
    CERTIFICATE_KEYS,
    ROUTE_KEYS,
    SPLIT_KEYS,
    UPSTREAM_KEYS,
    UPSTREAM_TLS_KEYS,
    HASH_KEYS,
    HEALTH_KEYS,
    BREAKER_KEYS,
    RETRY_KEYS,
    BACKEND_KEYS,
    DISCOVERY_KEYS,
    POOL_KEYS,
    UPSTREAM_TIMEOUT_KEYS,
];

const DURATION_HINT: &str = "expected a duration string with a unit, like \"5s\"";

/// Validates the whole document. Returns `None` when a required part is
/// missing or broken; every reason is in `problems`, which may also hold
/// problems when `Some` is returned (the caller must check it).
pub(super) fn config(
    root: &Spanned<DeTable<'_>>,
    source: ConfigSource,
    problems: &mut Problems,
) -> Option<Config> {
    let root = TableReader::root(root);
    root.reject_unknown_keys(problems, ROOT_KEYS, &[]);
    // Certificate and key paths are relative to the config file.
    let base = source
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();

    let runtime = runtime(&root.section(problems, "runtime"), problems);
    let admin = admin(&root.section(problems, "admin"), problems);
    let log = log(&root.section(problems, "log"), problems);
    let shutdown = shutdown(&root.section(problems, "shutdown"), problems);

    let upstream_tables = required_tables(&root, problems, "upstream");
    reject_duplicate_names(&upstream_tables, "upstream", problems);
    let known = known_names(&upstream_tables);
    let upstreams: Vec<Option<UpstreamConfig>> = upstream_tables
        .iter()
        .map(|t| upstream(t, &base, problems))
        .collect();

    let listener_tables = required_tables(&root, problems, "listener");
    reject_duplicate_names(&listener_tables, "listener", problems);
    let sends_proxy: Vec<String> = upstreams
        .iter()
        .flatten()
        .filter(|u| u.send_proxy_protocol.is_some())
        .map(|u| u.name.clone())
        .collect();
    let uses_tls: Vec<String> = upstreams
        .iter()
        .flatten()
        .filter(|u| u.tls.is_some())
        .map(|u| u.name.clone())
        .collect();
    let refs = UpstreamRefs {
        known: &known,
        sends_proxy: &sends_proxy,
        uses_tls: &uses_tls,
    };
    let listeners: Vec<Option<ListenerConfig>> = listener_tables
        .iter()
        .map(|t| listener(t, &refs, &base, problems))
        .collect();
    reject_shared_addresses(&listener_tables, &listeners, admin.listen, problems);

    Some(Config {
        source,
        runtime,
        admin,
        log,
        shutdown,
        listeners: listeners.into_iter().collect::<Option<_>>()?,
        upstreams: upstreams.into_iter().collect::<Option<_>>()?,
    })
}

// ---------------------------------------------------------------------------
// Global sections

fn runtime(t: &TableReader<'_, '_>, problems: &mut Problems) -> RuntimeConfig {
    t.reject_unknown_keys(problems, RUNTIME_KEYS, &[]);
    let busy_poll = duration(t, problems, "busy_poll", Duration::ZERO);
    let busy_poll_interval = duration(t, problems, "busy_poll_interval", Duration::ZERO);
    if !busy_poll_interval.is_zero() && busy_poll_interval >= busy_poll {
        let span = t.key_span("busy_poll_interval").unwrap_or_else(|| t.span());
        let why = if busy_poll.is_zero() {
            "has no effect without busy_poll: set busy_poll to a window longer than it"
        } else {
            "must be shorter than busy_poll"
        };
        problems.push(span, &t.key_path("busy_poll_interval"), why);
    }
    RuntimeConfig {
        workers: count(t, problems, "workers", 0, 0),
        dns_servers: dns_servers(t, problems),
        busy_poll,
        busy_poll_interval,
    }
}

/// `dns_servers = ["10.96.0.10", "127.0.0.1:5353"]`: ip (port 53) or
/// ip:port.
fn dns_servers(t: &TableReader<'_, '_>, problems: &mut Problems) -> Vec<SocketAddr> {
    let Some(array) = t.array(problems, "dns_servers") else {
        return Vec::new();
    };
    let path = t.key_path("dns_servers");
    let mut servers = Vec::new();
    for (i, item) in array.iter().enumerate() {
        let item_path = join_index(&path, i);
        let Some(text) = expect_str(problems, item, &item_path) else {
            continue;
        };
        if let Ok(ip) = text.parse::<IpAddr>() {
            servers.push(SocketAddr::new(ip, 53));
            continue;
        }
        if let Some(addr) = ip_socket_addr(problems, &Spanned::new(item.span(), text), &item_path) {
            servers.push(addr);
        }
    }
    servers
}

fn admin(t: &TableReader<'_, '_>, problems: &mut Problems) -> AdminConfig {
    t.reject_unknown_keys(problems, ADMIN_KEYS, &[]);
    let default_listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 9901));
    let listen = t
        .str(problems, "listen")
        .and_then(|s| ip_socket_addr(problems, &s, &t.key_path("listen")))
        .unwrap_or(default_listen);
    let token = t.str(problems, "token").and_then(|s| {
        if s.get_ref().is_empty() {
            problems.push(
                s.span(),
                &t.key_path("token"),
                "must not be empty (remove the key to turn the token off)",
            );
            None
        } else {
            Some(s.get_ref().to_string())
        }
    });
    AdminConfig { listen, token }
}

fn log(t: &TableReader<'_, '_>, problems: &mut Problems) -> LogConfig {
    t.reject_unknown_keys(problems, LOG_KEYS, &[]);
    let format = match choice(t, problems, "format", &["text", "json"], &[]) {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    // Off unless asked for, as in HAProxy and Envoy: a busy proxy's access
    // log is a volume decision the operator should make.
    let access_log = flag(t, problems, "access_log");
    LogConfig { format, access_log }
}

fn shutdown(t: &TableReader<'_, '_>, problems: &mut Problems) -> ShutdownConfig {
    t.reject_unknown_keys(problems, SHUTDOWN_KEYS, &[]);
    ShutdownConfig {
        drain_delay: duration(t, problems, "drain_delay", Duration::ZERO),
        grace: duration(t, problems, "grace", Duration::from_secs(30)),
    }
}

/// The tables of `[[key]]`, reporting when there are none.
fn required_tables<'a, 'i>(
    root: &TableReader<'a, 'i>,
    problems: &mut Problems,
    key: &str,
) -> Vec<TableReader<'a, 'i>> {
    match root.get(key) {
        None => {
            problems.push(
                root.span(),
                "",
                format!("missing [[{key}]]: at least one {key} is required"),
            );
            Vec::new()
        }
        Some(value) => {
            match value.get_ref() {
                DeValue::Table(_) => {
                    problems.push(
                    value.span(),
                    key,
                    format!("expected an array of tables ([[{key}]]), found a single table ([{key}])"),
                );
                    Vec::new()
                }
                DeValue::Array(array) if array.is_empty() => {
                    problems.push(value.span(), key, format!("at least one {key} is required"));
                    Vec::new()
                }
                _ => root.tables(problems, key),
            }
        }
    }
}

/// The sorted names of the given tables, as far as they are readable, for
/// reference checks and hints.
fn known_names(tables: &[TableReader<'_, '_>]) -> Vec<String> {
    let mut names: Vec<String> = tables
        .iter()
        .filter_map(|t| t.get("name"))
        .filter_map(|v| v.get_ref().as_str())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn reject_duplicate_names(tables: &[TableReader<'_, '_>], kind: &str, problems: &mut Problems) {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for t in tables {
        let Some(value) = t.get("name") else {
            continue;
        };
        let Some(name) = value.get_ref().as_str() else {
            continue;
        };
        if let Some((_, first)) = seen.iter().find(|(seen, _)| *seen == name) {
            problems.push(
                value.span(),
                &t.key_path("name"),
                format!("duplicate {kind} name {name:?} (already used by {first})"),
            );
        } else {
            seen.push((name, t.path()));
        }
    }
}

// ---------------------------------------------------------------------------
// Listeners and routes

/// What a listener may know of the upstreams it references.
struct UpstreamRefs<'a> {
    /// Every upstream name.
    known: &'a [String],
    /// Upstreams that send the PROXY protocol (tcp listeners only).
    sends_proxy: &'a [String],
    /// Upstreams that speak TLS to their backends (http listeners only).
    uses_tls: &'a [String],
}

/// Listeners bind with `SO_REUSEPORT` (so a new process can take over while
/// the old one drains), which would let two listeners of one config share a
/// port silently: reject listen addresses that overlap each other or the
/// admin address (same port, and the same ip or either unspecified).
fn reject_shared_addresses(
    tables: &[TableReader<'_, '_>],
    listeners: &[Option<ListenerConfig>],
    admin: SocketAddr,
    problems: &mut Problems,
) {
    let overlap = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    let mut seen: Vec<(SocketAddr, String)> = vec![(admin, "admin.listen".to_owned())];
    for (t, l) in tables.iter().zip(listeners) {
        let Some(l) = l else { continue };
        let path = t.key_path("listen");
        match seen.iter().find(|(addr, _)| overlap(*addr, l.listen)) {
            Some((addr, other)) => {
                let span = t.get("listen").map_or_else(|| t.span(), |v| v.span());
                problems.push(
                    span,
                    &path,
                    format!(
                        "{} overlaps {other} ({addr}): each listener needs its own port",
                        l.listen
                    ),
                );
            }
            None => seen.push((l.listen, path)),
        }
    }
}

fn listener(
    t: &TableReader<'_, '_>,
    refs: &UpstreamRefs<'_>,
    base: &Path,
    problems: &mut Problems,
) -> Option<ListenerConfig> {
    let known = refs.known;
    t.reject_unknown_keys(problems, LISTENER_KEYS, LISTENER_UNSUPPORTED);

    let name = name(t, problems);
    let listen = t
        .required_str(problems, "listen")
        .and_then(|s| ip_socket_addr(problems, &s, &t.key_path("listen")));
    let protocol = match choice(t, problems, "protocol", &["http", "tcp"], &[]) {
        Some("tcp") => ListenerProtocol::Tcp,
        _ => ListenerProtocol::Http,
    };
    let upstream = t
        .str(problems, "upstream")
        .and_then(|s| upstream_ref(problems, &s, &t.key_path("upstream"), known));
    let max_connections = count(t, problems, "max_connections", 1, 100_000);
    let proxy_protocol = flag(t, problems, "proxy_protocol");
    let tls_passthrough = flag(t, problems, "tls_passthrough");
    if tls_passthrough && protocol != ListenerProtocol::Tcp {
        let span = t.key_span("tls_passthrough").unwrap_or_else(|| t.span());
        problems.push(
            span,
            &t.key_path("tls_passthrough"),
            "tls_passthrough needs protocol = \"tcp\"",
        );
    }
    let trusted_proxies = trusted_proxies(t, problems);

    let timeouts_table = t.section(problems, "timeouts");
    timeouts_table.reject_unknown_keys(problems, LISTENER_TIMEOUT_KEYS, &[]);
    let timeouts = ListenerTimeouts {
        client_header: positive_duration(
            &timeouts_table,
            problems,
            "client_header",
            Duration::from_secs(10),
        ),
        idle: positive_duration(&timeouts_table, problems, "idle", Duration::from_secs(60)),
    };

    let route_tables = t.tables(problems, "route");
    let routes: Vec<Option<RouteConfig>> = route_tables
        .iter()
        .map(|route| route_config(route, known, problems))
        .collect();

    let is_http = protocol == ListenerProtocol::Http;
    if is_http && t.get("upstream").is_none() && route_tables.is_empty() {
        problems.push(
            t.span(),
            t.path(),
            "an http listener needs an upstream or at least one route",
        );
    }
    let routes_by_sni = tls_passthrough && !route_tables.is_empty();
    if !is_http && t.get("upstream").is_none() && !routes_by_sni {
        problems.push(
            t.span(),
            t.path(),
            "a tcp listener needs an upstream (or tls_passthrough with sni routes)",
        );
    }
    // Which keys a route may use depends on the listener.
    for route in &route_tables {
        let misplaced: &[&str] = match (is_http, tls_passthrough) {
            (true, _) => &["sni"],
            (false, true) => &["host", "path_prefix", "headers"],
            (false, false) => &["host", "path_prefix", "headers", "sni"],
        };
        for key in misplaced {
            if let Some(span) = route.key_span(key) {
                let why = match (is_http, *key) {
                    (true, _) => "sni routes belong to tcp listeners with tls_passthrough",
                    (false, "sni") => "sni routes need tls_passthrough = true",
                    _ => "a tcp listener routes only by sni (with tls_passthrough)",
                };
                problems.push(span, &route.key_path(key), why);
            }
        }
    }
    let referenced = t
        .get("upstream")
        .and_then(|v| v.get_ref().as_str())
        .into_iter()
        .chain(route_tables.iter().flat_map(|r| {
            r.get("upstream")
                .and_then(|v| v.get_ref().as_str())
                .into_iter()
                .chain(
                    r.get("split")
                        .and_then(|v| v.get_ref().as_array())
                        .into_iter()
                        .flat_map(|a| a.iter())
                        .filter_map(|item| item.get_ref().get("upstream"))
                        .filter_map(|v| v.get_ref().as_str()),
                )
        }));
    for name in referenced {
        if is_http && refs.sends_proxy.iter().any(|s| s == name) {
            problems.push(
                t.span(),
                t.path(),
                format!(
                    "upstream {name:?} sends the PROXY protocol, which only tcp listeners can do \
                     (HTTP requests carry X-Forwarded-For instead)"
                ),
            );
        }
        if !is_http && refs.uses_tls.iter().any(|s| s == name) {
            problems.push(
                t.span(),
                t.path(),
                format!(
                    "upstream {name:?} has tls, which only http listeners use \
                     (a tcp listener passes the client's bytes through untouched)"
                ),
            );
        }
    }

    let tls = t
        .table(problems, "tls")
        .and_then(|tls| listener_tls(&tls, base, problems));
    if !is_http {
        if let Some(span) = t.key_span("tls") {
            problems.push(
                span,
                &t.key_path("tls"),
                "tls termination needs protocol = \"http\" \
                 (a tcp listener can route TLS by its SNI with tls_passthrough)",
            );
        }
    }

    Some(ListenerConfig {
        name: name?,
        listen: listen?,
        protocol,
        upstream,
        max_connections,
        proxy_protocol,
        tls_passthrough,
        trusted_proxies,
        timeouts,
        routes: routes.into_iter().collect::<Option<_>>()?,
        tls,
    })
}

fn trusted_proxies(t: &TableReader<'_, '_>, problems: &mut Problems) -> Vec<Cidr> {
    let Some(array) = t.array(problems, "trusted_proxies") else {
        return Vec::new();
    };
    let path = t.key_path("trusted_proxies");
    let mut cidrs = Vec::new();
    for (i, item) in array.iter().enumerate() {
        let item_path = join_index(&path, i);
        let Some(text) = expect_str(problems, item, &item_path) else {
            continue;
        };
        match parse_cidr(text) {
            Ok(cidr) => cidrs.push(cidr),
            Err(why) => problems.push(
                item.span(),
                &item_path,
                format!("{text:?} is not a cidr like \"10.0.0.0/8\" or \"::1/128\" ({why})"),
            ),
        }
    }
    cidrs
}

fn route_config(
    t: &TableReader<'_, '_>,
    known: &[String],
    problems: &mut Problems,
) -> Option<RouteConfig> {
    t.reject_unknown_keys(problems, ROUTE_KEYS, ROUTE_UNSUPPORTED);

    let host_key = |key: &str, problems: &mut Problems| {
        t.str(problems, key)
            .and_then(|s| match parse_host_match(s.get_ref()) {
                Ok(host) => Some(host),
                Err(why) => {
                    problems.push(
                        s.span(),
                        &t.key_path(key),
                        format!("{:?} is not a valid route {key} ({why})", s.get_ref()),
                    );
                    None
                }
            })
    };
    let host = host_key("host", problems);
    let sni = host_key("sni", problems);
    let path_prefix = t.str(problems, "path_prefix").and_then(|s| {
        if s.get_ref().starts_with('/') {
            Some(s.get_ref().to_string())
        } else {
            problems.push(
                s.span(),
                &t.key_path("path_prefix"),
                format!("{:?} must start with \"/\"", s.get_ref()),
            );
            None
        }
    });
    let headers = route_headers(t, problems);

    let target = match (t.get("upstream"), t.get("split")) {
        (Some(_), Some(_)) => {
            let span = t.key_span("split").unwrap_or_else(|| t.span());
            problems.push(span, t.path(), "set either upstream or split, not both");
            None
        }
        (None, None) => {
            problems.push(t.span(), t.path(), "a route needs an upstream or a split");
            None
        }
        (Some(_), None) => t
            .str(problems, "upstream")
            .and_then(|s| upstream_ref(problems, &s, &t.key_path("upstream"), known))
            .map(RouteTarget::Upstream),
        (None, Some(_)) => split(t, known, problems).map(RouteTarget::Split),
    };

    Some(RouteConfig {
        host,
        sni,
        path_prefix,
        headers,
        target: target?,
    })
}

fn route_headers(
    t: &TableReader<'_, '_>,
    problems: &mut Problems,
) -> Vec<(HeaderName, HeaderValue)> {
    let Some(table) = t.table(problems, "headers") else {
        return Vec::new();
    };
    let mut headers = Vec::new();
    for (key, value) in table.entries() {
        let path = table.key_path(key);
        let name = match HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                let span = table.key_span(key).unwrap_or_else(|| value.span());
                problems.push(span, &path, format!("{key:?} is not a valid header name"));
                None
            }
        };
        let value =
            expect_str(problems, value, &path).and_then(|text| match HeaderValue::from_str(text) {
                Ok(v) => Some(v),
                Err(_) => {
                    problems.push(
                        value.span(),
                        &path,
                        format!("{text:?} is not a valid header value (visible ascii only)"),
                    );
                    None
                }
            });
        if let (Some(name), Some(value)) = (name, value) {
            headers.push((name, value));
        }
    }
    headers
}

fn split(
    t: &TableReader<'_, '_>,
    known: &[String],
    problems: &mut Problems,
) -> Option<Vec<(String, u32)>> {
    let value = t.get("split")?;
    let array = t.array(problems, "split")?;
    if array.is_empty() {
        problems.push(
            value.span(),
            &t.key_path("split"),
            "must list at least one { upstream, weight }",
        );
        return None;
    }
    let mut targets = Vec::new();
    let mut complete = true;
    for (i, item) in array.iter().enumerate() {
        let Some(entry) = expect_table(problems, item, join_index(&t.key_path("split"), i)) else {
            complete = false;
            continue;
        };
        entry.reject_unknown_keys(problems, SPLIT_KEYS, &[]);
        let upstream = entry
            .required_str(problems, "upstream")
            .and_then(|s| upstream_ref(problems, &s, &entry.key_path("upstream"), known));
        let weight = if entry.get("weight").is_none() {
            entry.missing(problems, "weight");
            None
        } else {
            Some(int_in(&entry, problems, "weight", 1..=1_000_000, 1))
        };
        match (upstream, weight) {
            (Some(upstream), Some(weight)) => targets.push((upstream, to_u32(weight))),
            _ => complete = false,
        }
    }
    complete.then_some(targets)
}

// ---------------------------------------------------------------------------
// Upstreams and backends

/// `balancer`, with `hash` and `hash_key` for `consistent_hash` (and an
/// error where they are given to another balancer).
fn balancer(t: &TableReader<'_, '_>, problems: &mut Problems) -> (BalancerKind, HashKey) {
    let name = choice(
        t,
        problems,
        "balancer",
        &[
            "round_robin",
            "least_conn",
            "p2c",
            "consistent_hash",
            "random",
        ],
        &[],
    );
    let hash_table = t.section(problems, "hash");
    hash_table.reject_unknown_keys(problems, HASH_KEYS, &[]);
    let key = hash_key(t, problems);
    let kind = match name {
        Some("least_conn") => BalancerKind::LeastConn,
        Some("p2c") => BalancerKind::P2c,
        Some("random") => BalancerKind::Random,
        Some("consistent_hash") => {
            let vnodes = int_in(
                &hash_table,
                problems,
                "vnodes",
                1..=65_536,
                i64::from(DEFAULT_VNODES),
            );
            let bounded_load = match hash_table.float(problems, "bounded_load") {
                None => DEFAULT_BOUNDED_LOAD,
                Some(c) => {
                    let v = *c.get_ref();
                    if v == 0.0 || (1.0..=100.0).contains(&v) {
                        v
                    } else {
                        problems.push(
                            c.span(),
                            &hash_table.key_path("bounded_load"),
                            format!("must be 0 (off) or between 1.0 and 100.0, found {v}"),
                        );
                        DEFAULT_BOUNDED_LOAD
                    }
                }
            };
            BalancerKind::ConsistentHash {
                vnodes: u32::try_from(vnodes).unwrap_or(DEFAULT_VNODES),
                bounded_load,
            }
        }
        _ => BalancerKind::RoundRobin,
    };
    if name.is_some() && name != Some("consistent_hash") {
        for key in ["hash", "hash_key"] {
            if let Some(value) = t.get(key) {
                problems.push(
                    value.span(),
                    &t.key_path(key),
                    format!("{key} only applies to balancer = \"consistent_hash\""),
                );
            }
        }
    }
    (kind, key.unwrap_or(HashKey::ClientIp))
}

/// `health_check = { kind, path, host, interval, timeout, ... }`.
fn health_check(t: &TableReader<'_, '_>, problems: &mut Problems) -> HealthCheckConfig {
    t.reject_unknown_keys(problems, HEALTH_KEYS, &[]);
    let is_http = choice(t, problems, "kind", &["http", "tcp"], &[]) != Some("tcp");
    let path = t.str(problems, "path").and_then(|s| {
        if s.get_ref().starts_with('/') {
            Some(s.get_ref().to_string())
        } else {
            problems.push(
                s.span(),
                &t.key_path("path"),
                format!("{:?} must start with \"/\"", s.get_ref()),
            );
            None
        }
    });
    let host = t.str(problems, "host").map(|s| s.get_ref().to_string());
    let expect_status = t
        .str(problems, "expect_status")
        .and_then(|s| match parse_status_range(s.get_ref()) {
            Some(range) => Some(range),
            None => {
                problems.push(
                    s.span(),
                    &t.key_path("expect_status"),
                    format!(
                        "{:?} is not a status or range of statuses (like \"200\" or \"200-399\", within 100-599)",
                        s.get_ref()
                    ),
                );
                None
            }
        })
        .unwrap_or((200, 399));
    if !is_http {
        for key in ["path", "host", "expect_status"] {
            if let Some(span) = t.key_span(key) {
                problems.push(
                    span,
                    &t.key_path(key),
                    format!("{key} applies to kind = \"http\" only"),
                );
            }
        }
    }
    let kind = if is_http {
        HealthCheckKind::Http {
            path: path.unwrap_or_else(|| "/healthz".to_owned()),
            host,
            expect_status,
        }
    } else {
        HealthCheckKind::Tcp
    };
    HealthCheckConfig {
        kind,
        interval: positive_duration(t, problems, "interval", Duration::from_secs(2)),
        timeout: positive_duration(t, problems, "timeout", Duration::from_secs(1)),
        healthy_threshold: to_u32(int_in(t, problems, "healthy_threshold", 1..=1000, 2)),
        unhealthy_threshold: to_u32(int_in(t, problems, "unhealthy_threshold", 1..=1000, 3)),
    }
}

/// `retry = { attempts, on, backoff_base, backoff_max, budget }`; absent
/// means 3 attempts on connect failures only, with a 0.2 budget.
fn retry(t: &TableReader<'_, '_>, problems: &mut Problems) -> RetryConfig {
    use crate::resilience::retry::{RetryConditions, RetryOn};
    t.reject_unknown_keys(problems, RETRY_KEYS, &[]);
    let mut on = RetryConditions::default();
    match t.array(problems, "on") {
        None => on = on.with(RetryOn::ConnectFailure),
        Some(items) => {
            let path = t.key_path("on");
            for (i, item) in items.iter().enumerate() {
                let item_path = join_index(&path, i);
                let Some(name) = expect_str(problems, item, &item_path) else {
                    continue;
                };
                match RetryOn::ALL.iter().find(|(_, n)| *n == name) {
                    Some((c, _)) => on = on.with(*c),
                    None => problems.push(
                        item.span(),
                        &item_path,
                        format!(
                            "unknown retry condition {name:?} (allowed: connect-failure, reset, timeout, 502, 503, 504)"
                        ),
                    ),
                }
            }
        }
    }
    let budget = match t.float(problems, "budget") {
        None => 0.2,
        Some(b) if (0.0..=10.0).contains(b.get_ref()) => *b.get_ref(),
        Some(b) => {
            problems.push(
                b.span(),
                &t.key_path("budget"),
                format!("must be between 0 and 10, found {}", b.get_ref()),
            );
            0.2
        }
    };
    let backoff_base = positive_duration(t, problems, "backoff_base", Duration::from_millis(25));
    let backoff_max = positive_duration(t, problems, "backoff_max", Duration::from_millis(250));
    if backoff_max < backoff_base {
        let span = t.key_span("backoff_max").unwrap_or_else(|| t.span());
        problems.push(
            span,
            &t.key_path("backoff_max"),
            "must not be shorter than backoff_base",
        );
    }
    RetryConfig {
        attempts: to_u32(int_in(t, problems, "attempts", 1..=10, 3)),
        on,
        backoff_base,
        backoff_max,
        budget,
    }
}

/// `circuit_breaker = { consecutive_failures, failure_rate, ... }`.
fn circuit_breaker(t: &TableReader<'_, '_>, problems: &mut Problems) -> CircuitBreakerConfig {
    t.reject_unknown_keys(problems, BREAKER_KEYS, &[]);
    let failure_rate = match t.float(problems, "failure_rate") {
        None => 0.5,
        Some(r) if *r.get_ref() > 0.0 && *r.get_ref() <= 1.0 => *r.get_ref(),
        Some(r) => {
            problems.push(
                r.span(),
                &t.key_path("failure_rate"),
                format!("must be above 0 and at most 1, found {}", r.get_ref()),
            );
            0.5
        }
    };
    let open_for = positive_duration(t, problems, "open_for", Duration::from_secs(5));
    let open_for_max = positive_duration(t, problems, "open_for_max", Duration::from_secs(120));
    if open_for_max < open_for {
        let span = t.key_span("open_for_max").unwrap_or_else(|| t.span());
        problems.push(
            span,
            &t.key_path("open_for_max"),
            "must not be shorter than open_for",
        );
    }
    CircuitBreakerConfig {
        consecutive_failures: to_u32(int_in(
            t,
            problems,
            "consecutive_failures",
            0..=1_000_000,
            5,
        )),
        failure_rate,
        min_requests: to_u32(int_in(t, problems, "min_requests", 1..=1_000_000, 20)),
        window: positive_duration(t, problems, "window", Duration::from_secs(10)),
        open_for,
        open_for_max,
        half_open_probes: to_u32(int_in(t, problems, "half_open_probes", 1..=1000, 1)),
    }
}

/// `"200"` or `"200-399"`, within 100..=599.
fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (lo.trim().parse().ok()?, hi.trim().parse().ok()?),
        None => {
            let n = text.trim().parse().ok()?;
            (n, n)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

/// `hash_key`: client_ip | header:NAME | cookie:NAME | query:NAME | path.
fn hash_key(t: &TableReader<'_, '_>, problems: &mut Problems) -> Option<HashKey> {
    let value = t.str(problems, "hash_key")?;
    let text = *value.get_ref();
    let path = t.key_path("hash_key");
    let named = |prefix: &str| text.strip_prefix(prefix).filter(|n| !n.is_empty());
    let key = if text == "client_ip" {
        Some(HashKey::ClientIp)
    } else if text == "path" {
        Some(HashKey::Path)
    } else if let Some(name) = named("header:") {
        HeaderName::from_bytes(name.as_bytes())
            .ok()
            .map(HashKey::Header)
    } else if let Some(name) = named("cookie:") {
        Some(HashKey::Cookie(name.to_owned()))
    } else {
        named("query:").map(|name| HashKey::Query(name.to_owned()))
    };
    if key.is_none() {
        problems.push(
            value.span(),
            &path,
            format!(
                "invalid hash_key {text:?} (allowed: client_ip, header:NAME, cookie:NAME, query:NAME, path)"
            ),
        );
    }
    key
}

fn upstream(
    t: &TableReader<'_, '_>,
    base: &Path,
    problems: &mut Problems,
) -> Option<UpstreamConfig> {
    t.reject_unknown_keys(problems, UPSTREAM_KEYS, UPSTREAM_UNSUPPORTED);
    for key in UPSTREAM_UNSUPPORTED {
        t.reject_unsupported(problems, key);
    }

    let name = name(t, problems);
    let (balancer, hash_key) = balancer(t, problems);
    let send_proxy_protocol = match choice(t, problems, "send_proxy_protocol", &["v1", "v2"], &[]) {
        Some("v1") => Some(ProxyProtocolVersion::V1),
        Some("v2") => Some(ProxyProtocolVersion::V2),
        _ => None,
    };
    let discovery = t
        .table(problems, "discovery")
        .and_then(|d| discovery(&d, problems));
    let backends = match (t.get("discovery"), t.get("backends")) {
        (Some(_), Some(_)) => {
            let span = t.key_span("backends").unwrap_or_else(|| t.span());
            problems.push(
                span,
                &t.key_path("backends"),
                "set either backends or discovery, not both",
            );
            None
        }
        // Filled in by the runtime from the first resolution.
        (Some(_), None) => Some(Vec::new()),
        (None, _) => backends(t, problems),
    };
    let tls = t
        .table(problems, "tls")
        .and_then(|tls| upstream_tls(&tls, base, problems));
    let protocol = match choice(t, problems, "protocol", &["http1", "h2", "auto"], &[]) {
        Some("h2") => UpstreamProtocol::H2,
        Some("auto") => UpstreamProtocol::Auto,
        _ => UpstreamProtocol::Http1,
    };
    if protocol == UpstreamProtocol::Auto && t.get("tls").is_none() {
        if let Some(value) = t.get("protocol") {
            problems.push(
                value.span(),
                &t.key_path("protocol"),
                "protocol \"auto\" picks h2 or http/1.1 by ALPN, which needs tls",
            );
        }
    }
    if let (Some(span), true) = (t.key_span("tls"), send_proxy_protocol.is_some()) {
        problems.push(
            span,
            &t.key_path("tls"),
            "tls is for upstreams of http listeners and send_proxy_protocol for those of tcp listeners; \
             an upstream cannot have both",
        );
    }

    let max_in_flight = count(t, problems, "max_in_flight", 0, 1000);
    let max_in_flight_per_backend = count(t, problems, "max_in_flight_per_backend", 0, 0);
    let health_check = t
        .table(problems, "health_check")
        .map(|h| health_check(&h, problems));
    let circuit_breaker = t
        .table(problems, "circuit_breaker")
        .map(|c| circuit_breaker(&c, problems));
    let retry = retry(&t.section(problems, "retry"), problems);
    let slow_start = duration(t, problems, "slow_start", Duration::ZERO);

    let pool_table = t.section(problems, "pool");
    pool_table.reject_unknown_keys(problems, POOL_KEYS, &[]);
    let pool = PoolConfig {
        max_idle_per_backend: count(&pool_table, problems, "max_idle_per_backend", 0, 64),
        idle_timeout: duration(
            &pool_table,
            problems,
            "idle_timeout",
            Duration::from_secs(90),
        ),
    };

    let timeouts_table = t.section(problems, "timeouts");
    timeouts_table.reject_unknown_keys(problems, UPSTREAM_TIMEOUT_KEYS, &[]);
    let timeouts = UpstreamTimeouts {
        connect: positive_duration(&timeouts_table, problems, "connect", Duration::from_secs(1)),
        request: positive_duration(
            &timeouts_table,
            problems,
            "request",
            Duration::from_secs(30),
        ),
        per_try: positive_duration(
            &timeouts_table,
            problems,
            "per_try",
            Duration::from_secs(10),
        ),
    };

    Some(UpstreamConfig {
        name: name?,
        balancer,
        hash_key,
        send_proxy_protocol,
        backends: backends?,
        discovery,
        protocol,
        max_in_flight,
        max_in_flight_per_backend,
        health_check,
        circuit_breaker,
        retry,
        slow_start,
        pool,
        timeouts,
        tls,
    })
}

/// `discovery = { dns = "app.default.svc.cluster.local:8080", refresh = "5s" }`.
fn discovery(t: &TableReader<'_, '_>, problems: &mut Problems) -> Option<DiscoveryConfig> {
    t.reject_unknown_keys(problems, DISCOVERY_KEYS, &[]);
    let refresh = duration(t, problems, "refresh", Duration::from_secs(5));
    if refresh < Duration::from_secs(1) {
        let span = t.key_span("refresh").unwrap_or_else(|| t.span());
        problems.push(span, &t.key_path("refresh"), "must be at least 1s");
    }
    let dns = t.required_str(problems, "dns")?;
    let text = *dns.get_ref();
    // A trailing dot (a fully qualified name) is fine: checked without it.
    let (written_host, port) = text.rsplit_once(':').unwrap_or((text, ""));
    let fqdn = written_host.ends_with('.') && !written_host.ends_with("..");
    let checked = if fqdn {
        format!("{}:{port}", &written_host[..written_host.len() - 1])
    } else {
        text.to_owned()
    };
    let why = match split_host_port(&checked) {
        Ok((_, 0)) => "port 0 is not allowed",
        Ok((Host::Ip(_), _)) => {
            "the host is an ip address: list fixed addresses in backends; discovery resolves a dns name"
        }
        Ok((Host::Name(name), port)) => {
            return Some(DiscoveryConfig {
                host: if fqdn { format!("{name}.") } else { name },
                port,
                refresh,
            });
        }
        Err(why) => why,
    };
    problems.push(
        dns.span(),
        &t.key_path("dns"),
        format!("{text:?} is not a dns name and port, like \"app.default.svc.cluster.local:8080\" ({why})"),
    );
    None
}

fn backends(t: &TableReader<'_, '_>, problems: &mut Problems) -> Option<Vec<BackendConfig>> {
    let Some(value) = t.get("backends") else {
        problems.push(
            t.span(),
            t.path(),
            "missing required key \"backends\" (or discovery)",
        );
        return None;
    };
    let array = t.array(problems, "backends")?;
    let path = t.key_path("backends");
    if array.is_empty() {
        problems.push(value.span(), &path, "must list at least one backend");
        return None;
    }
    let mut backends: Vec<(usize, BackendConfig)> = Vec::new();
    let mut complete = true;
    for (i, item) in array.iter().enumerate() {
        // Key paths are built only for problems: a large file has thousands
        // of backends.
        let item_path = || join_index(&path, i);
        let Some((backend, span, address_path)) = backend(item, &item_path, problems) else {
            complete = false;
            continue;
        };
        if let Some((first, _)) = backends.iter().find(|(_, b)| b.address == backend.address) {
            problems.push(
                span,
                &address_path(),
                format!(
                    "duplicate backend {:?} (same as backends[{first}])",
                    backend.address
                ),
            );
            complete = false;
            continue;
        }
        backends.push((i, backend));
    }
    complete.then(|| backends.into_iter().map(|(_, b)| b).collect())
}

/// A key path built only when a problem needs it.
type LazyPath<'p> = Box<dyn Fn() -> String + 'p>;

/// One backend, either `"host:port"` or `{ address = "host:port", weight = 3 }`
/// (`path()` is its key path). Also returns where its address was written
/// and how to name that address's key path.
fn backend<'p>(
    item: &Value<'_>,
    path: &'p dyn Fn() -> String,
    problems: &mut Problems,
) -> Option<(BackendConfig, std::ops::Range<usize>, LazyPath<'p>)> {
    match item.get_ref() {
        DeValue::String(address) => {
            let (address, socket_addr) = resolve_backend(problems, address, item.span(), path)?;
            let backend = BackendConfig {
                address,
                socket_addr,
                weight: 1,
            };
            Some((backend, item.span(), Box::new(path)))
        }
        DeValue::Table(_) => {
            let t = expect_table(problems, item, path())?;
            t.reject_unknown_keys(problems, BACKEND_KEYS, &[]);
            let weight = to_u32(int_in(&t, problems, "weight", 1..=10_000, 1));
            let address = t.required_str(problems, "address")?;
            let address_path = move || join_key(&path(), "address");
            let (label, socket_addr) =
                resolve_backend(problems, address.get_ref(), address.span(), &address_path)?;
            let backend = BackendConfig {
                address: label,
                socket_addr,
                weight,
            };
            Some((backend, address.span(), Box::new(address_path)))
        }
        other => {
            problems.push(
                item.span(),
                &path(),
                format!(
                    "expected a \"host:port\" string or a table {{ address, weight }}, found {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

/// Checks `host:port` and resolves it: the normalised label and the address
/// to connect to (the first IPv4 result when there is one).
fn resolve_backend(
    problems: &mut Problems,
    text: &str,
    span: std::ops::Range<usize>,
    path: &dyn Fn() -> String,
) -> Option<(String, SocketAddr)> {
    let (host, port) = match split_host_port(text) {
        Ok((_, 0)) => Err("port 0 is not allowed"),
        other => other,
    }
    .map_err(|why| {
        problems.push(
            span.clone(),
            &path(),
            format!("{text:?} is not host:port ({why})"),
        );
    })
    .ok()?;
    match host {
        Host::Ip(ip) => {
            let addr = SocketAddr::new(ip, port);
            Some((addr.to_string(), addr))
        }
        Host::Name(name) => {
            let resolved: Vec<SocketAddr> = match (name.as_str(), port).to_socket_addrs() {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    problems.push(span, &path(), format!("cannot resolve {name:?}: {e}"));
                    return None;
                }
            };
            let preferred = resolved
                .iter()
                .find(|a| a.is_ipv4())
                .or_else(|| resolved.first());
            match preferred {
                Some(addr) => Some((format!("{name}:{port}"), *addr)),
                None => {
                    problems.push(
                        span,
                        &path(),
                        format!("cannot resolve {name:?}: no addresses"),
                    );
                    None
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// TLS

/// `listener.tls = { certificates = [{ cert, key }, ...], alpn, client_ca,
/// client_auth }`. Every file is read and checked now, so a broken one is
/// a config error naming it.
fn listener_tls(
    t: &TableReader<'_, '_>,
    base: &Path,
    problems: &mut Problems,
) -> Option<ListenerTlsConfig> {
    t.reject_unknown_keys(problems, LISTENER_TLS_KEYS, &[]);
    let certificates = match t.get("certificates") {
        None => {
            t.missing(problems, "certificates");
            None
        }
        Some(value) => {
            if value.get_ref().as_array().is_some_and(|a| a.is_empty()) {
                problems.push(
                    value.span(),
                    &t.key_path("certificates"),
                    "must list at least one { cert, key }",
                );
            }
            let loaded: Vec<Option<CertificateConfig>> = t
                .tables(problems, "certificates")
                .iter()
                .map(|c| {
                    c.reject_unknown_keys(problems, CERTIFICATE_KEYS, &[]);
                    cert_key_pair(c, base, problems)
                })
                .collect();
            loaded
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .filter(|c| !c.is_empty())
        }
    };
    let alpn = alpn(t, problems);
    let client_ca = t.str(problems, "client_ca").and_then(|path| {
        let resolved = files::resolve(base, path.get_ref());
        match files::load_ca(&resolved) {
            Ok(loaded) => Some((resolved, loaded)),
            Err(e) => {
                problems.push(path.span(), &t.key_path("client_ca"), e.to_string());
                None
            }
        }
    });
    let required =
        choice(t, problems, "client_auth", &["required", "optional"], &[]) != Some("optional");
    if let (Some(span), None) = (t.key_span("client_auth"), t.get("client_ca")) {
        problems.push(
            span,
            &t.key_path("client_auth"),
            "client_auth needs client_ca (the CA file client certificates are verified against)",
        );
    }
    let certificates = certificates?;
    if t.get("client_ca").is_some() && client_ca.is_none() {
        return None;
    }
    let client_auth = client_ca.map(|(ca, loaded)| ClientAuthConfig {
        ca,
        loaded,
        required,
    });
    let loaded: Vec<files::CertKey> = certificates.iter().map(|c| c.loaded.clone()).collect();
    let auth = client_auth.as_ref().map(|c| (&c.loaded, c.required));
    if let Err(e) = tls::server::build_config(&loaded, &alpn, auth, None) {
        problems.push(t.span(), t.path(), tls::with_causes(&e));
        return None;
    }
    Some(ListenerTlsConfig {
        certificates,
        alpn,
        client_auth,
    })
}

/// `cert` and `key` of one table: a certificate chain file and its private
/// key file, both read and checked.
fn cert_key_pair(
    t: &TableReader<'_, '_>,
    base: &Path,
    problems: &mut Problems,
) -> Option<CertificateConfig> {
    let cert = t.required_str(problems, "cert");
    let key = t.required_str(problems, "key");
    let (cert, key) = (cert?, key?);
    let cert_path = files::resolve(base, cert.get_ref());
    let key_path = files::resolve(base, key.get_ref());
    match files::load_cert_key(&cert_path, &key_path, &tls::provider(), SystemTime::now()) {
        Ok(loaded) => Some(CertificateConfig {
            cert: cert_path,
            key: key_path,
            loaded,
        }),
        Err(e) => {
            let (span, name) = match e.part {
                files::Part::Cert => (cert.span(), "cert"),
                files::Part::Key => (key.span(), "key"),
            };
            problems.push(span, &t.key_path(name), e.to_string());
            None
        }
    }
}

/// `alpn = ["h2", "http/1.1"]` (the default): what the listener offers, in
/// order of preference.
fn alpn(t: &TableReader<'_, '_>, problems: &mut Problems) -> Vec<Alpn> {
    let Some(items) = t.array(problems, "alpn") else {
        return vec![Alpn::H2, Alpn::Http11];
    };
    let path = t.key_path("alpn");
    let mut protocols = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_path = join_index(&path, i);
        let Some(name) = expect_str(problems, item, &item_path) else {
            continue;
        };
        let protocol = match name {
            "h2" => Alpn::H2,
            "http/1.1" => Alpn::Http11,
            other => {
                problems.push(
                    item.span(),
                    &item_path,
                    format!("unknown ALPN protocol {other:?} (allowed: h2, http/1.1)"),
                );
                continue;
            }
        };
        if protocols.contains(&protocol) {
            problems.push(item.span(), &item_path, format!("{name:?} is listed twice"));
            continue;
        }
        protocols.push(protocol);
    }
    protocols
}

/// `upstream.tls = { sni, ca, verify, cert, key }`.
fn upstream_tls(
    t: &TableReader<'_, '_>,
    base: &Path,
    problems: &mut Problems,
) -> Option<UpstreamTlsConfig> {
    t.reject_unknown_keys(problems, UPSTREAM_TLS_KEYS, &[]);
    let sni = t.str(problems, "sni").and_then(|s| {
        match tls::client::server_name(&s.get_ref().to_ascii_lowercase()) {
            Ok(name) => Some(name),
            Err(why) => {
                problems.push(s.span(), &t.key_path("sni"), why);
                None
            }
        }
    });
    let sni_ok = t.get("sni").is_none() || sni.is_some();
    let verify = t.bool(problems, "verify").is_none_or(|b| *b.get_ref());
    let ca = t.str(problems, "ca");
    let roots = match (&ca, verify) {
        (Some(_), false) => {
            let span = t.key_span("ca").unwrap_or_else(|| t.span());
            problems.push(
                span,
                &t.key_path("ca"),
                "ca does nothing with verify = false; remove one of them",
            );
            None
        }
        (None, false) => Some(UpstreamRoots::None),
        (Some(path), true) => match files::load_ca(&files::resolve(base, path.get_ref())) {
            Ok(loaded) => Some(UpstreamRoots::File(loaded)),
            Err(e) => {
                problems.push(path.span(), &t.key_path("ca"), e.to_string());
                None
            }
        },
        (None, true) => match files::system_roots() {
            Ok(roots) => Some(UpstreamRoots::System(SystemRoots(roots))),
            Err(why) => {
                problems.push(t.span(), t.path(), why);
                None
            }
        },
    };
    let client_cert = match (t.get("cert"), t.get("key")) {
        (None, None) => Some(None),
        (Some(_), None) => {
            t.missing(problems, "key");
            None
        }
        (None, Some(_)) => {
            t.missing(problems, "cert");
            None
        }
        (Some(_), Some(_)) => cert_key_pair(t, base, problems).map(Some),
    };
    if !sni_ok {
        return None;
    }
    Some(UpstreamTlsConfig {
        sni,
        verify,
        ca: ca.map(|p| files::resolve(base, p.get_ref())),
        roots: roots?,
        client_cert: client_cert?,
    })
}

// ---------------------------------------------------------------------------
// Value helpers

/// A listener or upstream name: required, `[A-Za-z0-9_.-]+`.
fn name(t: &TableReader<'_, '_>, problems: &mut Problems) -> Option<String> {
    let name = t.required_str(problems, "name")?;
    let text = *name.get_ref();
    let is_valid = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if is_valid {
        Some(text.to_owned())
    } else {
        problems.push(
            name.span(),
            &t.key_path("name"),
            format!("{text:?} is not a valid name (allowed: letters, digits, \"_\", \".\", \"-\")"),
        );
        None
    }
}

/// Checks a reference to an upstream by name.
fn upstream_ref(
    problems: &mut Problems,
    name: &Spanned<&str>,
    path: &str,
    known: &[String],
) -> Option<String> {
    let text = *name.get_ref();
    if known.iter().any(|k| k == text) {
        return Some(text.to_owned());
    }
    let mut message = if known.is_empty() {
        format!("unknown upstream {text:?} (no upstream is defined)")
    } else {
        format!("unknown upstream {text:?} (known: {})", known.join(", "))
    };
    if let Some(hint) = did_you_mean(text, known.iter().map(String::as_str)) {
        message.push_str(&format!("; did you mean {hint:?}?"));
    }
    problems.push(name.span(), path, message);
    None
}

/// A string from a fixed set. Values in `unsupported` are known but not
/// built yet; they and unknown values are reported, and give `None`.
fn choice<'a>(
    t: &TableReader<'a, '_>,
    problems: &mut Problems,
    key: &str,
    allowed: &[&'static str],
    unsupported: &[&'static str],
) -> Option<&'static str> {
    let value = t.str(problems, key)?;
    let text = *value.get_ref();
    if let Some(known) = allowed.iter().find(|a| **a == text) {
        return Some(known);
    }
    let allowed_list = allowed.join(", ");
    let message = if unsupported.contains(&text) {
        format!("{key} {text:?} is not supported yet (allowed: {allowed_list})")
    } else {
        let mut message = format!("unknown {key} {text:?} (allowed: {allowed_list})");
        let candidates = allowed.iter().chain(unsupported).copied();
        if let Some(hint) = did_you_mean(text, candidates) {
            message.push_str(&format!("; did you mean {hint:?}?"));
        }
        message
    };
    problems.push(value.span(), &t.key_path(key), message);
    None
}

/// A boolean that defaults to false.
fn flag(t: &TableReader<'_, '_>, problems: &mut Problems, key: &str) -> bool {
    t.bool(problems, key).is_some_and(|b| *b.get_ref())
}

/// An integer in `range`, or `default` when absent or invalid.
fn int_in(
    t: &TableReader<'_, '_>,
    problems: &mut Problems,
    key: &str,
    range: RangeInclusive<i64>,
    default: i64,
) -> i64 {
    let Some(value) = t.int(problems, key) else {
        return default;
    };
    let n = *value.get_ref();
    if range.contains(&n) {
        return n;
    }
    let message = if *range.end() == i64::MAX {
        format!("must be at least {}, found {n}", range.start())
    } else {
        format!(
            "must be between {} and {}, found {n}",
            range.start(),
            range.end()
        )
    };
    problems.push(value.span(), &t.key_path(key), message);
    default
}

/// A count that is at least `min`, or `default`.
fn count(
    t: &TableReader<'_, '_>,
    problems: &mut Problems,
    key: &str,
    min: usize,
    default: usize,
) -> usize {
    let min = i64::try_from(min).unwrap_or(i64::MAX);
    let default = i64::try_from(default).unwrap_or(i64::MAX);
    let n = int_in(t, problems, key, min..=i64::MAX, default);
    // In range, so non-negative; saturate on targets with a narrow usize.
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Weights are range-checked to fit; saturate rather than wrap regardless.
fn to_u32(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A duration string such as `"250ms"`, or `default` when absent or invalid.
fn duration(
    t: &TableReader<'_, '_>,
    problems: &mut Problems,
    key: &str,
    default: Duration,
) -> Duration {
    let Some(value) = t.get(key) else {
        return default;
    };
    let parsed = match value.get_ref() {
        DeValue::String(text) => parse_duration(text),
        DeValue::Integer(n) => Err(format!("{DURATION_HINT}, found integer {n}")),
        DeValue::Float(f) => Err(format!("{DURATION_HINT}, found float {f}")),
        other => Err(format!("{DURATION_HINT}, found {}", other.type_str())),
    };
    parsed.unwrap_or_else(|message| {
        problems.push(value.span(), &t.key_path(key), message);
        default
    })
}

/// Like [`duration`], but zero is an error.
fn positive_duration(
    t: &TableReader<'_, '_>,
    problems: &mut Problems,
    key: &str,
    default: Duration,
) -> Duration {
    let d = duration(t, problems, key, default);
    if !d.is_zero() {
        return d;
    }
    if let Some(value) = t.get(key) {
        problems.push(value.span(), &t.key_path(key), "must be longer than 0s");
    }
    default
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.parse::<f64>().is_ok() {
        return Err(format!("{text:?} has no unit; {DURATION_HINT}"));
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| format!("{text:?} is not a duration ({e}); {DURATION_HINT}"))
}

/// An `ip:port` socket address (a listen address: no host names).
fn ip_socket_addr(problems: &mut Problems, text: &Spanned<&str>, path: &str) -> Option<SocketAddr> {
    let s = *text.get_ref();
    let why = match split_host_port(s) {
        Ok((Host::Ip(ip), port)) => return Some(SocketAddr::new(ip, port)),
        Ok((Host::Name(_), _)) => "the host must be an ip address",
        Err(why) => why,
    };
    problems.push(
        text.span(),
        path,
        format!("{s:?} is not ip:port, like \"127.0.0.1:8080\" or \"[::1]:8080\" ({why})"),
    );
    None
}

#[derive(Debug, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    /// A DNS name, lower case.
    Name(String),
}

/// Splits `host:port`, where host is an IPv4 address, an IPv6 address in
/// brackets or a DNS name. The error says what is wrong.
fn split_host_port(s: &str) -> Result<(Host, u16), &'static str> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or("missing \"]\"")?;
        let port = after.strip_prefix(':').ok_or("missing port")?;
        let ip: Ipv6Addr = v6.parse().map_err(|_| "bad ipv6 address")?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("missing port")?;
        if host.contains(':') {
            return Err("an ipv6 address must be in brackets, like \"[::1]:80\"");
        }
        if host.is_empty() {
            return Err("missing host");
        }
        let looks_numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
        let host = if looks_numeric {
            Host::Ip(IpAddr::V4(host.parse().map_err(|_| "bad ipv4 address")?))
        } else if is_hostname(host) {
            Host::Name(host.to_ascii_lowercase())
        } else {
            return Err("bad host name");
        };
        (host, port)
    };
    Ok((host, parse_port(port)?))
}

fn parse_port(s: &str) -> Result<u16, &'static str> {
    if s.is_empty() {
        return Err("missing port");
    }
    if !s.chars().all(|c| c.is_ascii_digit()) {
        return Err("port is not a number");
    }
    // All digits, so the only way to fail is being too big.
    s.parse::<u16>().map_err(|_| "port > 65535")
}

/// DNS name syntax: dot-separated labels of letters, digits and `-`.
fn is_hostname(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// A route host: `api.example.com` or `*.example.com`, stored lower case.
fn parse_host_match(s: &str) -> Result<HostMatch, &'static str> {
    let host = s.to_ascii_lowercase();
    if host.is_empty() {
        return Err("it is empty");
    }
    if host.contains(':') {
        return Err("a route host has no port");
    }
    let wildcard_rule = "only a leading \"*.\" wildcard is allowed, like \"*.example.com\"";
    if let Some(rest) = host.strip_prefix("*.") {
        if rest.contains('*') {
            return Err(wildcard_rule);
        }
        if !is_hostname(rest) {
            return Err("bad host name after \"*.\"");
        }
        return Ok(HostMatch::Suffix(format!(".{rest}")));
    }
    if host.contains('*') {
        return Err(wildcard_rule);
    }
    if !is_hostname(&host) {
        return Err("bad host name");
    }
    Ok(HostMatch::Exact(host))
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (a single host).
fn parse_cidr(s: &str) -> Result<Cidr, &'static str> {
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| "bad ip address")?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = match prefix {
        None => max,
        Some(p) => {
            if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) {
                return Err("prefix length is not a number");
            }
            match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ if max == 32 => return Err("prefix length > 32"),
                _ => return Err("prefix length > 128"),
            }
        }
    };
    Ok(Cidr { addr, prefix_len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_host_port_explains_each_kind_of_bad_address() {
        assert_eq!(split_host_port("10.0.0.7:80800"), Err("port > 65535"));
        assert_eq!(split_host_port("10.0.0.7"), Err("missing port"));
        assert_eq!(split_host_port("10.0.0.7:"), Err("missing port"));
        assert_eq!(
            split_host_port("10.0.0.7:http"),
            Err("port is not a number")
        );
        assert_eq!(split_host_port("10.0.0.300:80"), Err("bad ipv4 address"));
        assert!(split_host_port("::1:80").is_err());
        assert_eq!(
            split_host_port("[::1]:80"),
            Ok((Host::Ip("::1".parse().expect("literal")), 80))
        );
        assert_eq!(
            split_host_port("App.Internal:8080"),
            Ok((Host::Name("app.internal".to_owned()), 8080))
        );
    }

    #[test]
    fn parse_cidr_accepts_bare_addresses_as_single_hosts() {
        let v4 = parse_cidr("10.1.2.3").expect("valid");
        assert_eq!(v4.prefix_len, 32);
        let v6 = parse_cidr("::1").expect("valid");
        assert_eq!(v6.prefix_len, 128);
        assert_eq!(parse_cidr("10.0.0.0/33"), Err("prefix length > 32"));
        assert_eq!(
            parse_cidr("10.0.0.0/x"),
            Err("prefix length is not a number")
        );
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5")
            .expect_err("no unit")
            .contains("has no unit"));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
