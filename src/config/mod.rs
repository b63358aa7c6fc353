//! Configuration: the TOML file, validated into plain typed values.
//!
//! `load.rs` reads a file and turns every problem into a [`ConfigError`] with
//! file:line:column and the key path; `schema.rs` walks the spanned TOML
//! document and `validate.rs` checks values and references. The types in
//! this file are the validated result: everything downstream (the snapshot
//! builder in `state.rs`, the listeners, the upstreams) reads only these.

mod load;
mod schema;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub use load::{content_hash, from_str, load_file, read_file};

/// One validated configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from and a stable hash of its text (for /status).
    pub source: ConfigSource,
    pub runtime: RuntimeConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
}

#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// FNV-1a 64 of the file's bytes, as 16 lower-case hex digits.
    pub hash: String,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Worker threads, each with its own event loop; 0 means one per CPU.
    pub workers: usize,
    /// DNS servers that `discovery` asks; empty means the system's
    /// (`/etc/resolv.conf`).
    pub dns_servers: Vec<SocketAddr>,
    /// How long a worker keeps polling for events, instead of sleeping,
    /// after its last new connection or request; zero: it sleeps at once.
    pub busy_poll: Duration,
    /// While polling, how long a worker sleeps on a timer between two polls
    /// that found nothing new; zero: it polls again at once (spins).
    pub busy_poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token required for /status when set.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub access_log: bool,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    pub drain_delay: Duration,
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    Http,
    Tcp,
}

impl ListenerProtocol {
    /// The config name (`protocol = "..."`).
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerProtocol::Http => "http",
            ListenerProtocol::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: ListenerProtocol,
    /// Default upstream when no route matches.
    pub upstream: Option<String>,
    pub max_connections: usize,
    /// Expect a PROXY protocol v1/v2 header on every connection and use its
    /// client address.
    pub proxy_protocol: bool,
    /// tcp only: route by the TLS ClientHello's SNI without terminating TLS.
    pub tls_passthrough: bool,
    pub trusted_proxies: Vec<Cidr>,
    pub timeouts: ListenerTimeouts,
    pub routes: Vec<RouteConfig>,
    /// http only: terminate TLS with these certificates.
    pub tls: Option<ListenerTlsConfig>,
}

/// `listener.tls`: TLS termination.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTlsConfig {
    /// In file order; each is chosen by the names in its subjectAltName
    /// extension, and the first is the default (no SNI, or an unknown one).
    pub certificates: Vec<CertificateConfig>,
    /// Protocols offered by ALPN, in order of preference; empty = no ALPN
    /// (HTTP/1.1).
    pub alpn: Vec<Alpn>,
    /// Verify client certificates against these CAs.
    pub client_auth: Option<ClientAuthConfig>,
}

/// What a listener's TLS is made from, without the files' contents: the
/// certificate and CA paths and the options (see
/// [`ListenerTlsConfig::setup`]).
pub type TlsSetup = (Vec<(PathBuf, PathBuf)>, Vec<Alpn>, Option<(PathBuf, bool)>);

impl ListenerTlsConfig {
    /// The paths and options, which are read at the listener's start; the
    /// files' contents are watched and reloaded by the listener itself.
    pub fn setup(&self) -> TlsSetup {
        (
            self.certificates
                .iter()
                .map(|c| (c.cert.clone(), c.key.clone()))
                .collect(),
            self.alpn.clone(),
            self.client_auth
                .as_ref()
                .map(|c| (c.ca.clone(), c.required)),
        )
    }
}

/// A certificate chain file and its private key file, with what they held
/// when the config was loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub loaded: crate::tls::files::CertKey,
}

/// An ALPN protocol a listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
}

impl Alpn {
    /// The protocol id on the wire (and in the config).
    pub fn as_str(self) -> &'static str {
        match self {
            Alpn::H2 => "h2",
            Alpn::Http11 => "http/1.1",
        }
    }
}

/// `listener.tls.client_ca` and `client_auth`: mutual TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAuthConfig {
    pub ca: PathBuf,
    pub loaded: crate::tls::files::CaCerts,
    /// `true`: a client without a valid certificate fails the handshake.
    /// `false`: one without any certificate is let in (with no subject);
    /// an invalid certificate still fails.
    pub required: bool,
}

