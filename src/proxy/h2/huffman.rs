//! The Huffman code of HPACK (RFC 7541, Appendix B): symbol `i` is the `len` low bits of
//! `code`, most significant bit first. The 257th symbol, EOS (`0x3fffffff`, 30 bits), is
//! never sent; its prefix pads the last byte of an encoded string.

/// `(code, len)` of each byte value.
pub const CODES: [(u32, u8); 256] = [
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
];
/// The decoder's tree: node `n` has children `TREE[n][bit]`, each either a node index or a
/// leaf (`LEAF | symbol`). Node 0 is the root. Built at compile time from [`CODES`].
const LEAF: u16 = 0x8000;
const EOS: u16 = 256;
const NODES: usize = 256;

static TREE: [[u16; 2]; NODES] = build_tree();

const fn build_tree() -> [[u16; 2]; NODES] {
    // 0 marks "no child yet": the root is never anyone's child.
    let mut tree = [[0u16; 2]; NODES];
    let mut used = 1;
    let mut sym = 0;
    while sym <= 256 {
        let (code, len) = if sym == 256 {
            (0x3fff_ffff, 30)
        } else {
            (CODES[sym].0, CODES[sym].1 as u32)
        };
        let mut node = 0;
        let mut i = len;
        while i > 1 {
            i -= 1;
            let bit = ((code >> i) & 1) as usize;
            if tree[node][bit] == 0 {
                tree[node][bit] = used as u16;
                used += 1;
            }
            node = tree[node][bit] as usize;
        }
        tree[node][(code & 1) as usize] = LEAF | sym as u16;
        sym += 1;
    }
    assert!(
        used == NODES,
        "a prefix code of 257 symbols has 256 inner nodes"
    );
    tree
}

/// A Huffman-coded string that breaks RFC 7541 section 5.2: EOS inside it, or padding that
/// is longer than 7 bits or not the prefix of EOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadHuffman;

/// The decoder's table, four bits at a time: from inner node `n`, nibble `b` leads to
/// `NIBBLES[n][b]`: the node reached (low 8 bits), the symbol completed on the way (bits
/// 8..16, if `EMIT`), or `FAIL` for EOS. No code is shorter than 5 bits, so one nibble
/// completes at most one symbol. Built at compile time from [`TREE`].
const EMIT: u32 = 1 << 16;
const FAIL: u32 = 1 << 17;

static NIBBLES: [[u32; 16]; NODES] = build_nibbles();

const fn build_nibbles() -> [[u32; 16]; NODES] {
    let mut table = [[0u32; 16]; NODES];
    let mut node = 0;
    while node < NODES {
        let mut nibble = 0;
        while nibble < 16 {
            let mut cur = node;
            let mut entry = 0u32;
            let mut i = 4;
            while i > 0 {
                i -= 1;
                let next = TREE[cur][(nibble >> i) & 1];
                if next & LEAF != 0 {
                    let sym = next & !LEAF;
                    if sym == EOS {
                        entry |= FAIL;
                    } else {
                        entry |= EMIT | ((sym as u32) << 8);
                    }
                    cur = 0;
                } else {
                    cur = next as usize;
                }
            }
            table[node][nibble] = entry | cur as u32;
            nibble += 1;
        }
        node += 1;
    }
    table
}

/// The nodes a string may end on: the root, and those reached from it by at most seven
/// one-bits (padding is the start of EOS, and shorter than a byte).
static ACCEPT: [bool; NODES] = build_accept();

const fn build_accept() -> [bool; NODES] {
    let mut accept = [false; NODES];
    accept[0] = true;
    let mut node = 0;
    let mut depth = 0;
    while depth < 7 {
        let next = TREE[node][1];
        if next & LEAF != 0 {
            break;
        }
        node = next as usize;
        accept[node] = true;
        depth += 1;
    }
    accept
}

/// Appends the decoding of `src` to `out`.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), BadHuffman> {
    out.reserve(src.len() * 8 / 5);
    let mut state = 0usize;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let entry = NIBBLES[state][nibble as usize];
            if entry & FAIL != 0 {
                return Err(BadHuffman);
            }
            if entry & EMIT != 0 {
                out.push((entry >> 8) as u8);
            }
            state = (entry & 0xff) as usize;
        }
    }
    if !ACCEPT[state] {
        return Err(BadHuffman);
    }
    Ok(())
}

