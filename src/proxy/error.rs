//! Everything that can go wrong on the data path, and what the client sees.
//!
//! `status()`, `reason()` (the `sluice-error` header) and `outcome()` (the
//! backend metric label) are exhaustive matches, so a new variant does not
//! compile until it is mapped.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::admin::metrics::Outcome;
use crate::resilience::retry::RetryOn;

/// A boxed error from a body or a transport.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request that Sluice answers itself instead of with a backend's response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("upstream {upstream} is at its in-flight limit")]
    Overloaded { upstream: String },
    #[error("upstream {upstream} has no eligible backend")]
    NoHealthyBackend { upstream: String },
    #[error("every healthy backend of upstream {upstream} has its circuit open")]
    CircuitOpen { upstream: String },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("connect to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The backend's certificate was refused, or the handshake failed.
    #[error("tls handshake with {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("backend {addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("backend {addr} closed or reset the connection")]
    Reset {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    #[error("backend {addr} sent an invalid response")]
    BadResponse {
        addr: SocketAddr,
        #[source]
        source: BoxError,
    },
    #[error("backend {addr} answered an upgrade request without upgrading")]
    UpgradeFailed { addr: SocketAddr },
    #[error("invalid request: {what}")]
    BadRequest { what: &'static str },
}

impl ProxyError {
    /// The status code of the generated answer.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ProxyError::NoRoute => S::NOT_FOUND,
            ProxyError::Overloaded { .. } => S::SERVICE_UNAVAILABLE,
            ProxyError::NoHealthyBackend { .. } => S::SERVICE_UNAVAILABLE,
            ProxyError::CircuitOpen { .. } => S::SERVICE_UNAVAILABLE,
            ProxyError::ConnectTimeout { .. } => S::BAD_GATEWAY,
            ProxyError::Connect { .. } => S::BAD_GATEWAY,
            ProxyError::Tls { .. } => S::BAD_GATEWAY,
            ProxyError::Timeout { .. } => S::GATEWAY_TIMEOUT,
            ProxyError::Reset { .. } => S::BAD_GATEWAY,
            ProxyError::BadResponse { .. } => S::BAD_GATEWAY,
            ProxyError::UpgradeFailed { .. } => S::BAD_GATEWAY,
            ProxyError::BadRequest { .. } => S::BAD_REQUEST,
        }
    }

    /// The value of the `sluice-error` response header.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no-route",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::NoHealthyBackend { .. } => "no-healthy-backend",
            ProxyError::CircuitOpen { .. } => "circuit-open",
            ProxyError::ConnectTimeout { .. } => "connect-failure",
            ProxyError::Connect { .. } => "connect-failure",
            ProxyError::Tls { .. } => "connect-failure",
            ProxyError::Timeout { .. } => "upstream-timeout",
            ProxyError::Reset { .. } => "upstream-reset",
            ProxyError::BadResponse { .. } => "bad-response",
            ProxyError::UpgradeFailed { .. } => "upgrade-failed",
            ProxyError::BadRequest { .. } => "bad-request",
        }
    }

    /// The retry condition this failure stands for, if any.
    pub fn retry_condition(&self) -> Option<RetryOn> {
        match self {
            ProxyError::NoRoute => None,
            ProxyError::Overloaded { .. } => None,
            ProxyError::NoHealthyBackend { .. } => None,
            ProxyError::CircuitOpen { .. } => None,
            ProxyError::ConnectTimeout { .. } => Some(RetryOn::ConnectFailure),
            ProxyError::Connect { .. } => Some(RetryOn::ConnectFailure),
            ProxyError::Tls { .. } => Some(RetryOn::ConnectFailure),
            ProxyError::Timeout { .. } => Some(RetryOn::Timeout),
            ProxyError::Reset { .. } => Some(RetryOn::Reset),
            ProxyError::BadResponse { .. } => Some(RetryOn::Reset),
            ProxyError::UpgradeFailed { .. } => None,
            ProxyError::BadRequest { .. } => None,
        }
    }

    /// The backend outcome to record, when a backend call was made.
    pub fn outcome(&self) -> Option<Outcome> {
        match self {
            ProxyError::NoRoute => None,
            ProxyError::Overloaded { .. } => None,
            ProxyError::NoHealthyBackend { .. } => None,
            ProxyError::CircuitOpen { .. } => None,
            ProxyError::ConnectTimeout { .. } => Some(Outcome::ConnectFailure),
            ProxyError::Connect { .. } => Some(Outcome::ConnectFailure),
            ProxyError::Tls { .. } => Some(Outcome::ConnectFailure),
            ProxyError::Timeout { .. } => Some(Outcome::Timeout),
            ProxyError::Reset { .. } => Some(Outcome::Reset),
            ProxyError::BadResponse { .. } => Some(Outcome::Reset),
            ProxyError::UpgradeFailed { .. } => Some(Outcome::Reset),
            ProxyError::BadRequest { .. } => None,
        }
    }
}
