//! HTTP/2 frame layout (RFC 9113 section 4 and 6): the 9-byte frame
//! header, and writers for the frames the server sends.

use bytes::{BufMut, BytesMut};

/// What a client sends first (RFC 9113 section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Length of a frame header.
pub const HEAD_LEN: usize = 9;

/// The frame size both sides may send until told otherwise, and the most
/// we accept: we never advertise a larger SETTINGS_MAX_FRAME_SIZE.
pub const DEFAULT_MAX_FRAME: usize = 16_384;

/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// The flow-control window both sides start with.
pub const DEFAULT_WINDOW: i64 = 65_535;

pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes (RFC 9113 section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Payload length.
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// Stream identifier (the reserved bit cleared).
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8; HEAD_LEN]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Appends a frame header. `len` must fit 24 bits (frames we write are
/// at most the peer's SETTINGS_MAX_FRAME_SIZE, itself below 2^24).
pub fn put_head(buf: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    buf.put_slice(&head(len, kind, flags, stream));
}

fn head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; HEAD_LEN] {
    let [_, l0, l1, l2] = (len.min(0xff_ffff) as u32).to_be_bytes();
    let [s0, s1, s2, s3] = (stream & 0x7fff_ffff).to_be_bytes();
    [l0, l1, l2, kind, flags, s0, s1, s2, s3]
}

/// Appends a SETTINGS frame with `(identifier, value)` pairs.
pub fn put_settings(buf: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(buf, settings.len() * 6, kind::SETTINGS, 0, 0);
    for &(id, value) in settings {
        buf.put_u16(id);
        buf.put_u32(value);
    }
}

pub fn put_settings_ack(buf: &mut BytesMut) {
    put_head(buf, 0, kind::SETTINGS, flag::ACK, 0);
}

pub fn put_ping_ack(buf: &mut BytesMut, payload: &[u8]) {
    put_head(buf, payload.len(), kind::PING, flag::ACK, 0);
    buf.put_slice(payload);
}

pub fn put_window_update(buf: &mut BytesMut, stream: u32, increment: u32) {
    put_head(buf, 4, kind::WINDOW_UPDATE, 0, stream);
    buf.put_u32(increment & 0x7fff_ffff);
}

pub fn put_rst(buf: &mut BytesMut, stream: u32, reason: Reason) {
    put_head(buf, 4, kind::RST_STREAM, 0, stream);
    buf.put_u32(reason.0);
}

pub fn put_goaway(buf: &mut BytesMut, last_stream: u32, reason: Reason) {
    put_head(buf, 8, kind::GOAWAY, 0, 0);
    buf.put_u32(last_stream & 0x7fff_ffff);
    buf.put_u32(reason.0);
}

/// Reserves room for a HEADERS frame header; the caller appends the header
/// block, then calls [`finish_headers`] with what this returned. The block
/// is encoded straight into the output, not copied there.
pub fn start_headers(buf: &mut BytesMut) -> usize {
    let at = buf.len();
    buf.put_slice(&[0; HEAD_LEN]);
    at
}

/// Completes the HEADERS frame begun at `at`: its header, or, for a block
/// larger than `max_frame`, HEADERS and CONTINUATION frames.
pub fn finish_headers(
    buf: &mut BytesMut,
    at: usize,
    stream: u32,
    end_stream: bool,
    max_frame: usize,
) {
    let len = buf.len() - at - HEAD_LEN;
    if len > max_frame {
        let block = buf.split_off(at + HEAD_LEN);
        buf.truncate(at);
        put_headers(buf, stream, &block, end_stream, max_frame);
        return;
    }
    let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
    buf[at..at + HEAD_LEN].copy_from_slice(&head(len, kind::HEADERS, flags, stream));
}

/// Appends a header block as HEADERS and, when it is larger than
/// `max_frame`, CONTINUATION frames.
pub fn put_headers(
    buf: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1));
    let first = chunks.next().unwrap_or(&[]);
    let rest = chunks.len();
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    if rest == 0 {
        flags |= flag::END_HEADERS;
    }
    put_head(buf, first.len(), kind::HEADERS, flags, stream);
    buf.put_slice(first);
    for (i, chunk) in chunks.enumerate() {
        let flags = if i + 1 == rest { flag::END_HEADERS } else { 0 };
        put_head(buf, chunk.len(), kind::CONTINUATION, flags, stream);
        buf.put_slice(chunk);
    }
}

/// Appends a DATA frame carrying `data`.
pub fn put_data(buf: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    let flags = if end_stream { flag::END_STREAM } else { 0 };
    put_head(buf, data.len(), kind::DATA, flags, stream);
    buf.put_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_reads_back_as_written() {
        let mut buf = BytesMut::new();
        put_head(
            &mut buf,
            0x01_02_03,
            kind::HEADERS,
            flag::END_HEADERS,
            0x8000_0007,
        );
        let head = Head::parse(buf[..HEAD_LEN].try_into().expect("nine bytes"));
        assert_eq!(
            head,
            Head {
                len: 0x01_02_03,
                kind: kind::HEADERS,
                flags: flag::END_HEADERS,
                stream: 7,
            }
        );
    }

    #[test]
    fn a_block_encoded_in_place_gets_its_frame_header() {
        let mut buf = BytesMut::from(&b"before"[..]);
        let at = start_headers(&mut buf);
        buf.put_slice(&[1, 2, 3]);
        finish_headers(&mut buf, at, 5, true, 16);
        let head = Head::parse(buf[6..6 + HEAD_LEN].try_into().expect("head"));
        assert_eq!(
            (head.kind, head.flags, head.len, head.stream),
            (kind::HEADERS, flag::END_HEADERS | flag::END_STREAM, 3, 5)
        );
        assert_eq!(&buf[6 + HEAD_LEN..], &[1, 2, 3]);

        let mut buf = BytesMut::new();
        let at = start_headers(&mut buf);
        buf.put_slice(&[9; 20]);
        finish_headers(&mut buf, at, 5, false, 16);
        let mut expected = BytesMut::new();
        put_headers(&mut expected, 5, &[9; 20], false, 16);
        assert_eq!(buf, expected);
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let block = vec![7u8; 40];
        let mut buf = BytesMut::new();
        put_headers(&mut buf, 3, &block, true, 16);
        let mut frames = Vec::new();
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let head = Head::parse(rest[..HEAD_LEN].try_into().expect("head"));
            frames.push((head.kind, head.flags, head.len));
            rest = &rest[HEAD_LEN + head.len..];
        }
        assert_eq!(
            frames,
            vec![
                (kind::HEADERS, flag::END_STREAM, 16),
                (kind::CONTINUATION, 0, 16),
                (kind::CONTINUATION, flag::END_HEADERS, 8),
            ]
        );
    }
}
