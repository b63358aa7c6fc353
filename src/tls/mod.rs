//! TLS with rustls and its ring crypto provider.
//!
//! * `files.rs`: reading and checking PEM certificate, key and CA files
//!   (used by config validation and by the certificate reload).
//! * `server.rs`: termination on listeners: the certificate picked by SNI,
//!   ALPN, client certificates, and the reload of changed files.
//! * `client.rs`: TLS to backends, verified against the system's or a
//!   given CA, with an optional client certificate.
//!
//! Where TLS meets the data path: the listener runs the handshake
//! (`proxy/listener.rs`), the upstream connector wraps backend connections
//! (`upstream/client.rs`), the health checks probe over it
//! (`health/mod.rs`).

pub mod client;
pub mod files;
pub mod server;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider of every TLS config Sluice builds: ring, with its
/// default cipher suites, key exchanges and signature algorithms.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `err` and its causes, `: `-separated, for a log line or config error
/// that reports it.
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
