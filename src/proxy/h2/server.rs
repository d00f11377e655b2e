//! One HTTP/2 connection from a client, as a state machine without I/O: the server side of
//! the front door's HTTP/2 (the next part, a driver that owns the socket and runs the
//! service for each stream, feeds it what it reads and writes what it queues in `out`).
//!
//! Rules kept here, each once (RFC 9113 unless said otherwise):
//! - the connection starts with the client's preface, then its `SETTINGS`; ours (the stream
//!   limit, the stream window, the largest header list) and a larger connection window go
//!   first, and every `SETTINGS` is acknowledged;
//! - streams: client-initiated ids are odd and increase (§5.1.1); over our stream limit, or
//!   after our `GOAWAY`, a new stream is refused (`REFUSED_STREAM`: not processed, the client
//!   may send it again); frames for a stream follow its states (§5.1): `DATA` or `HEADERS`
//!   after the client ended its side are `STREAM_CLOSED`, a frame on a stream never opened is a
//!   connection error;
//! - header blocks are decoded whole, in order, even for a refused stream, so the HPACK tables
//!   stay in step; a block is `HEADERS` then `CONTINUATION`s of the same stream and nothing
//!   else in between; the request head is judged by `request.rs`: a malformed one resets its
//!   stream (`PROTOCOL_ERROR`), one over our list size is answered `431` by the caller;
//! - trailers end the stream, and carry no pseudo-field (§8.1);
//! - `content-length` must agree with the `DATA` received (§8.1.1);
//! - flow control (§5.2, §6.9): what the client sends is counted against the stream's and the
//!   connection's windows, which are returned as the service reads the body, so a connection
//!   holds at most [`CONNECTION_WINDOW`] of unread body; what we send stays within the
//!   client's windows, and its `SETTINGS_INITIAL_WINDOW_SIZE` changes the open streams'
//!   windows by the difference (§6.9.2); a window over 2^31-1 is `FLOW_CONTROL_ERROR`;
//! - frames we send are at most the client's `SETTINGS_MAX_FRAME_SIZE`; frames we accept at
//!   most ours (the default, 16,384);
//! - a response the service ends before the request's body has arrived resets the stream
//!   with `NO_ERROR` (§8.1), one it abandons with `CANCEL`;
//! - floods end the connection with `ENHANCE_YOUR_CALM`: streams the client resets before
//!   their response (the "rapid reset" of CVE-2023-44487) beyond a budget that completed
//!   responses refill, header blocks over twice the list size (CVE-2024-27316), control
//!   frames the client makes us queue without reading them;
//! - a broken frame ends the connection with a `GOAWAY` naming the reason.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::frame::{self, flag, kind, FrameError, Head, Reason, MAX_WINDOW};
use super::hpack::{self, encode};
use super::request::{self, Refused, RequestHead};

/// Streams a client may have open at once (our `SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const MAX_STREAMS: u32 = 128;
/// The window each stream gets for its request body.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's window: the most unread request body a connection holds.
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest frame we accept (our `SETTINGS_MAX_FRAME_SIZE`: the default).
const MAX_FRAME: usize = frame::MIN_MAX_FRAME_SIZE as usize;
/// Streams the client may reset before their response is complete, refilled by one for each
/// response that completes, up to this.
const RESET_BUDGET: i32 = 200;
/// Bytes of frames queued and not yet written past which the client, which sends more
/// without reading, is cut off (its `PING`s and `SETTINGS` queue answers).
const MAX_QUEUED: usize = 4 * 1024 * 1024;
/// Bytes queued past which a stream's data waits for the driver to write (others' frames
/// and the control frames still queue).
const OUT_HIGH: usize = 256 * 1024;
/// Streams we reset whose late frames are ignored, not answered.
const RECENT_RESETS: usize = 64;

/// Why a stream's request or response cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The client reset the stream.
    #[error("the client reset the stream: {0}")]
    Reset(Reason),
    /// The request broke a rule of HTTP/2 (we reset the stream).
    #[error("invalid HTTP/2 request: {0}")]
    Invalid(&'static str),
    /// The connection failed, or closed.
    #[error("{0}")]
    Connection(String),
}

/// What the service is handed for a new stream.
#[derive(Debug)]
pub enum Arrived {
    /// A request head; its body (if `body`) follows through [`Server::poll_data`].
    Request { head: RequestHead, body: bool },
    /// A head over our list size: answer `431`.
    TooLarge,
}

#[derive(Debug)]
struct Stream {
    id: u32,
    /// The client ended its side (`END_STREAM`), or reset the stream.
    remote_done: bool,
    /// We ended our side, or reset the stream.
    local_done: bool,
    /// The response head went out.
    head_sent: bool,
    /// Body data received and not yet read.
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    error: Option<StreamError>,
    /// What the client may still send on it.
    recv_window: i64,
    /// Data read and not yet returned to the stream's window.
    unreturned: u32,
    /// The request's `content-length`, and the data counted against it.
    length: Option<u64>,
    received: u64,
    /// What we may still send on it.
    send_window: i64,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Stream {
    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }

    fn unread(&self) -> usize {
        self.data.iter().map(Bytes::len).sum()
    }
}

/// A header block in progress.
#[derive(Debug)]
struct Continuing {
    stream: u32,
    block: Vec<u8>,
    end_stream: bool,
    /// It depends on its own stream (a stream error once the block is decoded).
    self_dependent: bool,
}

