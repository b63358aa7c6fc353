//! The data path: listeners, routing, the HTTP pipeline and its errors.

pub mod body;
pub mod error;
pub mod h1;
pub mod http;
pub mod listener;
pub mod route;
pub mod sni;
