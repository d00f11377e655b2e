//! HPACK (RFC 7541): the header compression of HTTP/2.
//!
//! The decoder reads the header blocks an upstream sends, with the dynamic table the
//! upstream's encoder keeps in step with it, and hands each field to a callback as byte
//! slices: the response head can be written straight into the client's buffer, and a field
//! taken from a table or sent as it is costs no allocation. The encoder writes requests with
//! literals only ("without indexing", and "never indexed" for credentials), so the
//! upstream's decoder table stays empty and no secret is ever kept in it.

use std::collections::VecDeque;

use super::huffman;

/// The static table (Appendix A): entry `i + 1` is `STATIC[i]`.
pub const STATIC: [(&[u8], &[u8]); 61] = [
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

/// The table size both ends start with (`SETTINGS_HEADER_TABLE_SIZE`'s default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// A header block that breaks RFC 7541: the connection cannot go on (its tables would no
/// longer agree), so each is a `COMPRESSION_ERROR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer over 2^32.
    #[error("integer too large in header block")]
    Integer,
    /// An index into neither table.
    #[error("header index {0} is in no table")]
    Index(u64),
    /// A Huffman-coded string that does not decode.
    #[error("bad Huffman code in header block")]
    Huffman,
    /// A table size update over the size our settings allow, or after the first field.
    #[error("dynamic table size update not allowed")]
    SizeUpdate,
}

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The dynamic table (section 2.3.2): newest entry first, each costing its length plus 32.
#[derive(Debug, Default)]
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Table {
    fn get(&self, index: u64) -> Result<(&[u8], &[u8]), HpackError> {
        let i = usize::try_from(index).map_err(|_| HpackError::Index(index))?;
        match i {
            1..=61 => Ok(STATIC[i - 1]),
            _ => self
                .entries
                .get(i.wrapping_sub(62))
                .map(|(n, v)| (&**n, &**v))
                .ok_or(HpackError::Index(index)),
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let Some((n, v)) = self.entries.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }

    /// Adds an entry, evicting the oldest as needed; one larger than the table empties it
    /// (section 4.4).
    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let cost = name.len() + value.len() + 32;
        if cost > self.max {
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max - cost);
        self.size += cost;
        self.entries.push_front((name, value));
    }
}

/// Reads an integer with an `n`-bit prefix (section 5.1) from the front of `src`.
fn integer(src: &mut &[u8], n: u8) -> Result<u64, HpackError> {
    let (&first, rest) = src.split_first().ok_or(HpackError::Truncated)?;
    *src = rest;
    let mask = ((1u16 << n) - 1) as u8;
    let mut value = u64::from(first & mask);
    if value < u64::from(mask) {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        // Five continuation bytes carry 35 bits: more can only be padding zeros or too large.
        if shift > 28 {
            return Err(HpackError::Integer);
        }
        let (&b, rest) = src.split_first().ok_or(HpackError::Truncated)?;
        *src = rest;
        value += u64::from(b & 0x7f) << shift;
        if value > u64::from(u32::MAX) {
            return Err(HpackError::Integer);
        }
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

/// Writes `value` with an `n`-bit prefix, the prefix's other bits being `flags`.
fn write_integer(out: &mut Vec<u8>, flags: u8, n: u8, value: usize) {
    let mask = ((1u16 << n) - 1) as usize;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A string literal (section 5.2): the bytes as sent, or decoded into `scratch`.
fn string<'s: 'a, 'a>(
    src: &mut &'s [u8],
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], HpackError> {
    let huffman = src.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = usize::try_from(integer(src, 7)?).map_err(|_| HpackError::Integer)?;
    if src.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = src.split_at(len);
    *src = rest;
    if !huffman {
        return Ok(raw);
    }
    scratch.clear();
    huffman::decode(raw, scratch).map_err(|_| HpackError::Huffman)?;
    Ok(scratch)
}

/// The decoding end of one connection: its dynamic table and scratch space.
#[derive(Debug)]
pub struct Decoder {
    table: Table,
    /// The largest table our `SETTINGS_HEADER_TABLE_SIZE` allows the peer.
    limit: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_TABLE_SIZE)
    }
}

impl Decoder {
    /// A decoder whose peer may use a table of up to `limit` bytes.
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: Table {
                max: limit,
                ..Table::default()
            },
            limit,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// How many entries the dynamic table holds.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.table.entries.len()
    }

    /// Decodes a whole header block, calling `field(name, value)` for each field in order.
    /// The whole block is always decoded, whatever the caller makes of its fields: the
    /// tables of both ends must stay in step even when a stream is refused.
    pub fn decode(
        &mut self,
        mut src: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut first = true;
        while let Some(&b) = src.first() {
            if b & 0x80 != 0 {
                // Indexed field (6.1).
                let index = integer(&mut src, 7)?;
                if index == 0 {
                    return Err(HpackError::Index(0));
                }
                let (n, v) = self.table.get(index)?;
                field(n, v);
            } else if b & 0xe0 == 0x20 {
                // Dynamic table size update (6.3): only before the first field.
                let size = integer(&mut src, 5)?;
                if !first || size > self.limit as u64 {
                    return Err(HpackError::SizeUpdate);
                }
                self.table.resize(size as usize);
                continue;
            } else {
                // Literal (6.2): with incremental indexing (01), without (0000) or never
                // indexed (0001); the name indexed or a literal itself.
                let indexing = b & 0x40 != 0;
                let index = integer(&mut src, if indexing { 6 } else { 4 })?;
                let name = if index == 0 {
                    string(&mut src, &mut self.name)?
                } else {
                    self.table.get(index)?.0
                };
                let value = string(&mut src, &mut self.value)?;
                if indexing {
                    let (n, v): Entry = (name.into(), value.into());
                    field(&n, &v);
                    self.table.insert(n, v);
                } else {
                    field(name, value);
                }
            }
            first = false;
        }
        Ok(())
    }
}

