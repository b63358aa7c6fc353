//! The data path: listeners, the PROXY protocol, routing, the HTTP pipeline
//! and its errors, and the access log they write.

pub mod access_log;
pub mod body;
pub mod buffers;
pub mod error;
pub mod h1;
pub mod http;
pub mod listener;
pub mod park;
pub mod peek;
pub mod proxy_protocol;
pub mod route;
pub mod sni;
pub mod tcp;
