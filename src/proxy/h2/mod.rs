//! Our own HTTP/2 server codec for the downstream (client) side.
//!
//! A request's head is decoded from HPACK straight into the head the
//! upstream client writes, and a response relayed from an HTTP/1.1 backend
//! is encoded from the backend's wire-form fields, never through a second
//! `HeaderMap`. Every stream runs inside its connection's task: a wake-up
//! polls the streams that are ready, then the connection writes all their
//! frames at once.
//!
//! * `frame.rs`: frame headers and the frames the server writes.
//! * `hpack.rs`, `huffman.rs`: header compression (RFC 7541).
//! * `head.rs`: request heads and trailers from decoded fields (RFC 9113
//!   section 8), cookie crumbs joined for HTTP/1.1 backends.
//! * `body.rs`: request bodies fed by DATA frames, with flow control.
//! * `conn.rs`: the connection: frames in, streams, flow control, frames
//!   out.
//!
//! Choices worth knowing:
//! * Response fields that repeat on a connection enter HPACK's dynamic
//!   table and are sent as an index after their first response; fields that
//!   change per response stay literals, and `set-cookie` and credentials are
//!   never indexed. No Huffman coding: a literal is a copy. The client's
//!   SETTINGS_HEADER_TABLE_SIZE is honoured (at most 4 KiB is used).
//!   Requests are decoded in full.
//! * A malformed request (RFC 9113 section 8.1.1) is reset with
//!   PROTOCOL_ERROR and counted as a 400; one over the header list size we
//!   advertise gets a generated 431; plain `CONNECT` gets 405, as on
//!   HTTP/1.1. None of them reaches a backend.
//! * Stream-reset floods (CVE-2023-44487): a client that resets more than
//!   [`RESET_ALLOWANCE`] streams still being worked on, and more than it
//!   let finish, gets GOAWAY with ENHANCE_YOUR_CALM. A reset stream's
//!   handler is dropped at once, so its backend call is abandoned.
//! * Memory is bounded by flow control: a connection buffers at most its
//!   connection window of request body, and at most [`WRITE_HIGH`] bytes of
//!   output before it stops reading and polling response bodies.
//! * No server push, no priorities (PRIORITY frames are checked, then
//!   ignored), no extended CONNECT.

mod body;
mod conn;
mod frame;
mod head;
pub mod hpack;
mod huffman;

use std::fmt;
use std::io;
use std::time::Duration;

pub use body::RequestBody;
pub use conn::serve_connection;

/// Resets of streams still being worked on that a connection may send
/// beyond the number of its streams answered.
pub const RESET_ALLOWANCE: u32 = 100;

/// Output buffered before the connection waits for the socket.
pub const WRITE_HIGH: usize = 64 * 1024;

/// Limits and timeouts of one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS; a stream over it is refused.
    pub max_concurrent_streams: u32,
    /// Request body bytes a stream may have in flight
    /// (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// Request body bytes a connection may have in flight.
    pub conn_window: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: decoded field bytes (plus 32 per
    /// field) of one request head.
    pub max_header_list: usize,
    /// Most fields in one head.
    pub max_headers: usize,
    /// How long a connection with no stream open stays before GOAWAY.
    pub idle_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            max_concurrent_streams: 256,
            stream_window: 1 << 20,
            conn_window: 1 << 20,
            max_header_list: 64 * 1024,
            max_headers: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a connection ended other than by both sides being done.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// A connection error we sent GOAWAY for.
    Protocol {
        code: u32,
        why: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(err) => write!(f, "i/o: {err}"),
            Error::Protocol { code, why } => write!(f, "protocol error {code:#x}: {why}"),
        }
    }
}

impl std::error::Error for Error {}
