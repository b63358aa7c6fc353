//! HPACK's Huffman code (RFC 7541 section 5.2 and Appendix B), decoding only.
//!
//! Our encoder never Huffman-codes (see the `hpack` module), so only the
//! decoder is here. It walks the code four bits at a time through a table of
//! 256 states × 16 nibbles, one state per internal node of the code tree. The
//! table is computed at compile time from [`CODES`], so a wrong code table
//! (overlapping codes, or a code that does not cover every bit string) fails
//! the build instead of misdecoding at run time.

/// `(code, length in bits)` for bytes 0..=255, then EOS at index 256.
///
/// Normative data copied from RFC 7541 Appendix B ("code as hex aligned to
/// LSB" and "len in bits").
const CODES: [(u32, u8); 257] = [
    // 0..=31: control characters
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    // 32..=47: ' ' ! " # $ % & ' ( ) * + , - . /
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    // 48..=63: 0-9 : ; < = > ?
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    // 64..=95: @ A-Z [ \ ] ^ _
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    // 96..=127: ` a-z { | } ~ DEL
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    // 128..=159
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    // 160..=191
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    // 192..=223
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    // 224..=255
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    // 256: EOS
    (0x3fffffff, 30),
];

/// The EOS symbol's index in [`CODES`].
const EOS: u16 = 256;

/// Internal nodes of the code tree: 257 leaves in a full binary tree.
const NODES: usize = 256;

/// Why a Huffman-coded string is invalid (RFC 7541 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HuffmanError {
    /// The string contains the EOS symbol.
    Eos,
    /// The final partial code is longer than 7 bits or not a prefix of EOS
    /// (all ones).
    Padding,
}

/// What one nibble does from one state.
#[derive(Clone, Copy)]
struct Step {
    /// The state after the nibble: the internal node the walk stopped at.
    next: u8,
    /// The byte completed within the nibble, when `flags` has [`EMIT`].
    sym: u8,
    flags: u8,
}

/// The nibble completed a code: push `sym`.
const EMIT: u8 = 1;
/// The nibble completed EOS, which must not appear in a string.
const FAIL: u8 = 2;

/// The decoding automaton.
struct Table {
    /// `steps[state][nibble]`. Indexing by a `u8` state and a masked nibble
    /// cannot go out of bounds.
    steps: [[Step; 16]; NODES],
    /// States where a string may end: the root (no padding) and the first 7
    /// nodes down the all-ones path (padding that is a prefix of EOS).
    accepting: [bool; NODES],
}

/// Built once, at compile time.
static TABLE: Table = build_table();

/// A child link in the code tree while building: [`EMPTY`], an internal node
/// id (never 0, the root), or [`LEAF`] | symbol.
const EMPTY: u16 = 0;
const LEAF: u16 = 0x8000;

/// Builds the code tree from [`CODES`], then the nibble automaton from the
/// tree. Any inconsistency in [`CODES`] is a compile-time panic.
const fn build_table() -> Table {
    let children = build_tree();
    let mut steps = [[Step {
        next: 0,
        sym: 0,
        flags: FAIL,
    }; 16]; NODES];
    let mut state = 0;
    while state < NODES {
        let mut nibble = 0;
        while nibble < 16 {
            steps[state][nibble] = walk_nibble(&children, state, nibble);
            nibble += 1;
        }
        state += 1;
    }
    Table {
        steps,
        accepting: accepting_states(&children),
    }
}

/// Inserts every code of [`CODES`] into a tree and checks that the code is
/// prefix-free and complete (every internal node has two children).
const fn build_tree() -> [[u16; 2]; NODES] {
    let mut children = [[EMPTY; 2]; NODES];
    let mut nodes = 1; // the root
    let mut sym = 0;
    while sym < CODES.len() {
        let (code, len) = CODES[sym];
        let mut node = 0;
        let mut depth = 1;
        while depth <= len {
            let bit = ((code >> (len - depth)) & 1) as usize;
            let child = children[node][bit];
            if depth == len {
                assert!(child == EMPTY, "HPACK Huffman codes overlap");
                children[node][bit] = LEAF | sym as u16;
            } else if child == EMPTY {
                assert!(nodes < NODES, "HPACK Huffman tree has too many nodes");
                children[node][bit] = nodes as u16;
                node = nodes;
                nodes += 1;
            } else {
                assert!(child & LEAF == 0, "HPACK Huffman codes overlap");
                node = child as usize;
            }
            depth += 1;
        }
        sym += 1;
    }
    assert!(nodes == NODES, "HPACK Huffman tree is not full");
    let mut node = 0;
    while node < NODES {
        assert!(
            children[node][0] != EMPTY && children[node][1] != EMPTY,
            "HPACK Huffman code leaves bit strings undecodable"
        );
        node += 1;
    }
    children
}

/// Follows four bits (most significant first) from `state`. A code has at
/// least 5 bits, so at most one completes within a nibble.
const fn walk_nibble(children: &[[u16; 2]; NODES], state: usize, nibble: usize) -> Step {
    let mut step = Step {
        next: 0,
        sym: 0,
        flags: 0,
    };
    let mut node = state;
    let mut bit = 4;
    while bit > 0 {
        bit -= 1;
        let child = children[node][(nibble >> bit) & 1];
        if child & LEAF == 0 {
            node = child as usize;
            continue;
        }
        let sym = child & !LEAF;
        if sym == EOS {
            step.flags = FAIL;
            return step;
        }
        assert!(step.flags & EMIT == 0, "two HPACK codes in one nibble");
        step.flags = EMIT;
        step.sym = sym as u8;
        node = 0;
    }
    step.next = node as u8;
    step
}

