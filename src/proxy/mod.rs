//! The data path: listeners, the PROXY protocol, routing, the HTTP pipeline
//! and its errors, and the access log they write.

pub mod access_log;
pub mod body;
pub mod buffers;
pub mod error;
pub mod forwarded;
pub mod h1;
pub mod h2;
pub mod http;
pub mod lazy;
pub mod listener;
pub mod park;
pub mod peek;
pub mod prefixed;
pub mod proxy_protocol;
pub mod route;
pub mod sni;
pub mod tcp;
pub mod timer;

/// Size of the future an async fn of three arguments returns (tests bound
/// the futures the data path keeps per connection and per request).
#[cfg(test)]
pub(crate) fn output_size<A, B, C, F: std::future::Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
    std::mem::size_of::<F>()
}
