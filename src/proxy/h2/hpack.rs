//! HPACK header compression (RFC 7541) for our HTTP/2 server side.
//!
//! The [`Decoder`] reads everything a peer may send: indexed fields, literals
//! with incremental indexing, without indexing and never indexed (each with
//! an indexed or literal name), dynamic table size updates, prefixed
//! integers, and raw or Huffman-coded strings. It keeps the dynamic table in
//! step with the peer's encoder and treats every malformed block as a
//! [`DecodeError`], which HTTP/2 makes a connection error of type
//! COMPRESSION_ERROR.
//!
//! The [`Encoder`] writes response heads. A field that repeats on a
//! connection (`server`, `content-type`, `cache-control`, `date` within its
//! second, a backend's own fields) enters the dynamic table the first time
//! and is sent as a one- or two-byte index after that; fields that differ
//! from response to response, or could leak a secret through their
//! compressed size, stay literals outside the table (see [`Encoder`]). No
//! Huffman coding: a literal is a plain copy, and a repeated field costs the
//! peer's decoder a table lookup instead of a copy.

use std::collections::VecDeque;

use bytes::{BufMut, BytesMut};

use super::huffman::{self, HuffmanError};

/// Why a header block could not be decoded; every one is a connection
/// error of type COMPRESSION_ERROR in HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Index 0 names no table entry (RFC 7541 section 6.1).
    #[error("HPACK index 0 is not a valid table index")]
    ZeroIndex,
    /// An index past the static and dynamic tables.
    #[error("HPACK index is past the static and dynamic tables")]
    IndexOutOfRange,
    /// A prefixed integer longer than we accept (more than 28 bits after
    /// the prefix).
    #[error("HPACK integer is too large")]
    IntegerTooLarge,
    /// The block ends inside a representation (an integer or a string's
    /// length).
    #[error("HPACK block ends inside a representation")]
    Truncated,
    /// A string literal's length runs past the end of the block.
    #[error("HPACK string literal runs past the end of the block")]
    StringPastEnd,
    /// A Huffman-coded string contains the EOS symbol.
    #[error("HPACK Huffman-coded string contains EOS")]
    HuffmanEos,
    /// A Huffman-coded string's padding is longer than 7 bits or not a
    /// prefix of EOS.
    #[error("HPACK Huffman-coded string has invalid padding")]
    HuffmanPadding,
    /// A dynamic table size update above the SETTINGS_HEADER_TABLE_SIZE we
    /// advertised.
    #[error("HPACK dynamic table size update exceeds the advertised maximum")]
    TableSizeTooLarge,
    /// A dynamic table size update after the block's first field.
    #[error("HPACK dynamic table size update is not at the start of the block")]
    SizeUpdateNotAtStart,
    /// More than the two size updates RFC 7541 section 4.2 allows at the
    /// start of a block.
    #[error("HPACK block starts with more than two dynamic table size updates")]
    TooManySizeUpdates,
}

impl From<HuffmanError> for DecodeError {
    fn from(e: HuffmanError) -> Self {
        match e {
            HuffmanError::Eos => Self::HuffmanEos,
            HuffmanError::Padding => Self::HuffmanPadding,
        }
    }
}

/// The static table (RFC 7541 Appendix A); index `i` is `STATIC_TABLE[i - 1]`.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The static table index of `:status` (with value 200), used as a name.
const STATUS_NAME_INDEX: usize = 8;

/// SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 6.5.2): the dynamic
/// table size either side may use until the other says otherwise.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Per-entry overhead counted in a dynamic table's size (RFC 7541 4.1).
const ENTRY_OVERHEAD: usize = 32;

/// Largest continuation shift we accept in a prefixed integer: four
/// continuation bytes, 28 bits, far beyond any sane index, length or table
/// size, and small enough that the sum cannot overflow.
const MAX_INT_SHIFT: u32 = 21;

/// A scratch buffer grown past this by one huge Huffman string is dropped
/// after the block instead of being kept for the connection's lifetime.
const SCRATCH_KEEP: usize = 16 * 1024;

/// HPACK decoder: one per connection (it keeps the dynamic table).
pub struct Decoder {
    table: DynamicTable,
    /// The SETTINGS_HEADER_TABLE_SIZE we advertised: the peer's size updates
    /// may not exceed it.
    max_table_size: usize,
    /// Decoded Huffman strings of the field being decoded; reused so that
    /// Huffman-coded fields do not allocate.
    scratch: Vec<u8>,
}

impl Decoder {
    /// A decoder whose dynamic table may grow to `max_table_size` bytes
    /// (the SETTINGS_HEADER_TABLE_SIZE we advertise; 4096 by default).
    pub fn new(max_table_size: usize) -> Self {
        Self {
            table: DynamicTable::new(max_table_size),
            max_table_size,
            scratch: Vec::new(),
        }
    }

