//! The data path: downstream connection handling and proxying.

pub mod h1;