/// `upstream.tls`: TLS to the backends.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTlsConfig {
    /// The name sent as SNI and verified; `None` = each backend's host
    /// (its DNS name or IP address).
    pub sni: Option<rustls::pki_types::ServerName<'static>>,
    /// Verify the backend's certificate chain and name.
    pub verify: bool,
    /// CA file to verify against; `None` = the system's roots.
    pub ca: Option<PathBuf>,
    /// The trust roots: from `ca`, else the system's (empty when
    /// `verify` is off).
    pub roots: UpstreamRoots,
    /// Client certificate presented to the backends.
    pub client_cert: Option<CertificateConfig>,
}

/// The trust roots of an upstream's TLS.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamRoots {
    /// `verify = false`.
    None,
    /// The operating system's, read when the config was loaded.
    System(SystemRoots),
    /// From `ca`.
    File(crate::tls::files::CaCerts),
}

/// The operating system's trust roots.
#[derive(Clone)]
pub struct SystemRoots(pub std::sync::Arc<rustls::RootCertStore>);

/// The system's roots are the same store on every load.
impl PartialEq for SystemRoots {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for SystemRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SystemRoots({} roots)", self.0.len())
    }
}

impl ListenerConfig {
    /// Whether connections are accepted the same way (protocol, limits,
    /// PROXY protocol, timeouts, TLS); routes and the rest are read from the
    /// snapshot per request, so they do not matter here. The TLS acceptor is
    /// built when an accept loop starts, so a change to `tls` (adding or
    /// removing it, its certificate, key or CA paths, ALPN, client
    /// authentication) needs a new accept loop; new contents of the same
    /// files do not, the running loop's watcher reloads them.
    pub fn accepts_like(&self, other: &ListenerConfig) -> bool {
        self.protocol == other.protocol
            && self.max_connections == other.max_connections
            && self.proxy_protocol == other.proxy_protocol
            && self.timeouts == other.timeouts
            && self.tls.as_ref().map(ListenerTlsConfig::setup)
                == other.tls.as_ref().map(ListenerTlsConfig::setup)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTimeouts {
    /// Time allowed for a request head to arrive once its first byte is read.
    pub client_header: Duration,
    /// Time a keep-alive connection may sit with no request in progress.
    pub idle: Duration,
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network (an IPv4-mapped IPv6 address is
    /// compared as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Host part of a route: exact (`api.example.com`) or a wildcard suffix
/// (`*.example.com`, stored as `.example.com`). Both lower case, no port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    Suffix(String),
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    /// tcp listeners with `tls_passthrough`: the ClientHello's server name.
    pub sni: Option<HostMatch>,
    pub path_prefix: Option<String>,
    /// All must be present with exactly these values.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub target: RouteTarget,
}

#[derive(Debug, Clone)]
pub enum RouteTarget {
    Upstream(String),
    /// Weighted split across upstreams; weights are > 0.
    Split(Vec<(String, u32)>),
}

/// How an upstream picks a backend (SPEC section 3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BalancerKind {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Fewest in flight per unit of weight, ties at random.
    LeastConn,
    /// The less loaded of two random backends.
    P2c,
    /// A ring of `vnodes` points per unit of weight; `bounded_load` is the
    /// balance factor (0 = off).
    ConsistentHash { vnodes: u32, bounded_load: f64 },
    /// Weighted random.
    Random,
}

impl BalancerKind {
    /// The config name (`balancer = "..."`).
    pub fn as_str(&self) -> &'static str {
        match self {
            BalancerKind::RoundRobin => "round_robin",
            BalancerKind::LeastConn => "least_conn",
            BalancerKind::P2c => "p2c",
            BalancerKind::ConsistentHash { .. } => "consistent_hash",
            BalancerKind::Random => "random",
        }
    }
}

/// Active health checks of an upstream's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    /// One probe's limit (connect, and for http the whole exchange).
    pub timeout: Duration,
    /// Consecutive successes that mark a down backend up.
    pub healthy_threshold: u32,
    /// Consecutive failures that mark an up backend down.
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// A TCP connect.
    Tcp,
    /// `GET path` (with `host` as the Host header, else the backend
    /// address); healthy when the status is in `expect_status`.
    Http {
        path: String,
        host: Option<String>,
        expect_status: (u16, u16),
    },
}