    /// Decodes one complete header block, calling `field(name, value)` for
    /// each field in order. Always decodes the whole block (so the dynamic
    /// table stays in step with the peer) unless it finds an error. The slices
    /// are only valid during the call: they point into `block`, the dynamic or
    /// static table, or a scratch buffer the decoder reuses for Huffman-coded
    /// strings (no allocation per field in the common cases).
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let mut reader = Reader { rest: block };
        let mut at_start = true;
        let mut size_updates = 0;
        while let Some(first) = reader.peek() {
            if first & 0xe0 == 0x20 {
                if !at_start {
                    return Err(DecodeError::SizeUpdateNotAtStart);
                }
                size_updates += 1;
                if size_updates > 2 {
                    return Err(DecodeError::TooManySizeUpdates);
                }
                self.size_update(&mut reader)?;
            } else {
                at_start = false;
                self.field(&mut reader, &mut field)?;
            }
        }
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::new();
        }
        Ok(())
    }

    /// Reads a dynamic table size update (RFC 7541 6.3) and applies it.
    fn size_update(&mut self, reader: &mut Reader<'_>) -> Result<(), DecodeError> {
        let size = reader.int(5)?;
        if size > self.max_table_size {
            return Err(DecodeError::TableSizeTooLarge);
        }
        self.table.set_capacity(size);
        Ok(())
    }

    /// Reads one field representation (RFC 7541 6.1 and 6.2) and reports it.
    fn field(
        &mut self,
        reader: &mut Reader<'_>,
        out: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let Some(first) = reader.peek() else {
            return Err(DecodeError::Truncated);
        };
        if first & 0x80 != 0 {
            let (name, value) = self.table.get(reader.int(7)?)?;
            out(name, value);
            return Ok(());
        }
        // 01xxxxxx: incremental indexing, 6-bit name index. 0000xxxx and
        // 0001xxxx (without / never indexed) differ only in what an
        // intermediary must do when re-encoding; we never re-encode a field
        // we decoded, so both just report it.
        let indexing = first & 0x40 != 0;
        let name_index = reader.int(if indexing { 6 } else { 4 })?;
        self.scratch.clear();
        let literal_name = match name_index {
            0 => Some(reader.string(&mut self.scratch)?),
            _ => None,
        };
        let value = reader.string(&mut self.scratch)?;
        let name = match literal_name {
            Some(name) => name.resolve(&self.scratch),
            None => self.table.get(name_index)?.0,
        };
        let value = value.resolve(&self.scratch);
        if indexing {
            // Copy before inserting: the name may be in an entry that the
            // insertion evicts (RFC 7541 4.4).
            let entry = Entry::new(name, value);
            let (name, value) = entry.parts();
            out(name, value);
            self.table.insert(entry);
        } else {
            out(name, value);
        }
        Ok(())
    }
}

/// A string literal read from a block: raw bytes still in the block, or the
/// range of the scratch buffer its Huffman decoding went to.
enum Str<'a> {
    Raw(&'a [u8]),
    Huffman(std::ops::Range<usize>),
}

impl<'a> Str<'a> {
    fn resolve<'s>(self, scratch: &'s [u8]) -> &'s [u8]
    where
        'a: 's,
    {
        match self {
            Str::Raw(bytes) => bytes,
            Str::Huffman(range) => scratch.get(range).unwrap_or_default(),
        }
    }
}

/// A cursor over a header block. Every read is checked, so no input can make
/// it panic.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.rest.split_first().ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    /// Reads an integer with a `prefix_bits`-bit prefix (RFC 7541 5.1);
    /// `prefix_bits` is 4 to 7, and the bits above the prefix are ignored
    /// (they are the representation's pattern).
    fn int(&mut self, prefix_bits: u32) -> Result<usize, DecodeError> {
        let max_prefix = (1u8 << prefix_bits) - 1;
        let prefix = self.byte()? & max_prefix;
        if prefix < max_prefix {
            return Ok(usize::from(prefix));
        }
        let mut value = u32::from(prefix);
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift > MAX_INT_SHIFT {
                return Err(DecodeError::IntegerTooLarge);
            }
            // At most 127 + 2^28 - 1 + 127 < 2^29 here: no overflow.
            value += u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(value).map_err(|_| DecodeError::IntegerTooLarge);
            }
            shift += 7;
        }
    }

    /// Reads a string literal (RFC 7541 5.2); a Huffman-coded one is decoded
    /// onto the end of `scratch`.
    fn string(&mut self, scratch: &mut Vec<u8>) -> Result<Str<'a>, DecodeError> {
        let huffman = self.peek().ok_or(DecodeError::Truncated)? & 0x80 != 0;
        let len = self.int(7)?;
        let (bytes, rest) = self
            .rest
            .split_at_checked(len)
            .ok_or(DecodeError::StringPastEnd)?;
        self.rest = rest;
        if !huffman {
            return Ok(Str::Raw(bytes));
        }
        let start = scratch.len();
        huffman::decode(bytes, scratch)?;
        Ok(Str::Huffman(start..scratch.len()))
    }
}

/// One dynamic table entry, name and value in a single allocation.
struct Entry {
    bytes: Box<[u8]>,
    name_len: usize,
}

impl Entry {
    fn new(name: &[u8], value: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(name.len().saturating_add(value.len()));
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(value);
        Self {
            bytes: bytes.into_boxed_slice(),
            name_len: name.len(),
        }
    }

    /// The entry's name and value.
    fn parts(&self) -> (&[u8], &[u8]) {
        self.bytes
            .split_at_checked(self.name_len)
            .unwrap_or_default()
    }

    /// The size RFC 7541 4.1 counts against the table's capacity.
    fn size(&self) -> usize {
        self.bytes.len().saturating_add(ENTRY_OVERHEAD)
    }
}

/// The dynamic table (RFC 7541 2.3.2 and 4): newest entry at the front, so
/// dynamic index 62 is `entries[0]`, and eviction pops from the back.
struct DynamicTable {
    entries: VecDeque<Entry>,
    /// Sum of the entries' [`Entry::size`].
    size: usize,
    /// The current maximum size, as last set by a size update.
    capacity: usize,
}

impl DynamicTable {
    fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            capacity,
        }
    }

    /// The field at a combined static + dynamic `index` (RFC 7541 2.3.3).
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        let i = index.checked_sub(1).ok_or(DecodeError::ZeroIndex)?;
        if let Some(&(name, value)) = STATIC_TABLE.get(i) {
            return Ok((name, value));
        }
        self.entries
            .get(i - STATIC_TABLE.len())
            .map(Entry::parts)
            .ok_or(DecodeError::IndexOutOfRange)
    }

    /// The position (0 = newest) of the first entry that is exactly `name`
    /// and `value`, and, when `want_name`, of the first whose name is
    /// `name`. Entries of other lengths are passed over without a compare.
    fn find(&self, name: &[u8], value: &[u8], want_name: bool) -> (Option<usize>, Option<usize>) {
        let mut named = None;
        let len = name.len() + value.len();
        for (i, entry) in self.entries.iter().enumerate() {
            if entry.name_len != name.len() || (!want_name && entry.bytes.len() != len) {
                continue;
            }
            let (n, v) = entry.parts();
            if n != name {
                continue;
            }
            if v == value {
                return (Some(i), named.or(Some(i)));
            }
            named = named.or(Some(i));
        }
        (None, named)
    }

    /// Adds `entry`, evicting the oldest entries to make room; an entry larger
    /// than the whole table empties it and is not added (RFC 7541 4.4).
    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        if size > self.capacity {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.capacity - size);
        self.size += size;
        self.entries.push_front(entry);
    }

    /// Applies a size update, evicting what no longer fits (RFC 7541 4.3).
    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict_to(capacity);
    }

    /// Evicts the oldest entries until the table's size is at most `limit`.
    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some(old) => self.size = self.size.saturating_sub(old.size()),
                None => self.size = 0,
            }
        }
    }
}