/// Marks the root and the nodes at depth 1..=7 on the all-ones path: ending
/// there means the padding is at most 7 bits of EOS's prefix.
const fn accepting_states(children: &[[u16; 2]; NODES]) -> [bool; NODES] {
    let mut accepting = [false; NODES];
    let mut node = 0;
    let mut depth = 0;
    loop {
        accepting[node] = true;
        if depth == 7 {
            return accepting;
        }
        let child = children[node][1];
        assert!(child & LEAF == 0, "a short all-ones HPACK code");
        node = child as usize;
        depth += 1;
    }
}

/// Appends the decoding of the Huffman-coded `src` to `dst`.
pub(super) fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), HuffmanError> {
    // The shortest code is 5 bits, so 8/5 output bytes per input byte at most.
    dst.reserve(src.len().saturating_mul(8) / 5);
    let mut state = 0;
    for &byte in src {
        state = step(state, byte >> 4, dst)?;
        state = step(state, byte & 0x0f, dst)?;
    }
    if TABLE.accepting[usize::from(state)] {
        Ok(())
    } else {
        Err(HuffmanError::Padding)
    }
}

/// Feeds one nibble to the automaton.
#[inline]
fn step(state: u8, nibble: u8, dst: &mut Vec<u8>) -> Result<u8, HuffmanError> {
    let step = TABLE.steps[usize::from(state)][usize::from(nibble & 0x0f)];
    if step.flags & FAIL != 0 {
        return Err(HuffmanError::Eos);
    }
    if step.flags & EMIT != 0 {
        dst.push(step.sym);
    }
    Ok(step.next)
}

/// Huffman-codes `src` with EOS-prefix padding; the tests use it to build
/// inputs for the decoder.
#[cfg(test)]
pub(super) fn encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len());
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &byte in src {
        let (code, len) = CODES[usize::from(byte)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(src: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    /// The HPACK code is canonical: sorting symbols by (length, value) and
    /// counting up gives every code. Regenerating the codes from the lengths
    /// alone catches a mistyped code or length in [`CODES`].
    #[test]
    fn codes_are_canonical_for_their_lengths() {
        let mut order: Vec<usize> = (0..CODES.len()).collect();
        order.sort_by_key(|&sym| (CODES[sym].1, sym));
        let mut code: u32 = 0;
        let mut prev_len = CODES[order[0]].1;
        for (i, &sym) in order.iter().enumerate() {
            let len = CODES[sym].1;
            if i > 0 {
                code = (code + 1) << (len - prev_len);
            }
            prev_len = len;
            assert_eq!(CODES[sym], (code, len), "symbol {sym}");
        }
        // The last code (EOS) is all ones: the code is complete.
        assert_eq!(code, (1 << 30) - 1);
    }

    #[test]
    fn kraft_sum_is_exactly_one() {
        let sum: u64 = CODES.iter().map(|&(_, len)| 1u64 << (30 - len)).sum();
        assert_eq!(sum, 1 << 30);
    }

    #[test]
    fn rfc_examples_decode() {
        // RFC 7541 C.4.1, C.4.2, C.6.1.
        let cases: [(&[u8], &[u8]); 5] = [
            (
                &[
                    0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
                ],
                b"www.example.com",
            ),
            (&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], b"no-cache"),
            (&[0x64, 0x02], b"302"),
            (&[0xae, 0xc3, 0x77, 0x1a, 0x4b], b"private"),
            (
                &[
                    0x9d, 0x29, 0xad, 0x17, 0x18, 0x63, 0xc7, 0x8f, 0x0b, 0x97, 0xc8, 0xe9, 0xae,
                    0x82, 0xae, 0x43, 0xd3,
                ],
                b"https://www.example.com",
            ),
        ];
        for (src, want) in cases {
            assert_eq!(decoded(src).unwrap(), want);
            assert_eq!(encode(want), src);
        }
    }

    #[test]
    fn empty_string_decodes_to_nothing() {
        assert_eq!(decoded(&[]).unwrap(), b"");
    }

    #[test]
    fn eos_in_the_string_is_rejected() {
        // 30 ones (EOS), then two more ones.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError::Eos));
        // 'a' (00011), then EOS.
        let mut bits: u64 = 0b00011;
        bits = (bits << 30) | 0x3fff_ffff;
        bits <<= 64 - 35;
        let bytes = bits.to_be_bytes();
        assert_eq!(decoded(&bytes[..5]), Err(HuffmanError::Eos));
    }

    #[test]
    fn padding_longer_than_seven_bits_is_rejected() {
        assert_eq!(decoded(&[0xff]), Err(HuffmanError::Padding));
        // 'a' (00011) then 11 bits of ones.
        assert_eq!(decoded(&[0x1f, 0xff]), Err(HuffmanError::Padding));
    }

    #[test]
    fn padding_that_is_not_ones_is_rejected() {
        // 'a' (00011) then 000.
        assert_eq!(decoded(&[0x18]), Err(HuffmanError::Padding));
        // 'a' then 110.
        assert_eq!(decoded(&[0x1e]), Err(HuffmanError::Padding));
        assert_eq!(decoded(&[0x1f]).unwrap(), b"a");
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&encode(&all)).unwrap(), all);
    }

    proptest! {
        #[test]
        fn round_trip(src in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(decoded(&encode(&src)).unwrap(), src);
        }

        #[test]
        fn random_input_never_panics(src in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decoded(&src);
        }
    }
}