/// The passive circuit breaker of each backend of an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerConfig {
    /// Failures in a row that open the circuit (0 = only the rate counts).
    pub consecutive_failures: u32,
    /// Failure share over `window` above which the circuit opens...
    pub failure_rate: f64,
    /// ...once at least this many calls ended in the window.
    pub min_requests: u32,
    pub window: Duration,
    pub open_for: Duration,
    pub open_for_max: Duration,
    /// Probes let through while half-open; all must succeed to close.
    pub half_open_probes: u32,
}

/// When and how often a failed request is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Every try, the first included; 1 = no retries.
    pub attempts: u32,
    pub on: crate::resilience::retry::RetryConditions,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Retries per request allowed over the last ten seconds.
    pub budget: f64,
}

/// Which PROXY protocol header to send to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

/// What a consistent-hash upstream hashes to pick a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address (TCP sessions always use this).
    ClientIp,
    /// The value of a request header (lower-cased name).
    Header(HeaderName),
    /// The value of a cookie.
    Cookie(String),
    /// The value of a query-string parameter.
    Query(String),
    /// The request path, without the query.
    Path,
}

/// Default virtual nodes per unit of weight on a consistent-hash ring.
pub const DEFAULT_VNODES: u32 = 1024;
/// Default bounded-load balance factor.
pub const DEFAULT_BOUNDED_LOAD: f64 = 1.25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2: with prior knowledge over cleartext, or over TLS.
    H2,
    /// With `tls` only: HTTP/2 when the backend picks `h2` by ALPN, else
    /// HTTP/1.1.
    Auto,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub balancer: BalancerKind,
    /// What `consistent_hash` hashes (ignored by the other balancers).
    pub hash_key: HashKey,
    /// Retries of idempotent requests.
    pub retry: RetryConfig,
    /// A backend that comes back up takes a share of traffic growing
    /// linearly from nothing to its full weight over this long (0 = off).
    pub slow_start: Duration,
    /// Passive circuit breaking per backend; `None` = off.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Active health checks; `None` = every backend counts as up.
    pub health_check: Option<HealthCheckConfig>,
    /// Send a PROXY protocol header to backends (tcp listeners only).
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// The backends. With `discovery`, the addresses its last good
    /// resolution found (empty in a freshly validated file): the runtime
    /// fills them in.
    pub backends: Vec<BackendConfig>,
    /// Find the backends by DNS instead of listing them.
    pub discovery: Option<DiscoveryConfig>,
    pub protocol: UpstreamProtocol,
    /// Requests in flight across the whole upstream; 0 = unlimited.
    pub max_in_flight: usize,
    /// Bulkhead: requests (or sessions) in flight per backend; a full
    /// backend is not eligible. 0 = unlimited.
    pub max_in_flight_per_backend: usize,
    pub pool: PoolConfig,
    pub timeouts: UpstreamTimeouts,
    /// TLS to the backends.
    pub tls: Option<UpstreamTlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// As written in the file, normalised to `host:port` (the metric label).
    pub address: String,
    /// What `address` resolved to when the file was loaded.
    pub socket_addr: SocketAddr,
    pub weight: u32,
}

/// Backends found by resolving a DNS name (A and AAAA records), such as a
/// Kubernetes headless Service, again every `refresh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The name to resolve, lower case; a trailing dot (fully qualified,
    /// no search domains) is kept.
    pub host: String,
    /// The port every found address is given.
    pub port: u16,
    pub refresh: Duration,
}

impl fmt::Display for DiscoveryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub max_idle_per_backend: usize,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// The whole request, from pick to the end of the response head.
    pub request: Duration,
    /// One attempt (bounded by what is left of `request`).
    pub per_try: Duration,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the problem has no place in the file (unreadable file).
    pub line: usize,
    pub column: usize,
    /// Key path such as `upstream[1].backends[2]`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        } else {
            write!(f, "{}: ", self.file)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