/// Appends `:status` with `status` (100..=999) to `buf`: an indexed field when
/// the static table has it (200, 204, 206, 304, 400, 404, 500), else a literal
/// without indexing with name index 8. No Huffman coding.
pub fn encode_status(buf: &mut bytes::BytesMut, status: u16) {
    debug_assert!((100..=999).contains(&status), "status {status}");
    let index: u8 = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => {
            let mut digits = itoa::Buffer::new();
            encode_literal(
                buf,
                0x00,
                4,
                STATUS_NAME_INDEX,
                b"",
                digits.format(status).as_bytes(),
            );
            return;
        }
    };
    buf.put_u8(0x80 | index);
}

/// The largest dynamic table the encoder keeps, whatever larger size the
/// peer would allow: HTTP/2's default, and many times what a response's
/// repeated fields take.
const ENCODER_TABLE_MAX: usize = 4096;

/// Names longer than this are written as literals and never enter the table
/// (the encoder lower-cases a name on the stack to look it up).
const ENCODER_NAME_MAX: usize = 64;

/// HPACK encoder: one per connection, for the response heads we send.
///
/// A field the dynamic table holds goes out as its one- or two-byte index. A
/// field that is likely to repeat on the connection (`server`,
/// `content-type`, `cache-control`, `date` within its second, a backend's
/// own fields) goes out as a literal with incremental indexing and enters the
/// table. Fields that differ from response to response (`content-length`,
/// `etag`, `location`, `age`, `last-modified`) or that could leak a secret
/// by their compressed size (`set-cookie`, `cookie` and the credentials,
/// marked never indexed) stay literals outside the table, so they neither
/// evict the useful entries nor cost an insertion. No Huffman coding: a
/// literal is a copy.
pub struct Encoder {
    table: DynamicTable,
    /// Dynamic table size updates the next block must start with (RFC 7541
    /// 4.2): the smallest size since the last block, then the current one.
    pending_update: Option<(usize, usize)>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

/// How the encoder writes a field it does not find in its table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Indexing {
    /// Literal with incremental indexing: the field enters the table.
    Incremental,
    /// Literal without indexing.
    Without,
    /// Literal never indexed: intermediaries must not index it either.
    Never,
}

impl Encoder {
    /// An encoder for a peer whose SETTINGS_HEADER_TABLE_SIZE is still the
    /// default (4096).
    pub fn new() -> Self {
        Self {
            table: DynamicTable::new(ENCODER_TABLE_MAX.min(DEFAULT_TABLE_SIZE)),
            pending_update: None,
        }
    }

    /// The peer's SETTINGS_HEADER_TABLE_SIZE is now `size`: the table shrinks
    /// at once (evicting what no longer fits), and the next block tells the
    /// peer's decoder.
    pub fn set_peer_table_size(&mut self, size: usize) {
        let size = size.min(ENCODER_TABLE_MAX);
        self.table.set_capacity(size);
        let low = self.pending_update.map_or(size, |(low, _)| low.min(size));
        self.pending_update = Some((low, size));
    }

    /// Starts a header block: writes the size updates owed to the peer.
    pub fn begin_block(&mut self, buf: &mut BytesMut) {
        if let Some((low, size)) = self.pending_update.take() {
            encode_int(buf, 0x20, 5, low);
            if size != low {
                encode_int(buf, 0x20, 5, size);
            }
        }
    }

    /// Appends one field. `name` may be in any ASCII case (an HTTP/1.1
    /// backend's "Content-Type"); it is written lower-case, as HTTP/2
    /// requires.
    pub fn field(&mut self, buf: &mut BytesMut, name: &[u8], value: &[u8]) {
        let mut stack = [0u8; ENCODER_NAME_MAX];
        let Some(lower) = lower_case(&mut stack, name) else {
            encode_literal(buf, 0x00, 4, 0, name, value);
            return;
        };
        let static_index = static_index_of_lower(lower);
        let how = indexing(static_index, lower, value, self.table.capacity);
        let mut name_index = static_index.unwrap_or(0);
        // Fields kept out of the table are not looked for in it.
        if how == Indexing::Incremental {
            let (exact, named) = self.table.find(lower, value, static_index.is_none());
            if let Some(i) = exact {
                encode_int(buf, 0x80, 7, STATIC_TABLE.len() + 1 + i);
                return;
            }
            if let Some(i) = named {
                name_index = STATIC_TABLE.len() + 1 + i;
            }
        }
        let (pattern, prefix_bits) = match how {
            Indexing::Incremental => (0x40, 6),
            Indexing::Without => (0x00, 4),
            Indexing::Never => (0x10, 4),
        };
        encode_literal(buf, pattern, prefix_bits, name_index, lower, value);
        if how == Indexing::Incremental {
            self.table.insert(Entry::new(lower, value));
        }
    }
}

/// Whether a field not in the table should enter it. The names it keeps out
/// are all in the static table, so `static_index` decides: no string
/// compare.
fn indexing(
    static_index: Option<usize>,
    lower_name: &[u8],
    value: &[u8],
    capacity: usize,
) -> Indexing {
    match static_index {
        // authorization, cookie, proxy-authorization, set-cookie.
        Some(23 | 32 | 49 | 55) => Indexing::Never,
        // :path, age, content-length, content-range, etag, last-modified,
        // location.
        Some(4 | 21 | 28 | 30 | 34 | 44 | 46) => Indexing::Without,
        // An entry that would take most of the table would evict everything
        // else for one field.
        _ if (lower_name.len() + value.len() + ENTRY_OVERHEAD).saturating_mul(4)
            > capacity.saturating_mul(3) =>
        {
            Indexing::Without
        }
        _ => Indexing::Incremental,
    }
}

