//! Our own HTTP/2 server codec for the downstream (client) side.

pub mod hpack;
mod huffman;