/// The same decoding a bit at a time, straight from the tree: the table's reference.
#[cfg(test)]
fn decode_bits(src: &[u8], out: &mut Vec<u8>) -> Result<(), BadHuffman> {
    let mut node = 0usize;
    // Bits read since the last symbol, and whether all were ones (a valid padding so far).
    let mut depth = 0u32;
    let mut ones = true;
    for &byte in src {
        let mut i = 8;
        while i > 0 {
            i -= 1;
            let bit = (byte >> i) & 1;
            let next = TREE[node][bit as usize];
            if next & LEAF != 0 {
                let sym = next & !LEAF;
                if sym == EOS {
                    return Err(BadHuffman);
                }
                out.push(sym as u8);
                node = 0;
                depth = 0;
                ones = true;
            } else {
                node = next as usize;
                depth += 1;
                ones &= bit == 1;
            }
        }
    }
    if depth > 7 || !ones {
        return Err(BadHuffman);
    }
    Ok(())
}

/// The Huffman encoding of `src` (for tests and for clients of the decoder's tests: the
/// proxy itself sends strings as they are).
#[cfg(test)]
pub fn encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in src {
        let (code, len) = CODES[b as usize];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        // Pad with the most significant bits of EOS (all ones).
        out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2::hex;

    /// The Huffman-coded strings of RFC 7541, Appendix C.4 and C.6.
    const RFC: &[(&str, &str)] = &[
        ("www.example.com", "f1e3 c2e5 f23a 6ba0 ab90 f4ff"),
        ("no-cache", "a8eb 1064 9cbf"),
        ("custom-key", "25a8 49e9 5ba9 7d7f"),
        ("custom-value", "25a8 49e9 5bb8 e8b4 bf"),
        ("302", "6402"),
        ("private", "aec3 771a 4b"),
        (
            "Mon, 21 Oct 2013 20:13:21 GMT",
            "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
        ),
        (
            "https://www.example.com",
            "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
        ),
        ("307", "640e ff"),
        (
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            "94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ),
        ("gzip", "9bd9 ab"),
    ];

    #[test]
    fn decodes_and_encodes_the_rfc_examples() {
        for (text, coded) in RFC {
            let mut out = Vec::new();
            decode(&hex(coded), &mut out).unwrap();
            assert_eq!(out, text.as_bytes(), "{text}");
            assert_eq!(encode(text.as_bytes()), hex(coded), "{text}");
        }
    }

    #[test]
    fn every_byte_value_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        decode(&encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
        for b in 0..=255u8 {
            out.clear();
            decode(&encode(&[b, b, b]), &mut out).unwrap();
            assert_eq!(out, [b, b, b]);
        }
    }

    /// The nibble table against the bit-by-bit walk, on random and on encoded input.
    #[test]
    fn the_table_decodes_as_the_tree_does() {
        let mut rng = fastrand::Rng::with_seed(7);
        for len in 0..2000 {
            let input: Vec<u8> = if len % 2 == 0 {
                (0..len % 40).map(|_| rng.u8(..)).collect()
            } else {
                encode(&(0..len % 60).map(|_| rng.u8(..)).collect::<Vec<u8>>())
            };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let (ra, rb) = (decode(&input, &mut a), decode_bits(&input, &mut b));
            assert_eq!(ra, rb, "{input:02x?}");
            if ra.is_ok() {
                assert_eq!(a, b, "{input:02x?}");
            }
        }
    }

    #[test]
    fn refuses_eos_and_bad_padding() {
        let mut out = Vec::new();
        // Padding of zeros: "0" is 00000, then three zero bits instead of ones.
        assert_eq!(decode(&[0b0000_0000], &mut out), Err(BadHuffman));
        // A whole byte of padding (8 ones) after a complete symbol.
        assert_eq!(decode(&[0b0000_0111, 0xff], &mut out), Err(BadHuffman));
        // EOS itself: 30 ones, then two bits of padding.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff], &mut out), Err(BadHuffman));
        // The empty string, and a symbol with 3 bits of valid padding.
        out.clear();
        assert_eq!(decode(&[], &mut out), Ok(()));
        assert_eq!(decode(&[0b0000_0111], &mut out), Ok(()));
        assert_eq!(out, b"0");
    }
}