/// `name` lower-cased into `stack`, or `None` when it is longer than
/// `stack`. Eight bytes at a time: a name's case is folded with a few word
/// operations instead of a branch per byte (the rest of the name's last word
/// is folded too, and not returned; bytes of 0x80 and up are left as they
/// are).
fn lower_case<'s>(stack: &'s mut [u8; ENCODER_NAME_MAX], name: &[u8]) -> Option<&'s [u8]> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    stack.get_mut(..name.len())?.copy_from_slice(name);
    let words = name.len().div_ceil(8) * 8;
    for chunk in stack[..words].chunks_exact_mut(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let low7 = x & !HIGH;
        // Each byte's top bit: set when its low seven bits are at least
        // 'A', and when they are above 'Z'; no carry crosses a byte.
        let ge_a = low7 + ONES * u64::from(0x80 - b'A');
        let gt_z = low7 + ONES * u64::from(0x80 - b'Z' - 1);
        let upper = ge_a & !gt_z & !x & HIGH;
        chunk.copy_from_slice(&(x | (upper >> 2)).to_le_bytes());
    }
    stack.get(..name.len())
}

/// Writes a literal field under `pattern` with a `prefix_bits`-bit name
/// index (RFC 7541 6.2): name index `name_index`, or when it is 0 the
/// literal `name` lower-cased, then the raw `value`.
fn encode_literal(
    buf: &mut BytesMut,
    pattern: u8,
    prefix_bits: u32,
    name_index: usize,
    name: &[u8],
    value: &[u8],
) {
    // Two integers of at most 11 bytes each.
    buf.reserve(name.len().saturating_add(value.len()).saturating_add(21));
    if name_index != 0 {
        // The common case, in one copy: name index and value length
        // assembled on the stack.
        let mut head = [0u8; 20];
        let n = int_bytes(&mut head, pattern, prefix_bits, name_index);
        let m = int_bytes(&mut head[n..], 0x00, 7, value.len());
        buf.extend_from_slice(&head[..n + m]);
        buf.extend_from_slice(value);
        return;
    }
    encode_int(buf, pattern, prefix_bits, 0);
    encode_int(buf, 0x00, 7, name.len());
    buf.extend(name.iter().map(u8::to_ascii_lowercase));
    encode_int(buf, 0x00, 7, value.len());
    buf.extend_from_slice(value);
}

/// Writes `value` as an HPACK integer into `out` (at least 11 bytes, enough
/// for any `usize`); returns the bytes written.
fn int_bytes(out: &mut [u8], pattern: u8, prefix_bits: u32, value: usize) -> usize {
    let max_prefix = (1u8 << prefix_bits) - 1;
    let Some(mut rest) = value.checked_sub(usize::from(max_prefix)) else {
        out[0] = pattern | value as u8;
        return 1;
    };
    out[0] = pattern | max_prefix;
    let mut n = 1;
    while rest >= 0x80 {
        out[n] = 0x80 | (rest & 0x7f) as u8;
        rest >>= 7;
        n += 1;
    }
    out[n] = rest as u8;
    n + 1
}

/// The first static table index whose name is `lower`, a lower-case name:
/// one `match` (a length switch and a compare).
fn static_index_of_lower(lower: &[u8]) -> Option<usize> {
    Some(match lower {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b":status" => 8,
        b"accept-charset" => 15,
        b"accept-encoding" => 16,
        b"accept-language" => 17,
        b"accept-ranges" => 18,
        b"accept" => 19,
        b"access-control-allow-origin" => 20,
        b"age" => 21,
        b"allow" => 22,
        b"authorization" => 23,
        b"cache-control" => 24,
        b"content-disposition" => 25,
        b"content-encoding" => 26,
        b"content-language" => 27,
        b"content-length" => 28,
        b"content-location" => 29,
        b"content-range" => 30,
        b"content-type" => 31,
        b"cookie" => 32,
        b"date" => 33,
        b"etag" => 34,
        b"expect" => 35,
        b"expires" => 36,
        b"from" => 37,
        b"host" => 38,
        b"if-match" => 39,
        b"if-modified-since" => 40,
        b"if-none-match" => 41,
        b"if-range" => 42,
        b"if-unmodified-since" => 43,
        b"last-modified" => 44,
        b"link" => 45,
        b"location" => 46,
        b"max-forwards" => 47,
        b"proxy-authenticate" => 48,
        b"proxy-authorization" => 49,
        b"range" => 50,
        b"referer" => 51,
        b"refresh" => 52,
        b"retry-after" => 53,
        b"server" => 54,
        b"set-cookie" => 55,
        b"strict-transport-security" => 56,
        b"transfer-encoding" => 57,
        b"user-agent" => 58,
        b"vary" => 59,
        b"via" => 60,
        b"www-authenticate" => 61,
        _ => return None,
    })
}

