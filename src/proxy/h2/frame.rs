//! HTTP/2 frames (RFC 9113, section 4 and 6): the 9-byte header, each type's payload rules
//! and the frames the client writes. Pure functions over byte slices, so that every rule of
//! the framing lives here once and is tested here.

/// What a client sends first on every connection (section 3.4), before its `SETTINGS`.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The length of a frame header.
pub const HEAD_LEN: usize = 9;

/// The smallest `SETTINGS_MAX_FRAME_SIZE`, and every peer's until it says otherwise.
pub const MIN_MAX_FRAME_SIZE: u32 = 16_384;

/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// The window every stream and the connection start with.
pub const DEFAULT_WINDOW: u32 = 65_535;

/// Frame types (section 6).
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

/// Frame flags; each means something only on the types named.
pub mod flag {
    /// `DATA`, `HEADERS`: the last frame of the stream from this side.
    pub const END_STREAM: u8 = 0x1;
    /// `SETTINGS`, `PING`: an acknowledgement.
    pub const ACK: u8 = 0x1;
    /// `HEADERS`, `CONTINUATION`: the last frame of a header block.
    pub const END_HEADERS: u8 = 0x4;
    /// `DATA`, `HEADERS`: a pad length byte leads the payload.
    pub const PADDED: u8 = 0x8;
    /// `HEADERS`: 5 bytes of priority follow the pad length.
    pub const PRIORITY: u8 = 0x20;
}

/// Settings identifiers (section 6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes (section 7), sent in `RST_STREAM` and `GOAWAY`.
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
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
    pub const HTTP_1_1_REQUIRED: Reason = Reason(0xd);

    /// The code's name, for logs and error messages (unknown codes are `unknown`).
    pub fn name(self) -> &'static str {
        match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:#x})", self.name(), self.0)
    }
}

/// A frame header (section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The payload's length.
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream, the reserved bit dropped.
    pub stream: u32,
}

impl Head {
    /// The header at the front of `buf`, once 9 bytes are there.
    pub fn parse(buf: &[u8]) -> Option<Head> {
        let b: &[u8; HEAD_LEN] = buf.get(..HEAD_LEN)?.try_into().ok()?;
        Some(Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & MAX_WINDOW,
        })
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A frame that breaks its type's rules: a connection error with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct FrameError {
    pub reason: Reason,
    pub what: &'static str,
}

fn error(reason: Reason, what: &'static str) -> FrameError {
    FrameError { reason, what }
}

/// The payload of a `DATA` or `HEADERS` frame without its padding (section 6.1).
fn unpadded<'p>(head: &Head, payload: &'p [u8]) -> Result<&'p [u8], FrameError> {
    if !head.has(flag::PADDED) {
        return Ok(payload);
    }
    let (&pad, rest) = payload.split_first().ok_or(error(
        Reason::FRAME_SIZE_ERROR,
        "padded frame without a pad length",
    ))?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|end| &rest[..end])
        .ok_or(error(
            Reason::PROTOCOL_ERROR,
            "padding longer than the frame",
        ))
}