/// Encodes request fields: literals that never enter the peer's dynamic table.
pub mod encode {
    use super::write_integer;

    /// A dynamic table size update (RFC 7541 §6.3): the first thing in a block after the
    /// peer lowered `SETTINGS_HEADER_TABLE_SIZE`.
    pub fn size_update(out: &mut Vec<u8>, size: usize) {
        write_integer(out, 0x20, 5, size);
    }

    /// An indexed field of the static table (`:method GET` is 2, `:scheme https` is 7).
    pub fn indexed(out: &mut Vec<u8>, index: usize) {
        write_integer(out, 0x80, 7, index);
    }

    /// A field whose name is static entry `index`, sent without indexing; `never` marks it
    /// never to be indexed by any intermediary (credentials).
    pub fn with_name(out: &mut Vec<u8>, index: usize, value: &[u8], never: bool) {
        write_integer(out, if never { 0x10 } else { 0x00 }, 4, index);
        literal(out, value);
    }

    /// A field with a literal name, which must be lowercase already, sent without indexing.
    pub fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8], never: bool) {
        out.push(if never { 0x10 } else { 0x00 });
        literal(out, name);
        literal(out, value);
    }

    /// [`field`] for a name in any case, lowercased as it is written (HTTP/2 names are).
    pub fn field_lowercased(out: &mut Vec<u8>, name: &[u8], value: &[u8], never: bool) {
        out.push(if never { 0x10 } else { 0x00 });
        write_integer(out, 0, 7, name.len());
        out.extend(name.iter().map(u8::to_ascii_lowercase));
        literal(out, value);
    }

    /// A string literal as it is (no Huffman coding).
    fn literal(out: &mut Vec<u8>, s: &[u8]) {
        write_integer(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2::hex;

    fn decode(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut fields = Vec::new();
        d.decode(block, |n, v| {
            fields.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ))
        })?;
        Ok(fields)
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// The entries of the dynamic table, newest first, and its size.
    fn table(d: &Decoder) -> (Vec<(String, String)>, usize) {
        let entries = d
            .table
            .entries
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect();
        (entries, d.table.size)
    }

    #[test]
    fn integers_of_the_rfc_examples() {
        // C.1.1: 10 in a 5-bit prefix; C.1.2: 1337 in a 5-bit prefix; C.1.3: 42 at a boundary.
        for (value, n, wire) in [(10, 5, "0a"), (1337, 5, "1f9a0a"), (42, 8, "2a")] {
            let wire = hex(wire);
            let mut src = &wire[..];
            assert_eq!(integer(&mut src, n).unwrap(), value);
            assert!(src.is_empty());
            let mut out = Vec::new();
            write_integer(&mut out, 0, n, value as usize);
            assert_eq!(out, wire);
        }
        let mut src = &[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..];
        assert_eq!(integer(&mut src, 5), Err(HpackError::Integer));
        let mut src = &[0x1f, 0x9a][..];
        assert_eq!(integer(&mut src, 5), Err(HpackError::Truncated));
        // Zero continuation bytes without end: refused, not a shift overflow.
        let mut src = &[
            0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
        ][..];
        assert_eq!(integer(&mut src, 5), Err(HpackError::Integer));
    }

    /// The requests of C.3 (plain) and C.4 (Huffman), decoded one after another on one
    /// connection, with the dynamic table after each.
    #[test]
    fn requests_of_the_rfc_examples() {
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut d = Decoder::default();
            let first = decode(&mut d, &hex(blocks[0])).unwrap();
            assert_eq!(
                first,
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com"),
                ])
            );
            assert_eq!(table(&d), (pairs(&[(":authority", "www.example.com")]), 57));
            let second = decode(&mut d, &hex(blocks[1])).unwrap();
            assert_eq!(second[3], pairs(&[(":authority", "www.example.com")])[0]);
            assert_eq!(second[4], pairs(&[("cache-control", "no-cache")])[0]);
            assert_eq!(table(&d).1, 110);
            let third = decode(&mut d, &hex(blocks[2])).unwrap();
            assert_eq!(
                third,
                pairs(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ])
            );
            assert_eq!(
                table(&d),
                (
                    pairs(&[
                        ("custom-key", "custom-value"),
                        ("cache-control", "no-cache"),
                        (":authority", "www.example.com"),
                    ]),
                    164
                )
            );
        }
    }

    /// The responses of C.5 (plain) and C.6 (Huffman), with a 256-byte table: entries are
    /// evicted as new ones come.
    #[test]
    fn responses_of_the_rfc_examples_evict_old_entries() {
        let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
        let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
        let location = "https://www.example.com";
        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
        for blocks in [
            [
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
                 6c65 2e63 6f6d",
                "4803 3330 37c1 c0bf",
                "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
                 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
                 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
                 3d31",
            ],
            [
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
                 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
                "4883 640e ffc1 c0bf",
                "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
                 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
                 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
            ],
        ] {
            let mut d = Decoder::new(256);
            assert_eq!(
                decode(&mut d, &hex(blocks[0])).unwrap(),
                pairs(&[
                    (":status", "302"),
                    ("cache-control", "private"),
                    ("date", date1),
                    ("location", location),
                ])
            );
            assert_eq!(table(&d).1, 222);
            assert_eq!(
                decode(&mut d, &hex(blocks[1])).unwrap(),
                pairs(&[
                    (":status", "307"),
                    ("cache-control", "private"),
                    ("date", date1),
                    ("location", location),
                ])
            );
            // ":status 302" was evicted for ":status 307".
            assert_eq!(table(&d).0[0], pairs(&[(":status", "307")])[0]);
            assert_eq!(table(&d).1, 222);
            assert_eq!(
                decode(&mut d, &hex(blocks[2])).unwrap(),
                pairs(&[
                    (":status", "200"),
                    ("cache-control", "private"),
                    ("date", date2),
                    ("location", location),
                    ("content-encoding", "gzip"),
                    ("set-cookie", cookie),
                ])
            );
            assert_eq!(
                table(&d),
                (
                    pairs(&[
                        ("set-cookie", cookie),
                        ("content-encoding", "gzip"),
                        ("date", date2),
                    ]),
                    215
                )
            );
        }
    }

    #[test]
    fn table_size_updates_are_bounded_and_only_first() {
        let mut d = Decoder::new(4096);
        // Grow past our limit: refused.
        let mut over = Vec::new();
        write_integer(&mut over, 0x20, 5, 4097);
        assert_eq!(decode(&mut d, &over), Err(HpackError::SizeUpdate));
        // Shrink to 0 after a field: refused; before: evicts everything.
        let mut d = Decoder::new(4096);
        decode(
            &mut d,
            &hex("4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        )
        .unwrap();
        assert_eq!(table(&d).0.len(), 1);
        assert_eq!(decode(&mut d, &hex("82 20")), Err(HpackError::SizeUpdate));
        decode(&mut d, &hex("20 82")).unwrap();
        assert_eq!(table(&d), (vec![], 0));
        // With the table at 0, an indexed literal is a field but is not kept.
        let fields = decode(&mut d, &hex("400a 6375 7374 6f6d 2d6b 6579 0161")).unwrap();
        assert_eq!(fields, pairs(&[("custom-key", "a")]));
        assert_eq!(table(&d), (vec![], 0));
    }

    #[test]
    fn malformed_blocks_are_compression_errors() {
        let mut d = Decoder::default();
        assert_eq!(decode(&mut d, &[0x80]), Err(HpackError::Index(0)));
        assert_eq!(decode(&mut d, &[0xbe]), Err(HpackError::Index(62)));
        // A literal whose length runs past the block.
        assert_eq!(
            decode(&mut d, &hex("0f 0f 05 6162")),
            Err(HpackError::Truncated)
        );
        // A Huffman string with zero padding.
        assert_eq!(decode(&mut d, &hex("01 81 00")), Err(HpackError::Huffman));
        // Nothing at all is an empty block, not an error.
        assert_eq!(decode(&mut d, &[]), Ok(vec![]));
    }

    #[test]
    fn encoded_requests_decode_and_leave_no_table_entry() {
        let mut out = Vec::new();
        encode::indexed(&mut out, 2);
        encode::indexed(&mut out, 7);
        encode::with_name(&mut out, 4, b"/v1/items?a=1", false);
        encode::with_name(&mut out, 1, b"api.example.cn", false);
        encode::with_name(&mut out, 23, b"Bearer t0ken", true);
        encode::field(&mut out, b"x-request-id", &[b'x'; 300], false);
        encode::field_lowercased(&mut out, b"X-Mixed-Case", b"v", false);
        let mut d = Decoder::default();
        let fields = decode(&mut d, &out).unwrap();
        assert_eq!(
            fields,
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/v1/items?a=1"),
                (":authority", "api.example.cn"),
                ("authorization", "Bearer t0ken"),
                ("x-request-id", &"x".repeat(300)),
                ("x-mixed-case", "v"),
            ])
        );
        assert_eq!(table(&d), (vec![], 0));
        // The credential is sent as never indexed (0001xxxx).
        let at = out.windows(12).position(|w| w == b"Bearer t0ken").unwrap();
        assert_eq!(out[at - 3..at], [0x10 | 0x0f, 23 - 15, 12]);
    }
}
