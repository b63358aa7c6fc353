//! Protection of backends and of Sluice itself: in-flight limits for now.

pub mod breaker;
pub mod limit;
pub mod retry;