/// Writes `value` as an HPACK integer with a `prefix_bits`-bit prefix (4 to
/// 7) under the representation's pattern bits `pattern` (RFC 7541 5.1).
fn encode_int(buf: &mut BytesMut, pattern: u8, prefix_bits: u32, value: usize) {
    let max_prefix = (1u8 << prefix_bits) - 1;
    let Some(mut rest) = value.checked_sub(usize::from(max_prefix)) else {
        // value < max_prefix, so it fits in the prefix.
        buf.put_u8(pattern | value as u8);
        return;
    };
    buf.put_u8(pattern | max_prefix);
    while rest >= 0x80 {
        buf.put_u8(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    buf.put_u8(rest as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Fields, DecodeError> {
        let mut fields = Vec::new();
        decoder.decode(block, |n, v| fields.push((n.to_vec(), v.to_vec())))?;
        Ok(fields)
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// The dynamic table's entries, newest first.
    fn table(decoder: &Decoder) -> Fields {
        entries(&decoder.table)
    }

    /// A dynamic table's entries, newest first.
    fn entries(table: &DynamicTable) -> Fields {
        table
            .entries
            .iter()
            .map(|e| {
                let (n, v) = e.parts();
                (n.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// Decodes `block` and checks the fields, the table and its size.
    fn step(
        decoder: &mut Decoder,
        block: &str,
        want: &[(&str, &str)],
        want_table: &[(&str, &str)],
        want_size: usize,
    ) {
        assert_eq!(decode(decoder, &hex(block)).unwrap(), fields(want));
        assert_eq!(table(decoder), fields(want_table));
        assert_eq!(decoder.table.size, want_size);
    }

    fn encode(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut buf = BytesMut::new();
        f(&mut buf);
        buf.to_vec()
    }

    // RFC 7541 Appendix C.2.

    #[test]
    fn c2_1_literal_with_indexing() {
        let mut d = Decoder::new(4096);
        step(
            &mut d,
            "400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572",
            &[("custom-key", "custom-header")],
            &[("custom-key", "custom-header")],
            55,
        );
    }

    #[test]
    fn c2_2_literal_without_indexing() {
        let mut d = Decoder::new(4096);
        step(
            &mut d,
            "040c 2f73 616d 706c 652f 7061 7468",
            &[(":path", "/sample/path")],
            &[],
            0,
        );
    }

    #[test]
    fn c2_3_literal_never_indexed() {
        let mut d = Decoder::new(4096);
        step(
            &mut d,
            "1008 7061 7373 776f 7264 0673 6563 7265 74",
            &[("password", "secret")],
            &[],
            0,
        );
    }

    #[test]
    fn c2_4_indexed() {
        let mut d = Decoder::new(4096);
        step(&mut d, "82", &[(":method", "GET")], &[], 0);
    }

    // RFC 7541 Appendix C.3 and C.4: requests on one connection.

    const REQ1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const REQ2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQ3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const REQ_TABLE1: &[(&str, &str)] = &[(":authority", "www.example.com")];
    const REQ_TABLE2: &[(&str, &str)] = &[
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const REQ_TABLE3: &[(&str, &str)] = &[
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];

    #[test]
    fn c3_requests_without_huffman() {
        let mut d = Decoder::new(4096);
        step(
            &mut d,
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            REQ1,
            REQ_TABLE1,
            57,
        );
        step(
            &mut d,
            "8286 84be 5808 6e6f 2d63 6163 6865",
            REQ2,
            REQ_TABLE2,
            110,
        );
        step(
            &mut d,
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            REQ3,
            REQ_TABLE3,
            164,
        );
    }

    #[test]
    fn c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        step(
            &mut d,
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            REQ1,
            REQ_TABLE1,
            57,
        );
        step(
            &mut d,
            "8286 84be 5886 a8eb 1064 9cbf",
            REQ2,
            REQ_TABLE2,
            110,
        );
        step(
            &mut d,
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            REQ3,
            REQ_TABLE3,
            164,
        );
    }

    // RFC 7541 Appendix C.5 and C.6: responses with a 256-byte table, so
    // entries get evicted.

    const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const LOCATION: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";

    fn responses(blocks: [&str; 3]) {
        let mut d = Decoder::new(256);
        step(
            &mut d,
            blocks[0],
            &[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", DATE1),
                ("location", LOCATION),
            ],
            &[
                ("location", LOCATION),
                ("date", DATE1),
                ("cache-control", "private"),
                (":status", "302"),
            ],
            222,
        );
        step(
            &mut d,
            blocks[1],
            &[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", DATE1),
                ("location", LOCATION),
            ],
            &[
                (":status", "307"),
                ("location", LOCATION),
                ("date", DATE1),
                ("cache-control", "private"),
            ],
            222,
        );
        step(
            &mut d,
            blocks[2],
            &[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", DATE2),
                ("location", LOCATION),
                ("content-encoding", "gzip"),
                ("set-cookie", COOKIE),
            ],
            &[
                ("set-cookie", COOKIE),
                ("content-encoding", "gzip"),
                ("date", DATE2),
            ],
            215,
        );
    }

    #[test]
    fn c5_responses_without_huffman() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ]);
    }

    #[test]
    fn c6_responses_with_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    // Other decoder behaviour.

    #[test]
    fn literal_name_from_an_entry_the_insert_evicts() {
        // Table of 60 bytes: "ab: cd" is 36 bytes; a second entry named
        // after it (index 62) must evict it, and still get its name.
        let mut d = Decoder::new(60);
        decode(&mut d, &hex("4002 6162 0263 64")).unwrap();
        assert_eq!(
            decode(&mut d, &hex("7e02 6566")).unwrap(),
            fields(&[("ab", "ef")])
        );
        assert_eq!(table(&d), fields(&[("ab", "ef")]));
        assert_eq!(d.table.size, 36);
    }

    #[test]
    fn entry_larger_than_the_table_empties_it() {
        let mut d = Decoder::new(40);
        decode(&mut d, &hex("4002 6162 0263 64")).unwrap();
        assert_eq!(d.table.size, 36);
        // 2 + 7 + 32 = 41 > 40.
        let got = decode(&mut d, &hex("4002 6162 0763 6465 6667 6869")).unwrap();
        assert_eq!(got, fields(&[("ab", "cdefghi")]));
        assert_eq!(table(&d), Fields::new());
        assert_eq!(d.table.size, 0);
    }

    #[test]
    fn size_updates_at_the_start_evict() {
        let mut d = Decoder::new(4096);
        decode(&mut d, &hex("4002 6162 0263 64")).unwrap();
        // Two updates (0, then 4096) and a field that reads index 62: gone.
        assert_eq!(
            decode(&mut d, &hex("20 3fe1 1f be")),
            Err(DecodeError::IndexOutOfRange)
        );
        assert_eq!(d.table.size, 0);
        assert_eq!(d.table.capacity, 4096);
        // A block of only a size update is valid.
        assert_eq!(decode(&mut d, &hex("3f e1 1f")).unwrap(), Fields::new());
    }

    #[test]
    fn indexed_dynamic_entries_count_from_62() {
        let mut d = Decoder::new(4096);
        decode(&mut d, &hex("4002 6162 0263 64 4002 6566 0267 68")).unwrap();
        assert_eq!(
            decode(&mut d, &hex("be bf")).unwrap(),
            fields(&[("ef", "gh"), ("ab", "cd")])
        );
        assert_eq!(
            decode(&mut d, &hex("c0")),
            Err(DecodeError::IndexOutOfRange)
        );
    }

    #[test]
    fn multi_byte_integers_decode() {
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix, as a size update.
        let mut d = Decoder::new(4096);
        decode(&mut d, &hex("3f 9a 0a")).unwrap();
        assert_eq!(d.table.capacity, 1337);
        // Index 61 (www-authenticate) with a 7-bit prefix needs no
        // continuation; 127 + 0 needs one.
        assert_eq!(
            decode(&mut d, &hex("bd")).unwrap(),
            fields(&[("www-authenticate", "")])
        );
        assert_eq!(
            decode(&mut d, &hex("ff 00")),
            Err(DecodeError::IndexOutOfRange)
        );
    }

    // Errors.

    #[test]
    fn index_zero_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(decode(&mut d, &[0x80]), Err(DecodeError::ZeroIndex));
    }

    #[test]
    fn index_past_the_tables_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(decode(&mut d, &[0xbe]), Err(DecodeError::IndexOutOfRange));
        // As a name index of a literal.
        assert_eq!(
            decode(&mut d, &hex("7e 0161")),
            Err(DecodeError::IndexOutOfRange)
        );
        assert_eq!(
            decode(&mut d, &hex("0f 2f 0161")),
            Err(DecodeError::IndexOutOfRange)
        );
    }

    #[test]
    fn integer_overflow_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &hex("ff ff ff ff ff ff ff ff ff 7f")),
            Err(DecodeError::IntegerTooLarge)
        );
        // Five continuation bytes, even when they add little.
        assert_eq!(
            decode(&mut d, &hex("ff 80 80 80 80 00")),
            Err(DecodeError::IntegerTooLarge)
        );
        // A string length.
        assert_eq!(
            decode(&mut d, &hex("00 7f ff ff ff ff 0f")),
            Err(DecodeError::IntegerTooLarge)
        );
    }

    #[test]
    fn truncated_representations_are_errors() {
        let mut d = Decoder::new(4096);
        assert_eq!(decode(&mut d, &hex("ff")), Err(DecodeError::Truncated));
        assert_eq!(decode(&mut d, &hex("ff 80")), Err(DecodeError::Truncated));
        assert_eq!(decode(&mut d, &hex("40")), Err(DecodeError::Truncated));
        assert_eq!(decode(&mut d, &hex("4001 61")), Err(DecodeError::Truncated));
    }

    #[test]
    fn string_past_the_end_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &hex("4005 6162")),
            Err(DecodeError::StringPastEnd)
        );
        assert_eq!(
            decode(&mut d, &hex("0401 6162 02 63")),
            Err(DecodeError::StringPastEnd)
        );
        assert_eq!(
            decode(&mut d, &hex("04 8a ff")),
            Err(DecodeError::StringPastEnd)
        );
    }

    #[test]
    fn huffman_with_eos_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &hex("04 84 ffff ffff")),
            Err(DecodeError::HuffmanEos)
        );
    }

    #[test]
    fn huffman_with_bad_padding_is_an_error() {
        let mut d = Decoder::new(4096);
        // 'a' then 000.
        assert_eq!(
            decode(&mut d, &hex("04 81 18")),
            Err(DecodeError::HuffmanPadding)
        );
        // 'a' then 11 ones.
        assert_eq!(
            decode(&mut d, &hex("04 82 1fff")),
            Err(DecodeError::HuffmanPadding)
        );
        // In a name.
        assert_eq!(
            decode(&mut d, &hex("00 81 ff 00")),
            Err(DecodeError::HuffmanPadding)
        );
    }

    #[test]
    fn size_update_above_the_max_is_an_error() {
        let mut d = Decoder::new(256);
        // 31 + 98 + 128 = 257.
        assert_eq!(
            decode(&mut d, &hex("3f e2 01")),
            Err(DecodeError::TableSizeTooLarge)
        );
        decode(&mut d, &hex("3f e1 01")).unwrap();
        assert_eq!(d.table.capacity, 256);
    }

    #[test]
    fn size_update_after_a_field_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &hex("82 20")),
            Err(DecodeError::SizeUpdateNotAtStart)
        );
    }

    #[test]
    fn three_size_updates_are_an_error() {
        let mut d = Decoder::new(4096);
        decode(&mut d, &hex("20 3fe1 1f 82")).unwrap();
        assert_eq!(
            decode(&mut d, &hex("20 20 20 82")),
            Err(DecodeError::TooManySizeUpdates)
        );
    }

    // Encoder.

    #[test]
    fn encode_status_indexed() {
        assert_eq!(encode(|b| encode_status(b, 200)), [0x88]);
        let all = encode(|b| {
            for s in [200, 204, 206, 304, 400, 404, 500] {
                encode_status(b, s);
            }
        });
        assert_eq!(all, [0x88, 0x89, 0x8a, 0x8b, 0x8c, 0x8d, 0x8e]);
    }

    #[test]
    fn encode_status_literal() {
        assert_eq!(encode(|b| encode_status(b, 201)), b"\x08\x03201");
        assert_eq!(encode(|b| encode_status(b, 999)), b"\x08\x03999");
    }

    /// Encodes fields with a fresh encoder.
    fn fresh(list: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut e = Encoder::new();
        encode(|b| {
            for (n, v) in list {
                e.field(b, n, v);
            }
        })
    }

    #[test]
    fn a_repeating_field_enters_the_table_and_is_indexed_after() {
        let mut e = Encoder::new();
        // content-type is static index 31: literal with incremental
        // indexing, 31 in its 6-bit prefix.
        let first = encode(|b| e.field(b, b"content-type", b"text/plain"));
        assert_eq!(first, b"\x5f\x0atext/plain");
        // Then it is dynamic index 62.
        let again = encode(|b| e.field(b, b"Content-Type", b"text/plain"));
        assert_eq!(again, [0x80 | 62]);
        // A new value of the same name also enters; the old entry is 63 now.
        let html = encode(|b| e.field(b, b"content-type", b"text/html"));
        assert_eq!(html, b"\x5f\x09text/html");
        let old = encode(|b| e.field(b, b"content-type", b"text/plain"));
        assert_eq!(old, [0x80 | 63]);
    }

    #[test]
    fn an_unknown_name_enters_and_later_values_use_its_index() {
        let mut e = Encoder::new();
        let first = encode(|b| e.field(b, b"X-Trace", b"1"));
        assert_eq!(first, b"\x40\x07x-trace\x011");
        // Another value: the name is dynamic index 62 (6-bit prefix).
        let second = encode(|b| e.field(b, b"x-trace", b"2"));
        assert_eq!(second, b"\x7e\x012");
    }

    #[test]
    fn fields_that_differ_per_response_stay_out_of_the_table() {
        // Literals without indexing: index 4 fits in the 4-bit prefix, 21
        // is 15 in it and 6 after.
        assert_eq!(fresh(&[(b":path", b"/x")]), b"\x04\x02/x");
        assert_eq!(fresh(&[(b"age", b"")]), b"\x0f\x06\x00");
        for name in [
            &b"content-length"[..],
            b"etag",
            b"last-modified",
            b"location",
            b"content-range",
        ] {
            let mut e = Encoder::new();
            let one = encode(|b| e.field(b, name, b"7"));
            let two = encode(|b| e.field(b, name, b"7"));
            assert_eq!(one, two, "{:?}", std::str::from_utf8(name));
            assert_eq!(one[0] & 0xf0, 0x00, "{:?}", std::str::from_utf8(name));
            assert!(e.table.entries.is_empty());
        }
    }

    #[test]
    fn secrets_are_never_indexed() {
        for name in [&b"set-cookie"[..], b"Authorization", b"cookie"] {
            let mut e = Encoder::new();
            let one = encode(|b| e.field(b, name, b"id=1"));
            assert_eq!(one[0] & 0xf0, 0x10, "{:?}", std::str::from_utf8(name));
            assert_eq!(one, encode(|b| e.field(b, name, b"id=1")));
            assert!(e.table.entries.is_empty());
        }
        assert_eq!(fresh(&[(b"x", b"")])[0], 0x40);
    }

    #[test]
    fn a_field_larger_than_most_of_the_table_is_not_indexed() {
        let big = vec![b'v'; 3100];
        let mut e = Encoder::new();
        let out = encode(|b| e.field(b, b"x-big", &big));
        assert_eq!(out[0], 0x00);
        assert!(e.table.entries.is_empty());
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        assert_eq!(decode(&mut d, &out).unwrap(), [(b"x-big".to_vec(), big)]);
    }

    #[test]
    fn a_long_name_is_a_literal() {
        let name = vec![b'N'; ENCODER_NAME_MAX + 1];
        let out = fresh(&[(&name, b"v")]);
        assert_eq!(out[..3], [0x00, 0x41, b'n']);
        assert_eq!(out[out.len() - 2..], [0x01, b'v']);
    }

    #[test]
    fn names_are_lower_cased_a_word_at_a_time() {
        let mut stack = [0u8; ENCODER_NAME_MAX];
        for name in [
            &b""[..],
            b"A",
            b"Content-Type",
            b"X-Forwarded-For-Something-Long",
            b"@AZ[`az{",
            b"\xc1\xda\x80\xff-Mixed",
            &[b'Z'; ENCODER_NAME_MAX],
        ] {
            assert_eq!(
                lower_case(&mut stack, name).unwrap(),
                name.to_ascii_lowercase(),
                "{name:?}"
            );
        }
        let all: Vec<u8> = (0..=255).collect();
        for chunk in all.chunks(ENCODER_NAME_MAX) {
            let mut stack = [0u8; ENCODER_NAME_MAX];
            assert_eq!(
                lower_case(&mut stack, chunk).unwrap(),
                chunk.to_ascii_lowercase()
            );
        }
        assert!(lower_case(&mut stack, &[b'a'; ENCODER_NAME_MAX + 1]).is_none());
    }

    #[test]
    fn static_name_lookup_agrees_with_the_table() {
        for (name, _) in STATIC_TABLE.iter() {
            let first = STATIC_TABLE.iter().position(|(n, _)| n == name).unwrap() + 1;
            assert_eq!(static_index_of_lower(name), Some(first), "{:?}", name);
        }
        assert_eq!(static_index_of_lower(b"x-custom"), None);
        assert_eq!(static_index_of_lower(&[b'a'; 100]), None);
        assert_eq!(static_index_of_lower(b""), None);
    }

    #[test]
    fn a_long_value_has_a_multi_byte_length() {
        let value = vec![b'v'; 300];
        let out = fresh(&[(b"x", &value)]);
        // 300 = 127 + 173 and 173 = 45 + 128: 0x7f, then 45 with the
        // continuation bit (0xad), then 1.
        assert_eq!(out[..5], [0x40, 0x01, b'x', 0x7f, 0xad]);
        assert_eq!(out[5], 0x01);
        assert_eq!(out[6..], value[..]);
    }

    #[test]
    fn a_smaller_peer_table_is_announced_and_used() {
        let mut e = Encoder::new();
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
        let block = encode(|b| {
            e.begin_block(b);
            e.field(b, b"server", b"a");
        });
        assert_eq!(block[0], 0x40 | 54);
        decode(&mut d, &block).unwrap();
        // The peer lowers its table to 0, then allows 100: both updates,
        // smallest first, and the entry is gone on both sides.
        e.set_peer_table_size(0);
        e.set_peer_table_size(100);
        assert!(e.table.entries.is_empty());
        let block = encode(|b| {
            e.begin_block(b);
            e.field(b, b"server", b"a");
            e.field(b, b"server", b"a");
        });
        assert_eq!(block[..4], [0x20, 0x3f, 0x45, 0x40 | 54]);
        assert_eq!(block[block.len() - 1], 0x80 | 62);
        assert_eq!(
            decode(&mut d, &block).unwrap(),
            fields(&[("server", "a"), ("server", "a")])
        );
        // Nothing owed for the next block; a peer table larger than ours
        // leaves us at our maximum.
        assert_eq!(encode(|b| e.begin_block(b)), b"");
        e.set_peer_table_size(1 << 20);
        assert_eq!(e.table.capacity, ENCODER_TABLE_MAX);
        // A table of 0 indexes nothing.
        e.set_peer_table_size(0);
        let block = encode(|b| {
            e.begin_block(b);
            e.field(b, b"server", b"a");
        });
        assert_eq!(block[..2], [0x20, 0x0f]);
        assert!(e.table.entries.is_empty());
    }

    // Properties.

    /// A representation, valid or not, for building blocks that get deeper
    /// into the decoder than uniformly random bytes do.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        let string = proptest::collection::vec(any::<u8>(), 0..40);
        prop_oneof![
            (1u8..80).prop_map(|i| vec![0x80 | i.min(0x7f)]),
            (0u8..64, string.clone(), any::<bool>()).prop_map(|(i, v, huff)| {
                let mut out = vec![0x40 | i.min(0x3f)];
                if i == 0 {
                    out.extend([0x01, b'n']);
                }
                push_string(&mut out, &v, huff);
                out
            }),
            (0u8..16, string, any::<bool>()).prop_map(|(i, v, huff)| {
                let mut out = vec![i];
                if i == 0 {
                    out.extend([0x01, b'n']);
                }
                push_string(&mut out, &v, huff);
                out
            }),
            (0u8..31).prop_map(|s| vec![0x20 | s]),
            proptest::collection::vec(any::<u8>(), 0..8),
        ]
    }

    fn push_string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
        let coded = if huffman {
            huffman::encode(s)
        } else {
            s.to_vec()
        };
        let mut buf = BytesMut::new();
        encode_int(&mut buf, if huffman { 0x80 } else { 0 }, 7, coded.len());
        out.extend_from_slice(&buf);
        out.extend_from_slice(&coded);
    }

    fn check_table(d: &Decoder) {
        let sum: usize = d.table.entries.iter().map(Entry::size).sum();
        assert_eq!(d.table.size, sum);
        assert!(d.table.size <= d.table.capacity);
        assert!(d.table.capacity <= d.max_table_size);
    }

    /// A name from the static table in random ASCII case, or random bytes.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        let names: Vec<&'static [u8]> = STATIC_TABLE.iter().map(|(n, _)| *n).collect();
        prop_oneof![
            (proptest::sample::select(names), any::<u64>()).prop_map(|(n, mask)| {
                n.iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        if (mask >> (i % 64)) & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect()
            }),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(
            size in 0usize..512,
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..4),
        ) {
            let mut d = Decoder::new(size);
            for block in blocks {
                let _ = d.decode(&block, |_, _| {});
                check_table(&d);
            }
        }

        #[test]
        fn random_representations_never_panic(
            size in 0usize..300,
            blocks in proptest::collection::vec(proptest::collection::vec(piece(), 0..12), 1..6),
        ) {
            let mut d = Decoder::new(size);
            for pieces in blocks {
                let block = pieces.concat();
                let _ = d.decode(&block, |_, _| {});
                check_table(&d);
            }
        }

        #[test]
        fn encoded_fields_decode_back(
            status in proptest::option::of(100u16..=999),
            list in proptest::collection::vec(
                (name(), proptest::collection::vec(any::<u8>(), 0..300)),
                0..12,
            ),
        ) {
            let mut buf = BytesMut::new();
            let mut want = Fields::new();
            if let Some(status) = status {
                encode_status(&mut buf, status);
                want.push((b":status".to_vec(), status.to_string().into_bytes()));
            }
            let mut e = Encoder::new();
            for (n, v) in &list {
                e.field(&mut buf, n, v);
                want.push((n.to_ascii_lowercase(), v.clone()));
            }
            let mut d = Decoder::new(DEFAULT_TABLE_SIZE);
            prop_assert_eq!(decode(&mut d, &buf).unwrap(), want);
        }

        /// Many blocks on one connection, with fields that repeat, evict
        /// each other and change the peer's table size between blocks:
        /// the peer's decoder always reads back what was encoded, and its
        /// table holds what the encoder's holds.
        #[test]
        fn an_encoder_and_a_decoder_stay_in_step(
            blocks in proptest::collection::vec(
                (
                    proptest::option::of(0usize..5000),
                    proptest::collection::vec(
                        (
                            prop_oneof![
                                Just(b"server".to_vec()),
                                Just(b"Content-Type".to_vec()),
                                Just(b"x-a".to_vec()),
                                Just(b"set-cookie".to_vec()),
                                Just(b"etag".to_vec()),
                                name(),
                            ],
                            prop_oneof![
                                Just(b"a".to_vec()),
                                Just(b"b".to_vec()),
                                proptest::collection::vec(any::<u8>(), 0..1500),
                            ],
                        ),
                        0..10,
                    ),
                ),
                1..12,
            ),
        ) {
            let mut e = Encoder::new();
            let mut d = Decoder::new(ENCODER_TABLE_MAX);
            for (size, list) in blocks {
                if let Some(size) = size {
                    e.set_peer_table_size(size);
                }
                let mut buf = BytesMut::new();
                e.begin_block(&mut buf);
                let mut want = Fields::new();
                for (n, v) in &list {
                    e.field(&mut buf, n, v);
                    want.push((n.to_ascii_lowercase(), v.clone()));
                }
                prop_assert_eq!(decode(&mut d, &buf).unwrap(), want);
                prop_assert_eq!(table(&d), entries(&e.table));
                prop_assert!(e.table.size <= e.table.capacity);
            }
        }
    }
}
