//! Sluice: an L4/L7 reverse-proxy load balancer.
//!
//! `config` turns a TOML file into validated values; `state` builds the
//! immutable snapshot that requests read; `proxy` accepts connections and
//! runs the HTTP pipeline; `upstream`, `balance` and `resilience` decide
//! where a request goes and guard the backends; `admin` serves metrics and
//! status; `tls` terminates and originates TLS; `runtime` starts, reloads
//! and stops it all.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod demo;
pub mod health;
pub mod proxy;
pub mod resilience;
pub mod runtime;
pub mod state;
pub mod tls;
pub mod upstream;