/// The state of one client connection. Its `Debug` leaves out the frames queued and the
/// request heads, which hold the client's credentials.
pub struct Server {
    /// Frames to write, in order.
    pub out: Vec<u8>,
    /// The task writing `out`, to wake when there is more.
    pub driver: Option<Waker>,
    streams: Vec<Stream>,
    /// New streams for the service, in the order they came.
    arrived: VecDeque<(u32, Arrived)>,
    decoder: hpack::Decoder,
    max_list: usize,
    /// Where each request head is decoded, its buffers kept: the head handed on is a copy of
    /// exactly its size (two allocations per stream, not the dozen reallocations of buffers
    /// grown field by field).
    decoded: RequestHead,
    /// Scratch space for encoding response heads.
    block: Vec<u8>,
    continuing: Option<Continuing>,
    /// Bytes of the preface still expected.
    preface: usize,
    got_settings: bool,
    /// The highest stream id the client opened.
    last_id: u32,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// A dynamic table size to signal at the start of the next block we encode (RFC 7541
    /// §4.2), after the client lowered `SETTINGS_HEADER_TABLE_SIZE`.
    table_update: Option<usize>,
    send_window: i64,
    recv_window: i64,
    /// Connection data read and not yet returned.
    unreturned: u32,
    resets_left: i32,
    recent_resets: VecDeque<u32>,
    /// Streams waiting for `out` to drain.
    blocked: Vec<Waker>,
    /// No new streams: our `GOAWAY` went out, or the client's came.
    pub draining: bool,
    /// The connection failed; why.
    pub dead: Option<String>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("open_streams", &self.streams.len())
            .field("last_id", &self.last_id)
            .field("queued_bytes", &self.out.len())
            .field("draining", &self.draining)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A session whose settings and window are queued in `out`; `max_list` is the largest
    /// request header list it takes (`max_header_bytes`).
    pub fn new(max_list: usize) -> Server {
        let mut out = Vec::new();
        frame::write_settings(
            &mut out,
            &[
                (frame::setting::MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (frame::setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (
                    frame::setting::MAX_HEADER_LIST_SIZE,
                    u32::try_from(max_list).unwrap_or(u32::MAX),
                ),
            ],
        );
        frame::write_window_update(&mut out, 0, CONNECTION_WINDOW - frame::DEFAULT_WINDOW);
        Server {
            out,
            driver: None,
            streams: Vec::new(),
            arrived: VecDeque::new(),
            decoder: hpack::Decoder::default(),
            max_list,
            decoded: RequestHead::default(),
            block: Vec::new(),
            continuing: None,
            preface: frame::PREFACE.len(),
            got_settings: false,
            last_id: 0,
            peer_initial_window: i64::from(frame::DEFAULT_WINDOW),
            peer_max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
            table_update: None,
            send_window: i64::from(frame::DEFAULT_WINDOW),
            recv_window: i64::from(CONNECTION_WINDOW),
            unreturned: 0,
            resets_left: RESET_BUDGET,
            recent_resets: VecDeque::new(),
            blocked: Vec::new(),
            draining: false,
            dead: None,
        }
    }

    /// The next new stream for the service.
    pub fn next_arrived(&mut self) -> Option<(u32, Arrived)> {
        self.arrived.pop_front()
    }

    /// Whether no stream is open (the connection may close once draining).
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty() && self.arrived.is_empty()
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.streams.binary_search_by_key(&id, |s| s.id).ok()
    }

    fn wake_driver(&mut self) {
        if let Some(w) = self.driver.take() {
            w.wake();
        }
    }

    /// The driver wrote what was queued: streams waiting for room go on.
    pub fn drained(&mut self) {
        for w in self.blocked.drain(..) {
            w.wake();
        }
    }

    /// Takes every complete frame at the front of `buf`. Returns `false` once the connection
    /// is dead (the caller writes what is queued and closes).
    pub fn receive(&mut self, buf: &mut BytesMut) -> bool {
        if self.preface > 0 {
            let expected = &frame::PREFACE[frame::PREFACE.len() - self.preface..];
            let n = expected.len().min(buf.len());
            if buf[..n] != expected[..n] {
                self.dead = Some("the client did not start with the HTTP/2 preface".into());
                return false;
            }
            buf.advance(n);
            self.preface -= n;
            if self.preface > 0 {
                return true;
            }
        }
        while self.dead.is_none() {
            let (head, payload) = match frame::next(buf, MAX_FRAME) {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(e) => {
                    self.connection_error(e);
                    break;
                }
            };
            if let Err(e) = self.frame(&head, payload) {
                self.connection_error(e);
            }
            if self.out.len() > MAX_QUEUED && self.dead.is_none() {
                self.connection_error(FrameError {
                    reason: Reason::ENHANCE_YOUR_CALM,
                    what: "frames queued for a client that does not read them",
                });
            }
        }
        self.dead.is_none()
    }

    fn frame(&mut self, head: &Head, payload: BytesMut) -> Result<(), FrameError> {
        if !self.got_settings && (head.kind != kind::SETTINGS || head.has(flag::ACK)) {
            return Err(protocol("the client's first frame was not SETTINGS"));
        }
        if let Some(c) = &self.continuing {
            if head.kind != kind::CONTINUATION || head.stream != c.stream {
                return Err(protocol("a header block interrupted"));
            }
        }
        match head.kind {
            kind::DATA => self.data(head, payload.freeze()),
            kind::HEADERS => {
                let self_dependent = head.has(flag::PRIORITY)
                    && dependency(head, &payload).is_some_and(|d| d == head.stream);
                let block = frame::headers(head, &payload)?;
                let end_stream = head.has(flag::END_STREAM);
                if head.has(flag::END_HEADERS) {
                    self.block_done(head.stream, block, end_stream, self_dependent)
                } else {
                    self.continuing = Some(Continuing {
                        stream: head.stream,
                        block: block.to_vec(),
                        end_stream,
                        self_dependent,
                    });
                    Ok(())
                }
            }
            kind::CONTINUATION => {
                let Some(mut c) = self.continuing.take() else {
                    return Err(protocol("CONTINUATION without a header block"));
                };
                c.block.extend_from_slice(&payload);
                if c.block.len() > 2 * self.max_list.max(MAX_FRAME) {
                    return Err(FrameError {
                        reason: Reason::ENHANCE_YOUR_CALM,
                        what: "a header block over twice the largest header list",
                    });
                }
                if head.has(flag::END_HEADERS) {
                    self.block_done(c.stream, &c.block, c.end_stream, c.self_dependent)
                } else {
                    self.continuing = Some(c);
                    Ok(())
                }
            }
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(protocol("PRIORITY on stream 0"));
                }
                if payload.len() != 5 {
                    self.reset_stream(head.stream, Reason::FRAME_SIZE_ERROR);
                } else if dependency(head, &payload) == Some(head.stream) {
                    self.reset_stream(head.stream, Reason::PROTOCOL_ERROR);
                }
                Ok(())
            }
            kind::RST_STREAM => {
                let reason = frame::rst_stream(head, &payload)?;
                let Some(i) = self.find(head.stream) else {
                    if head.stream > self.last_id {
                        return Err(protocol("RST_STREAM on a stream never opened"));
                    }
                    return Ok(());
                };
                let s = &mut self.streams[i];
                if !s.local_done {
                    self.resets_left -= 1;
                }
                let s = &mut self.streams[i];
                s.error.get_or_insert(StreamError::Reset(reason));
                s.remote_done = true;
                s.local_done = true;
                s.wake();
                if self.resets_left < 0 {
                    return Err(FrameError {
                        reason: Reason::ENHANCE_YOUR_CALM,
                        what: "too many streams reset before their response",
                    });
                }
                Ok(())
            }
            kind::SETTINGS => {
                if let Some(s) = frame::settings(head, &payload)? {
                    self.got_settings = true;
                    if let Some(n) = s.initial_window_size {
                        let delta = i64::from(n) - self.peer_initial_window;
                        self.peer_initial_window = i64::from(n);
                        for st in &mut self.streams {
                            st.send_window += delta;
                            if st.send_window > i64::from(MAX_WINDOW) {
                                return Err(FrameError {
                                    reason: Reason::FLOW_CONTROL_ERROR,
                                    what: "SETTINGS_INITIAL_WINDOW_SIZE took a window over 2^31-1",
                                });
                            }
                            if delta > 0 {
                                st.wake();
                            }
                        }
                    }
                    if let Some(n) = s.max_frame_size {
                        self.peer_max_frame = n as usize;
                    }
                    if let Some(n) = s.header_table_size {
                        // Our encoder never indexes, so its table stays empty; a smaller
                        // size is signalled all the same, as the decoder may expect it.
                        if (n as usize) < hpack::DEFAULT_TABLE_SIZE {
                            self.table_update = Some(n as usize);
                        }
                    }
                    frame::write_settings_ack(&mut self.out);
                }
                Ok(())
            }
            kind::PING => {
                let data = frame::ping(head, &payload)?;
                if !head.has(flag::ACK) {
                    frame::write_ping_ack(&mut self.out, data);
                }
                Ok(())
            }
            kind::GOAWAY => {
                frame::goaway(head, &payload)?;
                self.draining = true;
                Ok(())
            }
            kind::WINDOW_UPDATE => self.window_update(head, &payload),
            kind::PUSH_PROMISE => Err(protocol("PUSH_PROMISE from a client")),
            // Unknown types are ignored (§5.5).
            _ => Ok(()),
        }
    }

    fn window_update(&mut self, head: &Head, payload: &[u8]) -> Result<(), FrameError> {
        let increment = match frame::window_update(payload) {
            Ok(n) => i64::from(n),
            Err(e) if head.stream == 0 || e.reason != Reason::PROTOCOL_ERROR => return Err(e),
            Err(_) => {
                self.reset_stream(head.stream, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        if head.stream == 0 {
            self.send_window += increment;
            if self.send_window > i64::from(MAX_WINDOW) {
                return Err(FrameError {
                    reason: Reason::FLOW_CONTROL_ERROR,
                    what: "the connection's window over 2^31-1",
                });
            }
            for s in &mut self.streams {
                s.wake();
            }
            return Ok(());
        }
        let Some(i) = self.find(head.stream) else {
            if head.stream > self.last_id {
                return Err(protocol("WINDOW_UPDATE on a stream never opened"));
            }
            return Ok(());
        };
        let s = &mut self.streams[i];
        s.send_window += increment;
        if s.send_window > i64::from(MAX_WINDOW) {
            self.reset_stream(head.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        s.wake();
        Ok(())
    }

    fn data(&mut self, head: &Head, mut payload: Bytes) -> Result<(), FrameError> {
        let len = payload.len();
        let data = frame::data(head, &payload)?;
        let (start, data_len) = (
            data.as_ptr() as usize - payload.as_ptr() as usize,
            data.len(),
        );
        self.recv_window -= len as i64;
        if self.recv_window < 0 {
            return Err(FrameError {
                reason: Reason::FLOW_CONTROL_ERROR,
                what: "DATA over the connection's window",
            });
        }
        let Some(i) = self.find(head.stream) else {
            if head.stream > self.last_id {
                return Err(protocol("DATA on a stream never opened"));
            }
            // A closed stream: nobody reads it, so its window comes back at once.
            self.give_back(len as u32);
            if !self.recent_resets.contains(&head.stream) {
                self.reset_stream(head.stream, Reason::STREAM_CLOSED);
            }
            return Ok(());
        };
        let s = &mut self.streams[i];
        if s.remote_done {
            self.give_back(len as u32);
            if self.streams[i].error.is_none() {
                self.reset_stream(head.stream, Reason::STREAM_CLOSED);
            }
            return Ok(());
        }
        s.recv_window -= len as i64;
        if s.recv_window < 0 {
            self.give_back(len as u32);
            self.reset_stream(head.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        s.received += data_len as u64;
        if s.length.is_some_and(|n| s.received > n) {
            self.give_back(len as u32);
            self.malformed(i, "more DATA than its content-length");
            return Ok(());
        }
        let end = head.has(flag::END_STREAM);
        if end && s.length.is_some_and(|n| s.received != n) {
            self.give_back(len as u32);
            self.malformed(i, "less DATA than its content-length");
            return Ok(());
        }
        // Padding is counted by flow control and never read: it comes back at once.
        let padding = (len - data_len) as u32;
        if data_len > 0 {
            payload.advance(start);
            payload.truncate(data_len);
            s.data.push_back(payload);
        }
        if end {
            s.remote_done = true;
        }
        s.wake();
        if padding > 0 {
            self.give_back_stream(i, padding);
        }
        Ok(())
    }

    /// Returns `n` bytes of the connection's window, in large steps.
    fn give_back(&mut self, n: u32) {
        self.unreturned += n;
        if self.unreturned >= CONNECTION_WINDOW / 2 {
            let n = std::mem::take(&mut self.unreturned);
            self.recv_window += i64::from(n);
            frame::write_window_update(&mut self.out, 0, n);
            self.wake_driver();
        }
    }

    /// Returns `n` bytes read on stream at `i` to its window and the connection's.
    fn give_back_stream(&mut self, i: usize, n: u32) {
        let s = &mut self.streams[i];
        s.unreturned += n;
        if !s.remote_done && s.unreturned >= STREAM_WINDOW / 2 {
            let n = std::mem::take(&mut s.unreturned);
            s.recv_window += i64::from(n);
            frame::write_window_update(&mut self.out, s.id, n);
            self.wake_driver();
        }
        self.give_back(n);
    }

    fn block_done(
        &mut self,
        id: u32,
        block: &[u8],
        end_stream: bool,
        self_dependent: bool,
    ) -> Result<(), FrameError> {
        let compression = |_| FrameError {
            reason: Reason::COMPRESSION_ERROR,
            what: "a header block that does not decode",
        };
        if let Some(i) = self.find(id) {
            // Trailers, or a second head: decoded whole all the same.
            let trailers = request::decode_trailers(&mut self.decoder, block, self.max_list)
                .map_err(compression)?;
            let s = &mut self.streams[i];
            if s.remote_done {
                if s.error.is_none() {
                    self.reset_stream(id, Reason::STREAM_CLOSED);
                }
                return Ok(());
            }
            if !end_stream {
                self.malformed(i, "trailers that do not end the stream");
                return Ok(());
            }
            let fields = match trailers {
                Ok(fields) => fields,
                Err(Refused::Malformed(why)) => {
                    self.malformed(i, why);
                    return Ok(());
                }
                Err(Refused::TooLarge) => {
                    self.malformed(i, "trailers over the header list size");
                    return Ok(());
                }
            };
            if s.length.is_some_and(|n| s.received != n) {
                self.malformed(i, "less DATA than its content-length");
                return Ok(());
            }
            if !fields.is_empty() {
                s.trailers = Some(fields);
            }
            s.remote_done = true;
            s.wake();
            return Ok(());
        }
        if id <= self.last_id {
            // Decoded for the tables' sake; what it holds is not wanted.
            let _ = request::decode_trailers(&mut self.decoder, block, self.max_list)
                .map_err(compression)?;
            // Frames in flight on a stream we reset are ignored (§5.4.2); on a stream both
            // sides closed, HEADERS are a connection error (§5.1).
            if self.recent_resets.contains(&id) {
                return Ok(());
            }
            return Err(FrameError {
                reason: Reason::STREAM_CLOSED,
                what: "HEADERS on a closed stream",
            });
        }
        if id.is_multiple_of(2) {
            return Err(protocol("HEADERS on a stream id a client may not open"));
        }
        self.last_id = id;
        let head = &mut self.decoded;
        let judged =
            request::decode(&mut self.decoder, block, self.max_list, head).map_err(compression)?;
        let length = head.length;
        if self_dependent {
            self.reset_stream(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.draining || self.streams.len() >= MAX_STREAMS as usize {
            self.reset_stream(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let arrived = match judged {
            Err(Refused::Malformed(_)) => {
                self.reset_stream(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
            _ if end_stream && length.is_some_and(|n| n > 0) => {
                self.reset_stream(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
            Err(Refused::TooLarge) => Arrived::TooLarge,
            Ok(()) => Arrived::Request {
                body: !end_stream,
                head: self.decoded.clone(),
            },
        };
        let length = match &arrived {
            Arrived::Request { .. } => length,
            Arrived::TooLarge => None,
        };
        self.streams.push(Stream {
            id,
            remote_done: end_stream,
            local_done: false,
            head_sent: false,
            data: VecDeque::new(),
            trailers: None,
            error: None,
            recv_window: i64::from(STREAM_WINDOW),
            unreturned: 0,
            length,
            received: 0,
            send_window: self.peer_initial_window,
            reader: None,
            writer: None,
        });
        self.arrived.push_back((id, arrived));
        Ok(())
    }

    /// Resets stream `id` (which may be gone, or never have been) with `reason`.
    fn reset_stream(&mut self, id: u32, reason: Reason) {
        frame::write_rst_stream(&mut self.out, id, reason);
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(id);
        if let Some(i) = self.find(id) {
            let s = &mut self.streams[i];
            s.error
                .get_or_insert(StreamError::Invalid("the stream was reset"));
            s.remote_done = true;
            s.local_done = true;
            let unread = s.unread() as u32;
            s.data.clear();
            s.wake();
            self.give_back(unread);
        }
        self.wake_driver();
    }

    /// Resets stream at `i` for a request that broke a rule.
    fn malformed(&mut self, i: usize, why: &'static str) {
        let id = self.streams[i].id;
        self.streams[i].error = Some(StreamError::Invalid(why));
        self.reset_stream(id, Reason::PROTOCOL_ERROR);
    }

    /// Ends the connection for a broken frame: `GOAWAY` with the reason, then close.
    fn connection_error(&mut self, e: FrameError) {
        if self.dead.is_none() {
            frame::write_goaway(&mut self.out, self.last_id, e.reason);
            self.fail(format!("HTTP/2 connection error from the client: {e}"));
        }
    }

    /// The connection failed or closed: every stream fails with `why`.
    pub fn fail(&mut self, why: String) {
        if self.dead.is_some() {
            return;
        }
        for s in &mut self.streams {
            s.error
                .get_or_insert_with(|| StreamError::Connection(why.clone()));
            s.wake();
        }
        self.drained();
        self.dead = Some(why);
        self.wake_driver();
    }

    /// Stops taking new streams: `GOAWAY` with the last stream id; the streams open finish.
    pub fn shutdown(&mut self) {
        if !self.draining && self.dead.is_none() {
            frame::write_goaway(&mut self.out, self.last_id, Reason::NO_ERROR);
            self.draining = true;
            self.wake_driver();
        }
    }

    fn open(&mut self, id: u32) -> Result<usize, StreamError> {
        let Some(i) = self.find(id) else {
            return Err(StreamError::Connection(
                self.dead
                    .clone()
                    .unwrap_or_else(|| "the stream is gone".into()),
            ));
        };
        if let Some(e) = &self.streams[i].error {
            return Err(e.clone());
        }
        if self.streams[i].local_done {
            return Err(StreamError::Invalid("the response was already complete"));
        }
        Ok(i)
    }

    /// The next piece of stream `id`'s request body: data, then trailers, then `None`.
    pub fn poll_data(
        &mut self,
        id: u32,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, StreamError>>> {
        let Some(i) = self.find(id) else {
            return Poll::Ready(Some(Err(StreamError::Connection(
                self.dead
                    .clone()
                    .unwrap_or_else(|| "the stream is gone".into()),
            ))));
        };
        let s = &mut self.streams[i];
        if let Some(data) = s.data.pop_front() {
            self.give_back_stream(i, data.len() as u32);
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Some(Err(e.clone())));
        }
        if s.remote_done {
            return Poll::Ready(s.trailers.take().map(|t| Ok(http_body::Frame::trailers(t))));
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once stream `id` cannot go on (the client reset it, or the connection ended),
    /// with why: the service then drops its work on it, as a client that went away wants.
    pub fn poll_reset(&mut self, id: u32, cx: &mut Context<'_>) -> Poll<StreamError> {
        let Some(i) = self.find(id) else {
            return Poll::Ready(StreamError::Connection(
                self.dead
                    .clone()
                    .unwrap_or_else(|| "the stream is gone".into()),
            ));
        };
        let s = &mut self.streams[i];
        if let Some(e) = &s.error {
            return Poll::Ready(e.clone());
        }
        // The writer's slot: the stream's own future is the one waiting, whether for this or
        // for room to send, with the same waker.
        if !s.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.writer = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Queues stream `id`'s response head: `status`, then `fields` (names lowercased; a
    /// connection-specific field is never sent). `end_stream`: no body follows.
    pub fn send_head<'f>(
        &mut self,
        id: u32,
        status: StatusCode,
        fields: impl Iterator<Item = (&'f [u8], &'f [u8])>,
        end_stream: bool,
    ) -> Result<(), StreamError> {
        let i = self.open(id)?;
        if self.streams[i].head_sent {
            return Err(StreamError::Invalid("a second response head"));
        }
        let block = &mut self.block;
        block.clear();
        if let Some(size) = self.table_update.take() {
            encode::size_update(block, size);
        }
        encode_status(block, status);
        for (name, value) in fields {
            if !sendable(name) {
                continue;
            }
            encode::field_lowercased(block, name, value, false);
        }
        frame::write_headers(&mut self.out, id, block, end_stream, self.peer_max_frame);
        let s = &mut self.streams[i];
        s.head_sent = true;
        if end_stream {
            s.local_done = true;
        }
        self.wake_driver();
        Ok(())
    }

    /// Queues stream `id`'s response head already encoded as an HPACK block (literals
    /// only: see `raw::ClientHead`), with `END_STREAM` if `end_stream`.
    pub fn send_block(
        &mut self,
        id: u32,
        block: &[u8],
        end_stream: bool,
    ) -> Result<(), StreamError> {
        let i = self.open(id)?;
        if self.streams[i].head_sent {
            return Err(StreamError::Invalid("a second response head"));
        }
        let max_frame = self.peer_max_frame;
        match self.table_update.take() {
            None => frame::write_headers(&mut self.out, id, block, end_stream, max_frame),
            Some(size) => {
                let mut prefixed = Vec::with_capacity(block.len() + 4);
                encode::size_update(&mut prefixed, size);
                prefixed.extend_from_slice(block);
                frame::write_headers(&mut self.out, id, &prefixed, end_stream, max_frame);
            }
        }
        let s = &mut self.streams[i];
        s.head_sent = true;
        if end_stream {
            s.local_done = true;
        }
        self.wake_driver();
        Ok(())
    }

    /// Sends `data` on stream `id` as the windows allow (what went out is taken from the
    /// front of `data`); ready once all of it is queued, with `END_STREAM` if `end_stream`.
    pub fn poll_send_data(
        &mut self,
        id: u32,
        data: &mut Bytes,
        end_stream: bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), StreamError>> {
        let i = match self.open(id) {
            Ok(i) => i,
            Err(e) => return Poll::Ready(Err(e)),
        };
        loop {
            if data.is_empty() {
                if end_stream {
                    frame::write_head(&mut self.out, 0, kind::DATA, flag::END_STREAM, id);
                    self.streams[i].local_done = true;
                    self.wake_driver();
                }
                return Poll::Ready(Ok(()));
            }
            if self.out.len() >= OUT_HIGH {
                self.blocked.push(cx.waker().clone());
                self.wake_driver();
                return Poll::Pending;
            }
            let s = &mut self.streams[i];
            let room = s.send_window.min(self.send_window).max(0) as usize;
            let n = data.len().min(room).min(self.peer_max_frame);
            if n == 0 {
                s.writer = Some(cx.waker().clone());
                self.wake_driver();
                return Poll::Pending;
            }
            let last = end_stream && n == data.len();
            let flags = if last { flag::END_STREAM } else { 0 };
            frame::write_head(&mut self.out, n, kind::DATA, flags, id);
            self.out.extend_from_slice(&data[..n]);
            data.advance(n);
            s.send_window -= n as i64;
            self.send_window -= n as i64;
            if last {
                s.local_done = true;
                self.wake_driver();
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Ends stream `id` with trailers (names lowercased; a connection-specific field is never
    /// sent).
    pub fn send_trailers(&mut self, id: u32, fields: &HeaderMap) -> Result<(), StreamError> {
        let i = self.open(id)?;
        let block = &mut self.block;
        block.clear();
        if let Some(size) = self.table_update.take() {
            encode::size_update(block, size);
        }
        for (name, value) in fields {
            if sendable(name.as_str().as_bytes()) {
                encode::field(block, name.as_str().as_bytes(), value.as_bytes(), false);
            }
        }
        frame::write_headers(&mut self.out, id, block, true, self.peer_max_frame);
        self.streams[i].local_done = true;
        self.wake_driver();
        Ok(())
    }

    /// The service is done with stream `id` (its response written, or abandoned). A stream
    /// whose response is incomplete is reset (`CANCEL`); one whose request body is still
    /// coming, after a complete response, with `NO_ERROR` (§8.1).
    pub fn finish(&mut self, id: u32) {
        let Some(i) = self.find(id) else { return };
        let s = &self.streams[i];
        if s.error.is_none() {
            if !s.local_done {
                self.reset_stream(id, Reason::CANCEL);
            } else if !s.remote_done {
                self.reset_stream(id, Reason::NO_ERROR);
            }
        }
        let i = self.find(id).expect("still there");
        let s = self.streams.remove(i);
        if s.local_done && s.error.is_none() && self.resets_left < RESET_BUDGET {
            self.resets_left += 1;
        }
        // Data never read: its connection window comes back.
        self.give_back(s.unread() as u32);
        if self.streams.is_empty() {
            self.wake_driver();
        }
    }
}

fn protocol(what: &'static str) -> FrameError {
    FrameError {
        reason: Reason::PROTOCOL_ERROR,
        what,
    }
}

/// The stream a `HEADERS` (with its priority flag) or `PRIORITY` frame depends on.
fn dependency(head: &Head, payload: &[u8]) -> Option<u32> {
    let at = usize::from(head.kind == kind::HEADERS && head.has(flag::PADDED));
    let b = payload.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & MAX_WINDOW)
}

/// Encodes `:status`, indexed where the static table has it.
pub fn encode_status(block: &mut Vec<u8>, status: StatusCode) {
    match status.as_u16() {
        200 => encode::indexed(block, 8),
        204 => encode::indexed(block, 9),
        206 => encode::indexed(block, 10),
        304 => encode::indexed(block, 11),
        400 => encode::indexed(block, 12),
        404 => encode::indexed(block, 13),
        500 => encode::indexed(block, 14),
        _ => encode::with_name(block, 8, status.as_str().as_bytes(), false),
    }
}

/// Whether a response field may go out over HTTP/2: not connection-specific (§8.2.2), not a
/// pseudo-field.
pub fn sendable(name: &[u8]) -> bool {
    !name.starts_with(b":")
        && ![
            &b"connection"[..],
            b"keep-alive",
            b"proxy-connection",
            b"transfer-encoding",
            b"upgrade",
        ]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2::frame::{setting, HEAD_LEN};

    const MAX_LIST: usize = 16 * 1024;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// A session that has read the preface and the client's `settings`, its own opening
    /// frames taken from `out`.
    fn started(settings: &[(u16, u32)]) -> Server {
        let mut s = Server::new(MAX_LIST);
        let mut bytes = frame::PREFACE.to_vec();
        frame::write_settings(&mut bytes, settings);
        assert!(feed(&mut s, &bytes));
        let opening = frames(&mut s);
        assert_eq!(opening[0].0.kind, kind::SETTINGS);
        assert_eq!(opening[1].0.kind, kind::WINDOW_UPDATE);
        assert_eq!(opening[2].0.kind, kind::SETTINGS);
        assert!(opening[2].0.has(flag::ACK));
        s
    }

    fn feed(s: &mut Server, bytes: &[u8]) -> bool {
        let mut buf = BytesMut::from(bytes);
        let alive = s.receive(&mut buf);
        assert!(buf.is_empty() || !alive, "{} bytes left unread", buf.len());
        alive
    }

    /// The frames queued, taken out.
    fn frames(s: &mut Server) -> Vec<(Head, Vec<u8>)> {
        let mut out = std::mem::take(&mut s.out);
        let mut all = Vec::new();
        while let Some(head) = Head::parse(&out) {
            let payload = out[HEAD_LEN..HEAD_LEN + head.len].to_vec();
            out.drain(..HEAD_LEN + head.len);
            all.push((head, payload));
        }
        assert!(out.is_empty());
        all
    }

    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in fields {
            encode::field(&mut out, n.as_bytes(), v.as_bytes(), false);
        }
        out
    }

    fn headers(id: u32, fields: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
        let mut out = Vec::new();
        frame::write_headers(&mut out, id, &block(fields), end_stream, MAX_FRAME);
        out
    }

    fn request(id: u32, method: &str, extra: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
        let mut fields = vec![
            (":method", method),
            (":scheme", "http"),
            (":authority", "localhost"),
            (":path", "/"),
        ];
        fields.extend_from_slice(extra);
        headers(id, &fields, end_stream)
    }

    fn data(id: u32, bytes: &[u8], end_stream: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let flags = if end_stream { flag::END_STREAM } else { 0 };
        frame::write_head(&mut out, bytes.len(), kind::DATA, flags, id);
        out.extend_from_slice(bytes);
        out
    }

    fn rst_of(frames: &[(Head, Vec<u8>)], id: u32) -> Option<Reason> {
        frames
            .iter()
            .find(|(h, _)| h.kind == kind::RST_STREAM && h.stream == id)
            .map(|(h, p)| frame::rst_stream(h, p).unwrap())
    }

    fn goaway_of(frames: &[(Head, Vec<u8>)]) -> Option<(u32, Reason)> {
        frames
            .iter()
            .find(|(h, _)| h.kind == kind::GOAWAY)
            .map(|(h, p)| frame::goaway(h, p).unwrap())
    }

    fn decode_head(d: &mut hpack::Decoder, payload: &[u8]) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        d.decode(payload, |n, v| {
            fields.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ))
        })
        .unwrap();
        fields
    }

    fn arrived_request(s: &mut Server) -> (u32, RequestHead, bool) {
        match s.next_arrived() {
            Some((id, Arrived::Request { head, body })) => (id, head, body),
            other => panic!("no request arrived: {other:?}"),
        }
    }

    #[test]
    fn a_get_is_served_and_its_response_framed() {
        let mut s = Server::new(MAX_LIST);
        // Our settings go first, before anything is read.
        let opening = frames(&mut s);
        let ours = frame::settings(&opening[0].0, &opening[0].1)
            .unwrap()
            .unwrap();
        assert_eq!(ours.max_concurrent_streams, Some(MAX_STREAMS));
        assert_eq!(ours.initial_window_size, Some(STREAM_WINDOW));
        assert_eq!(ours.max_header_list_size, Some(MAX_LIST as u32));
        assert_eq!(
            frame::window_update(&opening[1].1).unwrap(),
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW
        );
        // The preface may come in pieces.
        let mut bytes = frame::PREFACE.to_vec();
        frame::write_settings(&mut bytes, &[]);
        assert!(feed(&mut s, &bytes[..10]));
        assert!(feed(&mut s, &bytes[10..]));
        let fields = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "localhost"),
            (":path", "/items?a=1"),
        ];
        assert!(feed(&mut s, &headers(1, &fields, true)));
        let (id, head, body) = arrived_request(&mut s);
        assert_eq!((id, body), (1, false));
        assert_eq!(head.path(), Some(&b"/items?a=1"[..]));
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b"Content-Type", b"text/plain"),
            (b"connection", b"close"),
            (b"Transfer-Encoding", b"chunked"),
            (b"x-a", b"1"),
        ];
        s.send_head(1, StatusCode::OK, fields.into_iter(), false)
            .unwrap();
        let mut body = Bytes::from_static(b"hello");
        assert!(s.poll_send_data(1, &mut body, true, &mut cx()).is_ready());
        s.finish(1);
        let sent = frames(&mut s);
        assert_eq!(
            sent[0].0.kind,
            kind::SETTINGS,
            "the ack of the client's settings"
        );
        let (h, p) = &sent[1];
        assert_eq!(
            (h.kind, h.stream, h.has(flag::END_STREAM)),
            (kind::HEADERS, 1, false)
        );
        assert_eq!(
            decode_head(&mut hpack::Decoder::default(), p),
            [
                (":status".to_string(), "200".to_string()),
                ("content-type".into(), "text/plain".into()),
                ("x-a".into(), "1".into()),
            ]
        );
        let (h, p) = &sent[2];
        assert_eq!((h.kind, h.has(flag::END_STREAM)), (kind::DATA, true));
        assert_eq!(p, b"hello");
        assert_eq!(sent.len(), 3, "nothing more, no reset: {sent:?}");
        assert!(s.is_idle());
    }

    #[test]
    fn the_preface_and_settings_come_first() {
        let mut s = Server::new(MAX_LIST);
        assert!(!feed(&mut s, b"GET / HTTP/1.1\r\n\r\n"));
        let mut s = Server::new(MAX_LIST);
        frames(&mut s);
        let mut bytes = frame::PREFACE.to_vec();
        frame::write_ping_ack(&mut bytes, [0; 8]);
        assert!(!feed(&mut s, &bytes));
        assert_eq!(
            goaway_of(&frames(&mut s)),
            Some((0, Reason::PROTOCOL_ERROR))
        );
    }

    #[test]
    fn a_malformed_head_resets_its_stream_and_the_connection_serves_on() {
        let mut s = started(&[]);
        assert!(feed(
            &mut s,
            &request(1, "GET", &[("connection", "close")], true)
        ));
        assert!(feed(
            &mut s,
            &request(3, "GET", &[("content-length", "5")], true)
        ));
        assert!(feed(&mut s, &request(5, "GET", &[], true)));
        let sent = frames(&mut s);
        assert_eq!(rst_of(&sent, 1), Some(Reason::PROTOCOL_ERROR));
        assert_eq!(
            rst_of(&sent, 3),
            Some(Reason::PROTOCOL_ERROR),
            "a length no data can meet"
        );
        assert_eq!(arrived_request(&mut s).0, 5);
        // A block that does not decode breaks the connection's tables.
        let mut bytes = Vec::new();
        frame::write_headers(&mut bytes, 7, &[0x80], true, MAX_FRAME);
        assert!(!feed(&mut s, &bytes));
        assert_eq!(
            goaway_of(&frames(&mut s)),
            Some((7, Reason::COMPRESSION_ERROR))
        );
    }

    #[test]
    fn a_head_over_the_list_size_arrives_as_too_large() {
        let mut s = started(&[]);
        let big = "v".repeat(MAX_LIST);
        assert!(feed(&mut s, &request(1, "GET", &[("x-big", &big)], true)));
        assert!(matches!(s.next_arrived(), Some((1, Arrived::TooLarge))));
    }

    #[test]
    fn stream_ids_rise_and_the_stream_limit_holds() {
        let mut s = started(&[]);
        assert!(!feed(&mut s, &request(2, "GET", &[], true)));
        assert_eq!(
            goaway_of(&frames(&mut s)),
            Some((0, Reason::PROTOCOL_ERROR))
        );

        let mut s = started(&[]);
        assert!(feed(&mut s, &request(5, "GET", &[], true)));
        assert!(!feed(&mut s, &request(3, "GET", &[], true)));
        assert_eq!(goaway_of(&frames(&mut s)), Some((5, Reason::STREAM_CLOSED)));

        let mut s = started(&[]);
        for i in 0..MAX_STREAMS {
            assert!(feed(&mut s, &request(2 * i + 1, "GET", &[], true)));
        }
        let over = 2 * MAX_STREAMS + 1;
        // The refused stream's block adds to the dynamic table; the next block uses it.
        let mut block = block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        block.extend_from_slice(&[0x40, 5]);
        block.extend_from_slice(b"x-tab");
        block.extend_from_slice(&[1, b'1']);
        let mut bytes = Vec::new();
        frame::write_headers(&mut bytes, over, &block, true, MAX_FRAME);
        assert!(feed(&mut s, &bytes));
        assert_eq!(rst_of(&frames(&mut s), over), Some(Reason::REFUSED_STREAM));
        s.finish(1);
        frames(&mut s);
        let mut next = self::block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        next.push(0x80 | 62);
        let mut bytes = Vec::new();
        frame::write_headers(&mut bytes, over + 2, &next, true, MAX_FRAME);
        assert!(feed(&mut s, &bytes));
        let last = std::iter::from_fn(|| s.next_arrived()).last();
        let Some((id, Arrived::Request { head, .. })) = last else {
            panic!("no request: {last:?}")
        };
        assert_eq!(id, over + 2);
        let fields: Vec<(&[u8], &[u8])> = head.pairs().collect();
        assert_eq!(fields, [(&b"x-tab"[..], &b"1"[..])]);
    }

    fn read_all(s: &mut Server, id: u32) -> (Vec<u8>, Option<HeaderMap>, Option<StreamError>) {
        let (mut body, mut trailers) = (Vec::new(), None);
        loop {
            match s.poll_data(id, &mut cx()) {
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => body.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Poll::Ready(Some(Err(e))) => return (body, trailers, Some(e)),
                Poll::Ready(None) => return (body, trailers, None),
                Poll::Pending => panic!("the body did not end"),
            }
        }
    }

    #[test]
    fn a_request_body_is_read_and_its_window_given_back_as_it_is() {
        let mut s = started(&[]);
        assert!(feed(
            &mut s,
            &request(1, "POST", &[("content-length", "10")], false)
        ));
        let (id, head, body) = arrived_request(&mut s);
        assert_eq!((id, body, head.length), (1, true, Some(10)));
        assert!(s.poll_data(1, &mut cx()).is_pending());
        assert!(feed(&mut s, &data(1, b"hell", false)));
        assert!(feed(&mut s, &data(1, b"o worl", true)));
        assert_eq!(read_all(&mut s, 1), (b"hello worl".to_vec(), None, None));

        // Half the stream's window read: it comes back (and only then).
        assert!(feed(&mut s, &request(3, "POST", &[], false)));
        arrived_request(&mut s);
        let chunk = vec![7u8; MAX_FRAME];
        let half = (STREAM_WINDOW / 2) as usize / MAX_FRAME;
        for _ in 0..half {
            assert!(feed(&mut s, &data(3, &chunk, false)));
        }
        frames(&mut s);
        for n in 0..half {
            assert!(s.poll_data(3, &mut cx()).is_ready());
            let updates: Vec<(u32, u32)> = frames(&mut s)
                .iter()
                .filter(|(h, _)| h.kind == kind::WINDOW_UPDATE)
                .map(|(h, p)| (h.stream, frame::window_update(p).unwrap()))
                .collect();
            if n + 1 < half {
                assert!(updates.is_empty(), "{updates:?} after {} frames", n + 1);
            } else {
                assert_eq!(updates, [(3, STREAM_WINDOW / 2)]);
            }
        }
    }

    #[test]
    fn data_over_a_window_is_refused() {
        let mut s = started(&[]);
        assert!(feed(&mut s, &request(1, "POST", &[], false)));
        let chunk = vec![0u8; MAX_FRAME];
        for _ in 0..(STREAM_WINDOW as usize / MAX_FRAME) {
            assert!(feed(&mut s, &data(1, &chunk, false)));
        }
        assert!(feed(&mut s, &data(1, b"x", false)));
        assert_eq!(rst_of(&frames(&mut s), 1), Some(Reason::FLOW_CONTROL_ERROR));

        // The connection's window: four streams' windows fill it; one byte more breaks it.
        let mut s = started(&[]);
        let per_stream = STREAM_WINDOW as usize / MAX_FRAME;
        for id in [1, 3, 5, 7] {
            assert!(feed(&mut s, &request(id, "POST", &[], false)));
            for _ in 0..per_stream {
                assert!(feed(&mut s, &data(id, &chunk, false)));
            }
        }
        assert!(feed(&mut s, &request(9, "POST", &[], false)));
        assert!(!feed(&mut s, &data(9, b"x", false)));
        assert_eq!(
            goaway_of(&frames(&mut s)),
            Some((9, Reason::FLOW_CONTROL_ERROR))
        );
    }

    #[test]
    fn the_body_must_match_its_content_length() {
        let mut s = started(&[]);
        assert!(feed(
            &mut s,
            &request(1, "POST", &[("content-length", "3")], false)
        ));
        assert!(feed(&mut s, &data(1, b"abcd", false)));
        assert!(feed(
            &mut s,
            &request(3, "POST", &[("content-length", "3")], false)
        ));
        assert!(feed(&mut s, &data(3, b"ab", true)));
        assert!(feed(
            &mut s,
            &request(5, "POST", &[("content-length", "3")], false)
        ));
        assert!(feed(&mut s, &data(5, b"ab", false)));
        let trailers = headers(5, &[("x-sum", "1")], true);
        assert!(feed(&mut s, &trailers));
        let sent = frames(&mut s);
        for id in [1, 3, 5] {
            assert_eq!(
                rst_of(&sent, id),
                Some(Reason::PROTOCOL_ERROR),
                "stream {id}"
            );
            assert!(matches!(
                read_all(&mut s, id).2,
                Some(StreamError::Invalid(_))
            ));
        }
    }

    #[test]
    fn trailers_end_the_stream_and_carry_no_pseudo_field() {
        let mut s = started(&[]);
        assert!(feed(
            &mut s,
            &request(1, "POST", &[("te", "trailers")], false)
        ));
        assert!(feed(&mut s, &data(1, b"abc", false)));
        assert!(feed(&mut s, &headers(1, &[("x-sum", "42")], true)));
        let (body, trailers, error) = read_all(&mut s, 1);
        assert_eq!((body, error), (b"abc".to_vec(), None));
        assert_eq!(trailers.unwrap().get("x-sum").unwrap(), "42");

        for (id, fields, end) in [
            (3, vec![("x-sum", "1")], false),
            (5, vec![(":path", "/")], true),
            (7, vec![("content-length", "1")], true),
        ] {
            assert!(feed(&mut s, &request(id, "POST", &[], false)));
            assert!(feed(&mut s, &headers(id, &fields, end)));
            assert_eq!(
                rst_of(&frames(&mut s), id),
                Some(Reason::PROTOCOL_ERROR),
                "{fields:?}"
            );
        }
    }

    #[test]
    fn what_we_send_stays_within_the_clients_windows_and_frame_size() {
        let mut s = started(&[(setting::INITIAL_WINDOW_SIZE, 10)]);
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        s.send_head(1, StatusCode::OK, std::iter::empty(), false)
            .unwrap();
        let mut body = Bytes::from(vec![1u8; 25]);
        assert!(s.poll_send_data(1, &mut body, true, &mut cx()).is_pending());
        let lens = |s: &mut Server| -> Vec<usize> {
            frames(s)
                .iter()
                .filter(|(h, _)| h.kind == kind::DATA)
                .map(|(_, p)| p.len())
                .collect()
        };
        assert_eq!(lens(&mut s), [10]);
        // A larger initial window adds to the open stream's (§6.9.2).
        let mut bytes = Vec::new();
        frame::write_settings(&mut bytes, &[(setting::INITIAL_WINDOW_SIZE, 15)]);
        assert!(feed(&mut s, &bytes));
        assert!(s.poll_send_data(1, &mut body, true, &mut cx()).is_pending());
        assert_eq!(lens(&mut s), [5]);
        let mut bytes = Vec::new();
        frame::write_window_update(&mut bytes, 1, 100);
        assert!(feed(&mut s, &bytes));
        assert!(s.poll_send_data(1, &mut body, true, &mut cx()).is_ready());
        assert_eq!(lens(&mut s), [10]);

        // Frames no larger than the client's maximum; a large head in CONTINUATIONs.
        let mut s = started(&[(setting::INITIAL_WINDOW_SIZE, MAX_WINDOW)]);
        let mut bytes = Vec::new();
        frame::write_window_update(&mut bytes, 0, 1 << 20);
        assert!(feed(&mut s, &bytes));
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        let big = vec![b'v'; 40_000];
        let fields: Vec<(&[u8], &[u8])> = vec![(b"x-big", &big)];
        s.send_head(1, StatusCode::OK, fields.into_iter(), false)
            .unwrap();
        let mut body = Bytes::from(vec![2u8; 40_000]);
        assert!(s.poll_send_data(1, &mut body, true, &mut cx()).is_ready());
        let sent = frames(&mut s);
        let kinds: Vec<(u8, usize)> = sent.iter().map(|(h, p)| (h.kind, p.len())).collect();
        assert_eq!(
            kinds,
            [
                (kind::HEADERS, MAX_FRAME),
                (kind::CONTINUATION, MAX_FRAME),
                (
                    kind::CONTINUATION,
                    40_000 + 1 + 2 + 1 + 5 + 3 - 2 * MAX_FRAME
                ),
                (kind::DATA, MAX_FRAME),
                (kind::DATA, MAX_FRAME),
                (kind::DATA, 40_000 - 2 * MAX_FRAME),
            ]
        );
    }

    #[test]
    fn a_window_over_the_largest_is_a_flow_control_error() {
        let mut s = started(&[]);
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        let mut bytes = Vec::new();
        frame::write_window_update(&mut bytes, 1, MAX_WINDOW);
        assert!(feed(&mut s, &bytes));
        assert_eq!(rst_of(&frames(&mut s), 1), Some(Reason::FLOW_CONTROL_ERROR));
        let mut bytes = Vec::new();
        frame::write_window_update(&mut bytes, 0, MAX_WINDOW);
        assert!(!feed(&mut s, &bytes));
        assert_eq!(
            goaway_of(&frames(&mut s)).map(|g| g.1),
            Some(Reason::FLOW_CONTROL_ERROR)
        );
    }

    #[test]
    fn a_stream_the_client_resets_fails_and_too_many_end_the_connection() {
        let mut s = started(&[]);
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        let mut bytes = Vec::new();
        frame::write_rst_stream(&mut bytes, 1, Reason::CANCEL);
        assert!(feed(&mut s, &bytes));
        let e = s.send_head(1, StatusCode::OK, std::iter::empty(), true);
        assert_eq!(e, Err(StreamError::Reset(Reason::CANCEL)));
        s.finish(1);
        assert_eq!(
            rst_of(&frames(&mut s), 1),
            None,
            "a reset stream is not reset again"
        );

        // Streams completed refill the budget: a client that resets some keeps going.
        let mut id = 3;
        for _ in 0..(2 * RESET_BUDGET) {
            assert!(feed(&mut s, &request(id, "GET", &[], true)));
            s.send_head(id, StatusCode::OK, std::iter::empty(), true)
                .unwrap();
            s.finish(id);
            assert!(feed(&mut s, &request(id + 2, "GET", &[], true)));
            let mut bytes = Vec::new();
            frame::write_rst_stream(&mut bytes, id + 2, Reason::CANCEL);
            assert!(feed(&mut s, &bytes));
            s.finish(id + 2);
            id += 4;
        }
        // Opened and reset, one after another (the rapid reset): cut off at the budget.
        let mut alive = true;
        let mut resets = 0;
        while alive {
            assert!(feed(&mut s, &request(id, "GET", &[], true)));
            let mut bytes = Vec::new();
            frame::write_rst_stream(&mut bytes, id, Reason::CANCEL);
            alive = feed(&mut s, &bytes);
            s.finish(id);
            resets += 1;
            id += 2;
            assert!(resets <= RESET_BUDGET + 1, "never cut off");
        }
        assert!(resets >= RESET_BUDGET, "cut off after {resets}");
        assert_eq!(
            goaway_of(&frames(&mut s)).map(|g| g.1),
            Some(Reason::ENHANCE_YOUR_CALM)
        );
    }

    #[test]
    fn control_frames_follow_their_rules() {
        let mut s = started(&[]);
        let mut bytes = Vec::new();
        frame::write_head(&mut bytes, 8, kind::PING, 0, 0);
        bytes.extend_from_slice(b"12345678");
        assert!(feed(&mut s, &bytes));
        let sent = frames(&mut s);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].0.kind == kind::PING && sent[0].0.has(flag::ACK));
        assert_eq!(sent[0].1, b"12345678");

        // PRIORITY: ignored, unless it depends on its own stream or has the wrong size.
        for (id, payload, reason) in [
            (1, vec![0, 0, 0, 3, 16], None),
            (3, vec![0, 0, 0, 3, 16], Some(Reason::PROTOCOL_ERROR)),
            (5, vec![0, 0, 0, 3], Some(Reason::FRAME_SIZE_ERROR)),
        ] {
            let mut bytes = Vec::new();
            frame::write_head(&mut bytes, payload.len(), kind::PRIORITY, 0, id);
            bytes.extend_from_slice(&payload);
            assert!(feed(&mut s, &bytes));
            assert_eq!(rst_of(&frames(&mut s), id), reason, "PRIORITY on {id}");
        }
        // HEADERS that depend on their own stream.
        let mut bytes = Vec::new();
        let mut payload = vec![0, 0, 0, 7, 16];
        payload.extend_from_slice(&block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
        ]));
        frame::write_head(
            &mut bytes,
            payload.len(),
            kind::HEADERS,
            flag::PRIORITY | flag::END_HEADERS | flag::END_STREAM,
            7,
        );
        bytes.extend_from_slice(&payload);
        assert!(feed(&mut s, &bytes));
        assert_eq!(rst_of(&frames(&mut s), 7), Some(Reason::PROTOCOL_ERROR));
        assert!(s.next_arrived().is_none());

        // Unknown frame types are ignored.
        let mut bytes = Vec::new();
        frame::write_head(&mut bytes, 3, 0xfa, 0, 0);
        bytes.extend_from_slice(b"abc");
        assert!(feed(&mut s, &bytes));
        assert!(frames(&mut s).is_empty());

        // A header block interrupted, or PUSH_PROMISE from a client: connection errors.
        for bad in ["interrupted", "push"] {
            let mut s = started(&[]);
            let mut bytes = Vec::new();
            if bad == "interrupted" {
                let b = block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
                frame::write_head(&mut bytes, b.len(), kind::HEADERS, flag::END_STREAM, 1);
                bytes.extend_from_slice(&b);
                frame::write_head(&mut bytes, 8, kind::PING, 0, 0);
                bytes.extend_from_slice(b"12345678");
            } else {
                frame::write_head(&mut bytes, 4, kind::PUSH_PROMISE, flag::END_HEADERS, 1);
                bytes.extend_from_slice(&[0, 0, 0, 2]);
            }
            assert!(!feed(&mut s, &bytes), "{bad}");
            assert_eq!(
                goaway_of(&frames(&mut s)).map(|g| g.1),
                Some(Reason::PROTOCOL_ERROR)
            );
        }
    }

    #[test]
    fn finishing_early_resets_with_no_error_and_abandoning_with_cancel() {
        let mut s = started(&[]);
        assert!(feed(&mut s, &request(1, "POST", &[], false)));
        assert!(feed(&mut s, &request(3, "GET", &[], true)));
        assert_eq!(arrived_request(&mut s).0, 1);
        assert_eq!(arrived_request(&mut s).0, 3);
        // A complete answer before the body came: NO_ERROR, and its late data is ignored.
        s.send_head(1, StatusCode::PAYLOAD_TOO_LARGE, std::iter::empty(), true)
            .unwrap();
        s.finish(1);
        // An answer abandoned half-way: CANCEL.
        s.send_head(3, StatusCode::OK, std::iter::empty(), false)
            .unwrap();
        s.finish(3);
        let sent = frames(&mut s);
        assert_eq!(rst_of(&sent, 1), Some(Reason::NO_ERROR));
        assert_eq!(rst_of(&sent, 3), Some(Reason::CANCEL));
        assert!(feed(&mut s, &data(1, b"late", true)));
        assert!(
            frames(&mut s).is_empty(),
            "late data after our reset is not answered"
        );
        assert!(s.is_idle());
        // Data on a stream both sides closed is answered STREAM_CLOSED.
        assert!(feed(&mut s, &request(5, "GET", &[], true)));
        s.send_head(5, StatusCode::OK, std::iter::empty(), true)
            .unwrap();
        s.finish(5);
        frames(&mut s);
        assert!(feed(&mut s, &data(5, b"x", true)));
        assert_eq!(rst_of(&frames(&mut s), 5), Some(Reason::STREAM_CLOSED));
    }

    #[test]
    fn shutdown_refuses_new_streams_and_lets_open_ones_finish() {
        let mut s = started(&[]);
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        s.shutdown();
        assert_eq!(goaway_of(&frames(&mut s)), Some((1, Reason::NO_ERROR)));
        assert!(feed(&mut s, &request(3, "GET", &[], true)));
        assert_eq!(rst_of(&frames(&mut s), 3), Some(Reason::REFUSED_STREAM));
        s.send_head(1, StatusCode::OK, std::iter::empty(), true)
            .unwrap();
        s.finish(1);
        assert_eq!(arrived_request(&mut s).0, 1);
        assert!(s.is_idle());
    }

    #[test]
    fn a_smaller_table_size_is_signalled_in_the_next_block() {
        let mut s = started(&[(setting::HEADER_TABLE_SIZE, 0)]);
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        assert!(feed(&mut s, &request(3, "GET", &[], true)));
        for id in [1, 3] {
            s.send_head(id, StatusCode::OK, std::iter::empty(), true)
                .unwrap();
        }
        let sent = frames(&mut s);
        assert_eq!(sent[0].1[0], 0x20, "a size update to 0 first");
        assert_eq!(sent[1].1[0], 0x88, "only once: :status 200 indexed");
        let mut d = hpack::Decoder::new(0);
        assert_eq!(
            decode_head(&mut d, &sent[0].1),
            [(":status".to_string(), "200".to_string())]
        );
    }

    #[test]
    fn a_header_block_past_twice_the_list_size_ends_the_connection() {
        // CONTINUATIONs that never end (CVE-2024-27316): cut off at twice the list size.
        let mut s = started(&[]);
        let b = block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
        let mut bytes = Vec::new();
        frame::write_head(&mut bytes, b.len(), kind::HEADERS, 0, 1);
        bytes.extend_from_slice(&b);
        assert!(feed(&mut s, &bytes));
        let filler = vec![0u8; MAX_FRAME];
        let mut sent = b.len();
        while sent + MAX_FRAME <= 2 * MAX_LIST {
            let mut bytes = Vec::new();
            frame::write_head(&mut bytes, MAX_FRAME, kind::CONTINUATION, 0, 1);
            bytes.extend_from_slice(&filler);
            assert!(
                feed(&mut s, &bytes),
                "cut off at {} bytes",
                sent + MAX_FRAME
            );
            sent += MAX_FRAME;
        }
        let mut bytes = Vec::new();
        frame::write_head(&mut bytes, MAX_FRAME, kind::CONTINUATION, 0, 1);
        bytes.extend_from_slice(&filler);
        assert!(!feed(&mut s, &bytes));
        assert_eq!(
            goaway_of(&frames(&mut s)).map(|g| g.1),
            Some(Reason::ENHANCE_YOUR_CALM)
        );
    }

    #[test]
    fn a_block_encoded_elsewhere_goes_out_once_with_the_size_update_first() {
        let mut s = started(&[(setting::HEADER_TABLE_SIZE, 0)]);
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        let mut block = Vec::new();
        encode_status(&mut block, StatusCode::NOT_FOUND);
        encode::field(&mut block, b"x-a", b"1", false);
        s.send_block(1, &block, true).unwrap();
        assert_eq!(
            s.send_block(1, &block, true),
            Err(StreamError::Invalid("the response was already complete"))
        );
        let sent = frames(&mut s);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].0.has(flag::END_STREAM));
        let mut d = hpack::Decoder::new(0);
        assert_eq!(
            decode_head(&mut d, &sent[0].1),
            [
                (":status".to_string(), "404".to_string()),
                ("x-a".into(), "1".into())
            ]
        );
        assert_eq!(sent[0].1[0], 0x20);
    }

    #[test]
    fn a_client_that_does_not_read_its_answers_is_cut_off() {
        let pings = |n: usize| {
            let mut pings = Vec::new();
            for _ in 0..n {
                frame::write_head(&mut pings, 8, kind::PING, 0, 0);
                pings.extend_from_slice(b"12345678");
            }
            pings
        };
        // Up to the cap, 4 MiB, answers queue (the settings ack is queued too).
        let under = (4 * 1024 * 1024 - 64) / (HEAD_LEN + 8);
        let mut s = started(&[]);
        assert!(feed(&mut s, &pings(under)));
        let mut s = started(&[]);
        assert!(!feed(&mut s, &pings(MAX_QUEUED / (HEAD_LEN + 8) + 1)));
        assert!(s.dead.as_deref().unwrap().contains("does not read"));
    }

    /// A waker that counts its wakes.
    fn counting() -> (Waker, std::sync::Arc<Count>) {
        let count = std::sync::Arc::new(Count::default());
        (Waker::from(count.clone()), count)
    }

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[test]
    fn waiting_readers_and_writers_are_woken() {
        let mut s = started(&[(setting::INITIAL_WINDOW_SIZE, 1)]);
        assert!(feed(&mut s, &request(1, "POST", &[], false)));
        assert!(!s.is_idle());
        // A reader waiting for the body: woken by its data.
        let (waker, reads) = counting();
        assert!(s
            .poll_data(1, &mut Context::from_waker(&waker))
            .is_pending());
        assert!(feed(&mut s, &data(1, b"abc", false)));
        assert_eq!(reads.get(), 1);
        // A writer waiting for the stream's window: woken by its WINDOW_UPDATE.
        s.send_head(1, StatusCode::OK, std::iter::empty(), false)
            .unwrap();
        let (waker, writes) = counting();
        let mut body = Bytes::from_static(b"hello");
        let mut cx = Context::from_waker(&waker);
        assert!(s.poll_send_data(1, &mut body, true, &mut cx).is_pending());
        let mut bytes = Vec::new();
        frame::write_window_update(&mut bytes, 1, 10);
        assert!(feed(&mut s, &bytes));
        assert_eq!(writes.get(), 1);
        assert!(s.poll_send_data(1, &mut body, true, &mut cx).is_ready());

        // A writer waiting for the queue to drain: woken when the driver wrote it.
        let mut s = started(&[(setting::INITIAL_WINDOW_SIZE, MAX_WINDOW)]);
        let mut bytes = Vec::new();
        frame::write_window_update(&mut bytes, 0, MAX_WINDOW - frame::DEFAULT_WINDOW);
        assert!(feed(&mut s, &bytes));
        assert!(feed(&mut s, &request(1, "GET", &[], true)));
        s.send_head(1, StatusCode::OK, std::iter::empty(), false)
            .unwrap();
        let (waker, drains) = counting();
        let mut body = Bytes::from(vec![0u8; 3 * OUT_HIGH]);
        let mut cx = Context::from_waker(&waker);
        assert!(s.poll_send_data(1, &mut body, true, &mut cx).is_pending());
        assert!(s.out.len() >= OUT_HIGH);
        assert_eq!(drains.get(), 0);
        s.out.clear();
        s.drained();
        assert_eq!(drains.get(), 1);
        // And the connection's end wakes whoever waits.
        let (waker, ends) = counting();
        assert!(s
            .poll_send_data(1, &mut body, true, &mut Context::from_waker(&waker))
            .is_pending());
        s.fail("closed".into());
        assert!(ends.get() >= 1);
    }

    #[test]
    fn debug_shows_no_request_or_frame() {
        let mut s = started(&[]);
        assert!(feed(
            &mut s,
            &request(
                1,
                "GET",
                &[("proxy-authorization", "Bearer inbound-secret-2")],
                true
            )
        ));
        let shown = format!("{s:?}");
        assert!(!shown.contains("inbound-secret-2"), "{shown}");
        assert!(
            shown.starts_with("Server { open_streams: 1, last_id: 1"),
            "{shown}"
        );
        let (_, head, _) = arrived_request(&mut s);
        assert!(!format!("{head:?}").contains("inbound-secret-2"));
    }

    /// What a server did with a sequence of frames: the connection's end, the streams reset,
    /// the streams answered.
    #[derive(Debug, Default, PartialEq)]
    struct Outcome {
        goaway: Option<Reason>,
        resets: std::collections::BTreeMap<u32, Reason>,
        served: std::collections::BTreeSet<u32>,
    }

    fn outcome_of(frames: &[(Head, Vec<u8>)], outcome: &mut Outcome) {
        for (h, p) in frames {
            match h.kind {
                kind::GOAWAY => {
                    outcome.goaway.get_or_insert(frame::goaway(h, p).unwrap().1);
                }
                kind::RST_STREAM => {
                    outcome
                        .resets
                        .insert(h.stream, frame::rst_stream(h, p).unwrap());
                }
                kind::HEADERS if h.stream != 0 => {
                    outcome.served.insert(h.stream);
                }
                _ => {}
            }
        }
    }

    /// Our session given `case` after the handshake; every request that arrives is answered
    /// at once, as a service would.
    fn ours(case: &[u8]) -> Outcome {
        let mut s = started(&[]);
        let mut outcome = Outcome::default();
        feed(&mut s, case);
        while let Some((id, _)) = s.next_arrived() {
            let _ = s.send_head(id, StatusCode::OK, std::iter::empty(), true);
            s.finish(id);
        }
        outcome_of(&frames(&mut s), &mut outcome);
        outcome
    }

    /// hyper's HTTP/2 server (the `h2` crate) given `case` after the handshake, its service
    /// answering every request at once. Read until each stream `case` opens has ended (or the
    /// connection has), then a PING's answer shows nothing more is coming.
    async fn hypers(case: &[u8], streams: &[u32]) -> Outcome {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let stream = listener.accept().await.unwrap().0;
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(
                    http_body_util::Empty::<Bytes>::new(),
                ))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(MAX_STREAMS)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut bytes = frame::PREFACE.to_vec();
        frame::write_settings(&mut bytes, &[]);
        frame::write_settings_ack(&mut bytes);
        conn.write_all(&bytes).await.unwrap();
        let _ = conn.write_all(case).await;
        let mut outcome = Outcome::default();
        let mut buf = Vec::new();
        let mut pinged = false;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let ended = |o: &Outcome| {
                streams
                    .iter()
                    .all(|id| o.served.contains(id) || o.resets.contains_key(id))
            };
            if outcome.goaway.is_none() && ended(&outcome) && !pinged {
                let mut ping = Vec::new();
                frame::write_head(&mut ping, 8, kind::PING, 0, 0);
                ping.extend_from_slice(b"lastping");
                let _ = conn.write_all(&ping).await;
                pinged = true;
            }
            let mut chunk = [0u8; 65_536];
            let read = tokio::time::timeout_at(deadline, conn.read(&mut chunk))
                .await
                .expect("hyper answered within 5 s");
            let n = read.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut got = Vec::new();
            while let Some(h) = Head::parse(&buf).filter(|h| buf.len() >= HEAD_LEN + h.len) {
                let p = buf[HEAD_LEN..HEAD_LEN + h.len].to_vec();
                buf.drain(..HEAD_LEN + h.len);
                got.push((h, p));
            }
            outcome_of(&got, &mut outcome);
            let last_ping = got
                .iter()
                .any(|(h, p)| h.kind == kind::PING && h.has(flag::ACK) && p == b"lastping");
            if outcome.goaway.is_some() || last_ping {
                break;
            }
        }
        server.abort();
        outcome
    }

    fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::write_head(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out
    }

    /// Sequences of frames that break (or keep) the rules of RFC 9113's sections 4 to 8, as
    /// h2spec's cases do, given to hyper's server and to ours: both end the connection with
    /// the same code, reset the same streams with the same codes, and answer the same ones.
    /// Where the RFC allows either of two answers and the two differ, the case is listed
    /// apart with both.
    #[tokio::test]
    async fn hyper_and_we_answer_frame_sequences_alike() {
        let get = |id| request(id, "GET", &[], true);
        let post = |id| request(id, "POST", &[], false);
        let cat = |parts: &[Vec<u8>]| parts.concat();
        let big = vec![0u8; MAX_FRAME + 1];
        let cases: Vec<(&str, Vec<u8>, Vec<u32>)> = vec![
            ("a GET", get(1), vec![1]),
            ("three GETs", cat(&[get(1), get(3), get(5)]), vec![1, 3, 5]),
            (
                "a POST with its body",
                cat(&[post(1), data(1, b"abc", true)]),
                vec![1],
            ),
            (
                "4.2 a frame over the maximum size",
                cat(&[post(1), data(1, &big, true)]),
                vec![],
            ),
            (
                "4.3 a block that does not decode",
                frame_bytes(
                    kind::HEADERS,
                    flag::END_HEADERS | flag::END_STREAM,
                    1,
                    &[0x80],
                ),
                vec![],
            ),
            ("5.1 DATA on an idle stream", data(1, b"x", true), vec![]),
            (
                "5.1 DATA after END_STREAM",
                cat(&[get(1), data(1, b"x", true)]),
                vec![1],
            ),
            (
                "5.1 RST_STREAM on an idle stream",
                frame_bytes(kind::RST_STREAM, 0, 1, &[0, 0, 0, 8]),
                vec![],
            ),
            (
                "5.1 WINDOW_UPDATE on an idle stream",
                frame_bytes(kind::WINDOW_UPDATE, 0, 1, &[0, 0, 0, 1]),
                vec![],
            ),
            ("5.1.1 an even stream id", get(2), vec![]),
            (
                "5.3.1 a PRIORITY on its own stream",
                frame_bytes(kind::PRIORITY, 0, 1, &[0, 0, 0, 1, 16]),
                vec![1],
            ),
            (
                "5.5 an unknown frame type",
                cat(&[frame_bytes(0xfa, 0, 0, b"abc"), get(1)]),
                vec![1],
            ),
            (
                "5.5 an unknown frame inside a header block",
                cat(&[
                    frame_bytes(
                        kind::HEADERS,
                        flag::END_STREAM,
                        1,
                        &block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]),
                    ),
                    frame_bytes(0xfa, 0, 0, b"abc"),
                ]),
                vec![],
            ),
            (
                "6.1 DATA on stream 0",
                frame_bytes(kind::DATA, 0, 0, b"x"),
                vec![],
            ),
            (
                "6.1 padding longer than the frame",
                cat(&[
                    post(1),
                    frame_bytes(kind::DATA, flag::PADDED, 1, &[9, 1, 2]),
                ]),
                vec![],
            ),
            (
                "6.2 HEADERS on stream 0",
                frame_bytes(
                    kind::HEADERS,
                    flag::END_HEADERS,
                    0,
                    &block(&[(":method", "GET")]),
                ),
                vec![],
            ),
            (
                "6.2 a header block interrupted",
                cat(&[
                    frame_bytes(
                        kind::HEADERS,
                        flag::END_STREAM,
                        1,
                        &block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]),
                    ),
                    data(1, b"x", true),
                ]),
                vec![],
            ),
            (
                "6.3 PRIORITY on stream 0",
                frame_bytes(kind::PRIORITY, 0, 0, &[0, 0, 0, 1, 16]),
                vec![],
            ),
            (
                "6.3 PRIORITY of 4 bytes",
                frame_bytes(kind::PRIORITY, 0, 1, &[0, 0, 0, 3]),
                vec![1],
            ),
            (
                "6.4 RST_STREAM on stream 0",
                frame_bytes(kind::RST_STREAM, 0, 0, &[0, 0, 0, 8]),
                vec![],
            ),
            (
                "6.4 RST_STREAM of 3 bytes",
                cat(&[post(1), frame_bytes(kind::RST_STREAM, 0, 1, &[0, 0, 8])]),
                vec![],
            ),
            (
                "6.5 SETTINGS ack with a payload",
                frame_bytes(kind::SETTINGS, flag::ACK, 0, &[0, 3, 0, 0, 0, 1]),
                vec![],
            ),
            (
                "6.5 SETTINGS on a stream",
                frame_bytes(kind::SETTINGS, 0, 1, &[]),
                vec![],
            ),
            (
                "6.5 SETTINGS of 5 bytes",
                frame_bytes(kind::SETTINGS, 0, 0, &[0, 3, 0, 0, 1]),
                vec![],
            ),
            (
                "6.5.2 ENABLE_PUSH of 2",
                frame_bytes(kind::SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2]),
                vec![],
            ),
            (
                "6.5.2 INITIAL_WINDOW_SIZE over 2^31-1",
                frame_bytes(kind::SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
                vec![],
            ),
            (
                "6.5.2 MAX_FRAME_SIZE under 2^14",
                frame_bytes(kind::SETTINGS, 0, 0, &[0, 5, 0, 0, 0x3f, 0xff]),
                vec![],
            ),
            (
                "6.5.2 an unknown setting",
                cat(&[
                    frame_bytes(kind::SETTINGS, 0, 0, &[0, 0xff, 0, 0, 0, 1]),
                    get(1),
                ]),
                vec![1],
            ),
            (
                "6.7 PING on a stream",
                frame_bytes(kind::PING, 0, 1, b"12345678"),
                vec![],
            ),
            (
                "6.7 PING of 7 bytes",
                frame_bytes(kind::PING, 0, 0, b"1234567"),
                vec![],
            ),
            (
                "6.8 GOAWAY on a stream",
                frame_bytes(kind::GOAWAY, 0, 1, &[0; 8]),
                vec![],
            ),
            (
                "6.9 WINDOW_UPDATE of 0 on the connection",
                frame_bytes(kind::WINDOW_UPDATE, 0, 0, &[0; 4]),
                vec![],
            ),
            (
                "6.9 WINDOW_UPDATE of 0 on a stream",
                cat(&[post(1), frame_bytes(kind::WINDOW_UPDATE, 0, 1, &[0; 4])]),
                vec![1],
            ),
            (
                "6.9 WINDOW_UPDATE of 3 bytes",
                frame_bytes(kind::WINDOW_UPDATE, 0, 0, &[0, 0, 1]),
                vec![],
            ),
            (
                "6.9.1 the connection's window over 2^31-1",
                frame_bytes(kind::WINDOW_UPDATE, 0, 0, &[0x7f, 0xff, 0xff, 0xff]),
                vec![],
            ),
            (
                "6.9.1 a stream's window over 2^31-1",
                cat(&[
                    post(1),
                    frame_bytes(kind::WINDOW_UPDATE, 0, 1, &[0x7f, 0xff, 0xff, 0xff]),
                ]),
                vec![1],
            ),
            (
                "6.10 CONTINUATION without a block",
                frame_bytes(kind::CONTINUATION, flag::END_HEADERS, 1, &[]),
                vec![],
            ),
            (
                "6.10 CONTINUATION of another stream",
                cat(&[
                    frame_bytes(
                        kind::HEADERS,
                        flag::END_STREAM,
                        1,
                        &block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]),
                    ),
                    frame_bytes(kind::CONTINUATION, flag::END_HEADERS, 3, &[]),
                ]),
                vec![],
            ),
            (
                "8.1 trailers that do not end the stream",
                cat(&[post(1), headers(1, &[("x-sum", "1")], false)]),
                vec![1],
            ),
            (
                "8.1.1 a body longer than its content-length",
                cat(&[
                    request(1, "POST", &[("content-length", "1")], false),
                    data(1, b"ab", true),
                ]),
                vec![1],
            ),
            (
                "8.1.1 a body shorter than its content-length",
                cat(&[
                    request(1, "POST", &[("content-length", "3")], false),
                    data(1, b"ab", true),
                ]),
                vec![1],
            ),
            (
                "8.3 a malformed head, then a good one",
                cat(&[request(1, "GET", &[("connection", "close")], true), get(3)]),
                vec![1, 3],
            ),
        ];
        // Where the h2 crate answers PROTOCOL_ERROR on the connection and RFC 9113 says a
        // MUST otherwise, we follow the RFC: the case's name, then our GOAWAY code or the
        // stream we reset with its code, and the rule.
        #[allow(clippy::type_complexity)]
        let rfc: Vec<(&str, Option<Reason>, Option<(u32, Reason)>, &str)> = vec![
            (
                "4.3 a block that does not decode",
                Some(Reason::COMPRESSION_ERROR),
                None,
                "§4.3: a decoding error is COMPRESSION_ERROR",
            ),
            (
                "5.1 DATA after END_STREAM",
                None,
                Some((1, Reason::STREAM_CLOSED)),
                "§5.1: half-closed (remote): a stream error STREAM_CLOSED",
            ),
            (
                "6.3 PRIORITY of 4 bytes",
                None,
                Some((1, Reason::FRAME_SIZE_ERROR)),
                "§6.3: a stream error FRAME_SIZE_ERROR",
            ),
            (
                "6.4 RST_STREAM of 3 bytes",
                Some(Reason::FRAME_SIZE_ERROR),
                None,
                "§6.4: a connection error FRAME_SIZE_ERROR",
            ),
            (
                "6.5 SETTINGS ack with a payload",
                Some(Reason::FRAME_SIZE_ERROR),
                None,
                "§6.5: a connection error FRAME_SIZE_ERROR",
            ),
            (
                "6.5 SETTINGS of 5 bytes",
                Some(Reason::FRAME_SIZE_ERROR),
                None,
                "§6.5: a connection error FRAME_SIZE_ERROR",
            ),
            (
                "6.5.2 INITIAL_WINDOW_SIZE over 2^31-1",
                Some(Reason::FLOW_CONTROL_ERROR),
                None,
                "§6.5.2: a connection error FLOW_CONTROL_ERROR",
            ),
            (
                "6.7 PING of 7 bytes",
                Some(Reason::FRAME_SIZE_ERROR),
                None,
                "§6.7: a connection error FRAME_SIZE_ERROR",
            ),
            (
                "6.9 WINDOW_UPDATE of 0 on a stream",
                None,
                Some((1, Reason::PROTOCOL_ERROR)),
                "§6.9: a stream error PROTOCOL_ERROR",
            ),
            (
                "6.9 WINDOW_UPDATE of 3 bytes",
                Some(Reason::FRAME_SIZE_ERROR),
                None,
                "§6.9: a connection error FRAME_SIZE_ERROR",
            ),
        ];
        let mut differ = Vec::new();
        for (name, case, streams) in &cases {
            let (hyper, we) = (hypers(case, streams).await, ours(case));
            match rfc.iter().find(|r| r.0 == *name) {
                None if hyper != we => {
                    differ.push(format!("{name}:\n  hyper {hyper:?}\n  we    {we:?}"))
                }
                None => {}
                Some((_, goaway, reset, rule)) => {
                    let expected = Outcome {
                        goaway: *goaway,
                        resets: reset.iter().copied().collect(),
                        served: Default::default(),
                    };
                    if we != expected {
                        differ.push(format!("{name} ({rule}): we {we:?}"));
                    }
                    if hyper == we || hyper.goaway != Some(Reason::PROTOCOL_ERROR) {
                        differ.push(format!(
                            "{name}: hyper answers {hyper:?} now: move it to the cases alike"
                        ));
                    }
                }
            }
        }
        assert!(differ.is_empty(), "{}", differ.join("\n"));
    }
}
