//! The admin listener: /metrics, /healthz, /readyz and /status.

pub mod endpoints;
pub mod metrics;
pub mod server;