/// A `DATA` frame's data. Flow control counts the whole payload, padding included.
pub fn data<'p>(head: &Head, payload: &'p [u8]) -> Result<&'p [u8], FrameError> {
    if head.stream == 0 {
        return Err(error(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
    }
    unpadded(head, payload)
}

/// A `HEADERS` frame's header block fragment, padding and priority removed.
pub fn headers<'p>(head: &Head, payload: &'p [u8]) -> Result<&'p [u8], FrameError> {
    if head.stream == 0 {
        return Err(error(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
    }
    let block = unpadded(head, payload)?;
    if !head.has(flag::PRIORITY) {
        return Ok(block);
    }
    block.get(5..).ok_or(error(
        Reason::FRAME_SIZE_ERROR,
        "HEADERS too short for its priority",
    ))
}

/// A `RST_STREAM` frame's error code.
pub fn rst_stream(head: &Head, payload: &[u8]) -> Result<Reason, FrameError> {
    if head.stream == 0 {
        return Err(error(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
    }
    let code: [u8; 4] = payload
        .try_into()
        .map_err(|_| error(Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes"))?;
    Ok(Reason(u32::from_be_bytes(code)))
}

/// A `WINDOW_UPDATE` frame's increment (never 0: a stream error there, a connection error
/// on stream 0; the caller tells them apart by `head.stream`).
pub fn window_update(payload: &[u8]) -> Result<u32, FrameError> {
    let b: [u8; 4] = payload
        .try_into()
        .map_err(|_| error(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes"))?;
    match u32::from_be_bytes(b) & MAX_WINDOW {
        0 => Err(error(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0")),
        n => Ok(n),
    }
}

/// A `PING` frame's 8 opaque bytes.
pub fn ping(head: &Head, payload: &[u8]) -> Result<[u8; 8], FrameError> {
    if head.stream != 0 {
        return Err(error(Reason::PROTOCOL_ERROR, "PING on a stream"));
    }
    payload
        .try_into()
        .map_err(|_| error(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"))
}

/// A `GOAWAY` frame's last stream id and error code (its debug data is ignored).
pub fn goaway(head: &Head, payload: &[u8]) -> Result<(u32, Reason), FrameError> {
    if head.stream != 0 {
        return Err(error(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
    }
    if payload.len() < 8 {
        return Err(error(
            Reason::FRAME_SIZE_ERROR,
            "GOAWAY shorter than 8 bytes",
        ));
    }
    let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & MAX_WINDOW;
    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    Ok((last, Reason(code)))
}

/// The settings a peer sent, each checked against section 6.5.2; unknown ones are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub header_table_size: Option<u32>,
    pub enable_push: Option<bool>,
    pub max_concurrent_streams: Option<u32>,
    pub initial_window_size: Option<u32>,
    pub max_frame_size: Option<u32>,
    pub max_header_list_size: Option<u32>,
}

/// A `SETTINGS` frame: `None` for an acknowledgement, else the settings in it.
pub fn settings(head: &Head, payload: &[u8]) -> Result<Option<Settings>, FrameError> {
    if head.stream != 0 {
        return Err(error(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
    }
    if head.has(flag::ACK) {
        return match payload.len() {
            0 => Ok(None),
            _ => Err(error(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS ack with a payload",
            )),
        };
    }
    if !payload.len().is_multiple_of(6) {
        return Err(error(
            Reason::FRAME_SIZE_ERROR,
            "SETTINGS not a multiple of 6 bytes",
        ));
    }
    let mut s = Settings::default();
    for entry in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
        match id {
            setting::HEADER_TABLE_SIZE => s.header_table_size = Some(value),
            setting::ENABLE_PUSH => {
                if value > 1 {
                    return Err(error(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH not 0 or 1",
                    ));
                }
                s.enable_push = Some(value == 1);
            }
            setting::MAX_CONCURRENT_STREAMS => s.max_concurrent_streams = Some(value),
            setting::INITIAL_WINDOW_SIZE => {
                if value > MAX_WINDOW {
                    return Err(error(
                        Reason::FLOW_CONTROL_ERROR,
                        "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
                    ));
                }
                s.initial_window_size = Some(value);
            }
            setting::MAX_FRAME_SIZE => {
                if !(MIN_MAX_FRAME_SIZE..=(1 << 24) - 1).contains(&value) {
                    return Err(error(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_MAX_FRAME_SIZE outside 2^14..2^24-1",
                    ));
                }
                s.max_frame_size = Some(value);
            }
            setting::MAX_HEADER_LIST_SIZE => s.max_header_list_size = Some(value),
            _ => {}
        }
    }
    Ok(Some(s))
}

/// Takes the next complete frame from the front of `buf`: its header and payload, or `None`
/// while it is incomplete (room for the rest is reserved). A frame over `max` (our
/// `SETTINGS_MAX_FRAME_SIZE`) is a connection error.
pub fn next(
    buf: &mut bytes::BytesMut,
    max: usize,
) -> Result<Option<(Head, bytes::BytesMut)>, FrameError> {
    let Some(head) = Head::parse(buf) else {
        return Ok(None);
    };
    if head.len > max {
        return Err(error(
            Reason::FRAME_SIZE_ERROR,
            "a frame over our maximum frame size",
        ));
    }
    if buf.len() < HEAD_LEN + head.len {
        buf.reserve(HEAD_LEN + head.len - buf.len());
        return Ok(None);
    }
    bytes::Buf::advance(buf, HEAD_LEN);
    Ok(Some((head, buf.split_to(head.len))))
}

/// Writes a frame header.
pub fn write_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&(stream & MAX_WINDOW).to_be_bytes());
}

/// Writes a `SETTINGS` frame with these `(identifier, value)` pairs.
pub fn write_settings(out: &mut Vec<u8>, pairs: &[(u16, u32)]) {
    write_head(out, pairs.len() * 6, kind::SETTINGS, 0, 0);
    for (id, value) in pairs {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// Writes the acknowledgement of the peer's `SETTINGS`.
pub fn write_settings_ack(out: &mut Vec<u8>) {
    write_head(out, 0, kind::SETTINGS, flag::ACK, 0);
}

/// Writes the answer to a `PING`.
pub fn write_ping_ack(out: &mut Vec<u8>, data: [u8; 8]) {
    write_head(out, 8, kind::PING, flag::ACK, 0);
    out.extend_from_slice(&data);
}

/// Writes a `WINDOW_UPDATE` for `stream` (0: the connection).
pub fn write_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    debug_assert!((1..=MAX_WINDOW).contains(&increment));
    write_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

/// Writes a `RST_STREAM`.
pub fn write_rst_stream(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    write_head(out, 4, kind::RST_STREAM, 0, stream);
    out.extend_from_slice(&reason.0.to_be_bytes());
}

/// Writes a `GOAWAY` naming the last stream the peer started (none, for a client).
pub fn write_goaway(out: &mut Vec<u8>, last: u32, reason: Reason) {
    write_head(out, 8, kind::GOAWAY, 0, 0);
    out.extend_from_slice(&(last & MAX_WINDOW).to_be_bytes());
    out.extend_from_slice(&reason.0.to_be_bytes());
}

/// Writes a header block as a `HEADERS` frame and as many `CONTINUATION` frames as the
/// peer's `max_frame` needs.
pub fn write_headers(
    out: &mut Vec<u8>,
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
    write_head(out, first.len(), kind::HEADERS, flags, stream);
    out.extend_from_slice(first);
    for (i, chunk) in block.chunks(max_frame.max(1)).skip(1).enumerate() {
        let flags = if i + 1 == rest { flag::END_HEADERS } else { 0 };
        write_head(out, chunk.len(), kind::CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(mut buf: &[u8]) -> Vec<(Head, Vec<u8>)> {
        let mut all = Vec::new();
        while let Some(head) = Head::parse(buf) {
            let payload = buf[HEAD_LEN..HEAD_LEN + head.len].to_vec();
            buf = &buf[HEAD_LEN + head.len..];
            all.push((head, payload));
        }
        assert!(buf.is_empty(), "a partial frame left over");
        all
    }

    #[test]
    fn heads_round_trip_and_drop_the_reserved_bit() {
        let mut out = Vec::new();
        write_head(&mut out, 0x01_02_03, kind::HEADERS, 0x25, 7);
        assert_eq!(out, [1, 2, 3, 1, 0x25, 0, 0, 0, 7]);
        let head = Head::parse(&out).unwrap();
        assert_eq!(
            head,
            Head {
                len: 0x01_02_03,
                kind: kind::HEADERS,
                flags: 0x25,
                stream: 7
            }
        );
        assert!(head.has(flag::END_STREAM) && head.has(flag::PRIORITY));
        assert!(!head.has(flag::PADDED));
        assert_eq!(
            Head::parse(&[0, 0, 0, 0, 0, 0x80, 0, 0, 1]).unwrap().stream,
            1
        );
        assert_eq!(Head::parse(&out[..8]), None);
    }

    #[test]
    fn padding_and_priority_are_removed() {
        let h = |flags, stream| Head {
            len: 0,
            kind: kind::HEADERS,
            flags,
            stream,
        };
        assert_eq!(data(&h(0, 1), b"abc").unwrap(), b"abc");
        assert_eq!(data(&h(flag::PADDED, 1), b"\x02abcXX").unwrap(), b"abc");
        assert_eq!(data(&h(flag::PADDED, 1), b"\x00").unwrap(), b"");
        let e = data(&h(flag::PADDED, 1), b"\x05ab").unwrap_err();
        assert_eq!(e.reason, Reason::PROTOCOL_ERROR);
        assert_eq!(
            data(&h(flag::PADDED, 1), b"").unwrap_err().reason,
            Reason::FRAME_SIZE_ERROR
        );
        assert_eq!(
            data(&h(0, 0), b"abc").unwrap_err().reason,
            Reason::PROTOCOL_ERROR
        );
        let both = flag::PADDED | flag::PRIORITY;
        assert_eq!(
            headers(&h(both, 3), b"\x01\x80\0\0\x01\x10blockP").unwrap(),
            b"block"
        );
        assert_eq!(
            headers(&h(flag::PRIORITY, 3), b"\0\0\0\x01\x10blk").unwrap(),
            b"blk"
        );
        let e = headers(&h(flag::PRIORITY, 3), b"\0\0").unwrap_err();
        assert_eq!(e.reason, Reason::FRAME_SIZE_ERROR);
        assert_eq!(
            headers(&h(0, 0), b"x").unwrap_err().reason,
            Reason::PROTOCOL_ERROR
        );
    }

    #[test]
    fn settings_are_checked_and_unknown_ones_ignored() {
        let h = |flags, stream| Head {
            len: 0,
            kind: kind::SETTINGS,
            flags,
            stream,
        };
        let mut out = Vec::new();
        write_settings(
            &mut out,
            &[
                (setting::MAX_CONCURRENT_STREAMS, 100),
                (setting::INITIAL_WINDOW_SIZE, MAX_WINDOW),
                (setting::MAX_FRAME_SIZE, 1 << 20),
                (0x99, 7),
            ],
        );
        let (head, payload) = frames(&out).remove(0);
        assert_eq!(head.kind, kind::SETTINGS);
        let s = settings(&head, &payload).unwrap().unwrap();
        assert_eq!(s.max_concurrent_streams, Some(100));
        assert_eq!(s.initial_window_size, Some(MAX_WINDOW));
        assert_eq!(s.max_frame_size, Some(1 << 20));
        assert_eq!(s.header_table_size, None);
        let entry = |id: u16, v: u32| [&id.to_be_bytes()[..], &v.to_be_bytes()].concat();
        let bad = [
            (entry(setting::ENABLE_PUSH, 2), Reason::PROTOCOL_ERROR),
            (
                entry(setting::INITIAL_WINDOW_SIZE, 1 << 31),
                Reason::FLOW_CONTROL_ERROR,
            ),
            (
                entry(setting::MAX_FRAME_SIZE, 16_383),
                Reason::PROTOCOL_ERROR,
            ),
            (
                entry(setting::MAX_FRAME_SIZE, 1 << 24),
                Reason::PROTOCOL_ERROR,
            ),
            (vec![0; 5], Reason::FRAME_SIZE_ERROR),
        ];
        for (payload, reason) in bad {
            assert_eq!(settings(&h(0, 0), &payload).unwrap_err().reason, reason);
        }
        assert_eq!(settings(&h(flag::ACK, 0), b"").unwrap(), None);
        let e = settings(&h(flag::ACK, 0), &[0; 6]).unwrap_err();
        assert_eq!(e.reason, Reason::FRAME_SIZE_ERROR);
        assert_eq!(
            settings(&h(0, 1), b"").unwrap_err().reason,
            Reason::PROTOCOL_ERROR
        );
    }

    #[test]
    fn control_frames_parse_and_write() {
        let mut out = Vec::new();
        write_ping_ack(&mut out, *b"12345678");
        write_window_update(&mut out, 3, 1000);
        write_rst_stream(&mut out, 5, Reason::CANCEL);
        write_goaway(&mut out, 0, Reason::NO_ERROR);
        write_settings_ack(&mut out);
        let f = frames(&out);
        assert_eq!((f[0].0.kind, f[0].0.flags), (kind::PING, flag::ACK));
        assert_eq!(&ping(&f[0].0, &f[0].1).unwrap(), b"12345678");
        assert_eq!((f[1].0.stream, window_update(&f[1].1).unwrap()), (3, 1000));
        assert_eq!(rst_stream(&f[2].0, &f[2].1).unwrap(), Reason::CANCEL);
        assert_eq!(goaway(&f[3].0, &f[3].1).unwrap(), (0, Reason::NO_ERROR));
        assert_eq!(settings(&f[4].0, &f[4].1).unwrap(), None);
        assert_eq!(
            window_update(&[0, 0, 0, 0]).unwrap_err().reason,
            Reason::PROTOCOL_ERROR
        );
        assert_eq!(window_update(&[0x80, 0, 0, 1]).unwrap(), 1);
        assert_eq!(
            window_update(&[0; 3]).unwrap_err().reason,
            Reason::FRAME_SIZE_ERROR
        );
        let on = |stream| Head {
            len: 8,
            kind: kind::PING,
            flags: 0,
            stream,
        };
        assert_eq!(
            ping(&on(1), &[0; 8]).unwrap_err().reason,
            Reason::PROTOCOL_ERROR
        );
        assert_eq!(
            ping(&on(0), &[0; 7]).unwrap_err().reason,
            Reason::FRAME_SIZE_ERROR
        );
        assert_eq!(
            goaway(&on(0), &[0; 7]).unwrap_err().reason,
            Reason::FRAME_SIZE_ERROR
        );
        assert_eq!(
            rst_stream(&on(0), &[0; 4]).unwrap_err().reason,
            Reason::PROTOCOL_ERROR
        );
        assert_eq!(Reason(0xd).to_string(), "HTTP_1_1_REQUIRED (0xd)");
        assert_eq!(Reason(0x77).name(), "unknown");
    }

    #[test]
    fn a_large_header_block_is_split_into_continuations() {
        let block: Vec<u8> = (0..40u8).collect();
        for (max, count) in [(100, 1), (40, 1), (16, 3), (39, 2)] {
            let mut out = Vec::new();
            write_headers(&mut out, 9, &block, true, max);
            let f = frames(&out);
            assert_eq!(f.len(), count, "max {max}");
            assert_eq!(f[0].0.kind, kind::HEADERS);
            assert!(f[0].0.has(flag::END_STREAM));
            assert!(f
                .iter()
                .skip(1)
                .all(|(h, _)| h.kind == kind::CONTINUATION && h.stream == 9));
            let ends: Vec<bool> = f.iter().map(|(h, _)| h.has(flag::END_HEADERS)).collect();
            assert_eq!(ends.iter().filter(|e| **e).count(), 1);
            assert!(ends[count - 1]);
            let joined: Vec<u8> = f.iter().flat_map(|(_, p)| p.clone()).collect();
            assert_eq!(joined, block);
        }
        let mut out = Vec::new();
        write_headers(&mut out, 1, &[], false, 16_384);
        let f = frames(&out);
        assert_eq!((f.len(), f[0].0.flags), (1, flag::END_HEADERS));
    }
}
