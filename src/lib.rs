//! Sluice: an L4/L7 reverse-proxy load balancer.
#![forbid(unsafe_code)]

pub mod config;
pub mod proxy;
