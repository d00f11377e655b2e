//! One HTTP/2 client connection as a state machine without I/O: what to write (`out`), and
//! what the bytes read mean for each stream. The task that owns the socket (`conn.rs`) feeds
//! it what it reads and writes what it queues; the requests and response bodies of the
//! thread's client connections open streams, wait for their heads and take their data.
//!
//! Rules kept here, each once (RFC 9113 unless said otherwise):
//! - the connection starts with the preface, our `SETTINGS` (no push, the stream window) and a
//!   larger connection window; the server's first frame must be `SETTINGS`;
//! - every header block is decoded whole, in order, even for a stream we no longer want, so
//!   the HPACK tables stay in step; a block is `HEADERS` then `CONTINUATION`s of the same
//!   stream and nothing else in between;
//! - a response head has one `:status`, first, and no other pseudo-field; no connection-
//!   specific field (§8.2.2); lowercase names; no NUL, CR or LF in values; at most
//!   [`MAX_HEAD`] bytes; 1xx heads are skipped (`101` is an error); trailers carry no
//!   pseudo-field and end the stream;
//! - `Content-Length` must agree with the `DATA` received (§8.1.1), and nothing comes after
//!   `HEAD`, `204` or `304`;
//! - flow control: a stream may be sent at most its window, returned as the client takes the
//!   data (so a slow client holds back only its own stream); the connection's window is
//!   returned as data arrives;
//! - `GOAWAY`: no new streams; those above its last id were not processed and may be sent
//!   again elsewhere, as may a stream refused with `REFUSED_STREAM`;
//! - a malformed response resets its stream (`PROTOCOL_ERROR`); a broken frame ends the
//!   connection with a `GOAWAY` naming the reason.

use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::frame::{self, flag, kind, FrameError, Head, Reason};
use super::hpack::{self, encode};
use crate::proxy::{codec, headers};

/// Largest response head (and trailer section) accepted, decoded: as for HTTP/1.1.
pub const MAX_HEAD: usize = crate::proxy::raw::MAX_HEAD;
/// The window each stream gets: what a stream's client may leave unread in memory.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's window, returned as data arrives (the streams' windows bound memory).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest frame we accept (our `SETTINGS_MAX_FRAME_SIZE`: the default).
const MAX_FRAME: usize = frame::MIN_MAX_FRAME_SIZE as usize;
/// The last stream id a client may open.
const LAST_STREAM_ID: u32 = (1 << 31) - 1;

/// Why a stream gave no response, or its body broke off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The upstream did not process the request (`GOAWAY` above it, `REFUSED_STREAM`, or the
    /// connection closed before it was sent): it may be sent again.
    #[error("the upstream did not process the request: {0}")]
    Refused(String),
    /// The upstream reset the stream.
    #[error("the upstream reset the stream: {0}")]
    Reset(Reason),
    /// The response broke a rule of HTTP/2 (the stream was reset).
    #[error("invalid HTTP/2 response from the upstream: {0}")]
    Invalid(&'static str),
    /// The connection failed.
    #[error("{0}")]
    Connection(String),
}

/// A response head, decoded: fields in the client's format, ready to write.
#[derive(Debug, Default)]
pub struct ResponseHead {
    pub status: Option<StatusCode>,
    /// Names and values, one after another; `fields` says where each is.
    bytes: Vec<u8>,
    fields: Vec<FieldAt>,
    /// The valid `Content-Length`, which is not among the fields (written anew).
    pub length: Option<u64>,
    pub date: bool,
    /// The fields include a `Trailer` declaration.
    pub trailer: bool,
}

#[derive(Debug, Clone, Copy)]
struct FieldAt {
    name: (u32, u32),
    value: (u32, u32),
}

impl ResponseHead {
    /// The fields that go to the client: name, value.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|f| {
            (
                &self.bytes[f.name.0 as usize..f.name.1 as usize],
                &self.bytes[f.value.0 as usize..f.value.1 as usize],
            )
        })
    }
}

/// What decoding a head found wrong (the whole block is decoded all the same).
#[derive(Debug, Default)]
struct HeadCheck {
    head: ResponseHead,
    regular: bool,
    error: Option<&'static str>,
    size: usize,
}

impl HeadCheck {
    fn field(&mut self, name: &[u8], value: &[u8], trailers: bool) {
        if self.error.is_some() {
            return;
        }
        self.size += name.len() + value.len() + 32;
        if self.size > MAX_HEAD {
            return self.fail("response head too large");
        }
        if value.iter().any(|b| matches!(b, b'\0' | b'\r' | b'\n')) {
            return self.fail("a field value holds NUL, CR or LF");
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if trailers || self.regular || pseudo != b"status" || self.head.status.is_some() {
                return self.fail("a pseudo-field other than one :status before the fields");
            }
            // Three digits, 100 to 999.
            match StatusCode::from_bytes(value) {
                Ok(s) => self.head.status = Some(s),
                Err(_) => self.fail("an invalid :status"),
            }
            return;
        }
        self.regular = true;
        if name.is_empty() || !name.iter().all(|b| is_lower_tchar(*b)) {
            return self.fail("a field name that is not a lowercase token");
        }
        if matches!(
            name,
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
        ) {
            return self.fail("a connection-specific field");
        }
        let mut keep = true;
        if name == b"content-length" {
            match codec::content_length(value, self.head.length) {
                Ok(n) => self.head.length = n,
                Err(e) => self.fail(e),
            }
            keep = false;
        } else if name == b"date" {
            self.head.date = true;
        } else if name == b"trailer" {
            self.head.trailer = true;
        } else if headers::is_hop_by_hop(name) {
            keep = false;
        }
        if keep {
            let at = |b: &mut Vec<u8>, s: &[u8]| {
                let start = b.len() as u32;
                b.extend_from_slice(s);
                (start, b.len() as u32)
            };
            let name = at(&mut self.head.bytes, name);
            let value = at(&mut self.head.bytes, value);
            self.head.fields.push(FieldAt { name, value });
        }
    }

    fn fail(&mut self, why: &'static str) {
        self.error.get_or_insert(why);
    }
}

fn is_lower_tchar(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'0'..=b'9' | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-'
        | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// Data received and not yet taken: most bodies are one piece, which needs no queue.
#[derive(Debug, Default)]
struct Pieces {
    first: Option<Bytes>,
    more: std::collections::VecDeque<Bytes>,
}

impl Pieces {
    fn push_back(&mut self, b: Bytes) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(b);
        } else {
            self.more.push_back(b);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.more.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.more.is_empty()
    }

    fn clear(&mut self) {
        self.first = None;
        self.more.clear();
    }
}

/// Where a stream is.
#[derive(Debug)]
enum State {
    /// Waiting for the final response head.
    Waiting,
    /// The head arrived; the front door has not taken it yet.
    Head(ResponseHead),
    /// The head was taken; the body follows.
    Body,
}

#[derive(Debug)]
struct Stream {
    id: u32,
    /// A `HEAD` request: no body may follow.
    head_request: bool,
    state: State,
    /// Data received and not yet taken.
    data: Pieces,
    /// Trailers received and not yet taken.
    trailers: Option<HeaderMap>,
    /// Nothing more comes from the upstream.
    ended: bool,
    error: Option<StreamError>,
    /// What the upstream may still send on it.
    window: i64,
    /// Data taken and not yet returned to the window.
    unreturned: u32,
    /// The response's `Content-Length`, and the data counted against it.
    length: Option<u64>,
    received: u64,
    /// Whether a body may come (not after `HEAD`, `204`, `304`).
    has_body: bool,
    waker: Option<Waker>,
}

impl Stream {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// The state of one connection. Its `Debug` leaves out the frames and the scratch space,
/// which hold the token as it goes out.
pub struct Session {
    /// Frames to write, in order.
    pub out: Vec<u8>,
    /// The task writing `out`, to wake when there is more.
    pub driver: Option<Waker>,
    streams: Vec<Stream>,
    next_id: u32,
    decoder: hpack::Decoder,
    /// Scratch space for encoding request heads.
    block: Vec<u8>,
    /// A response head given back, whose buffers the next one reuses.
    spare: Option<ResponseHead>,
    /// A header block in progress: its stream, bytes so far, and whether it ends the stream.
    continuing: Option<(u32, Vec<u8>, bool)>,
    got_settings: bool,
    peer_max_streams: u32,
    peer_max_frame: usize,
    /// Connection data received and not yet returned.
    unreturned: u32,
    /// No new streams: `GOAWAY` came, the pool is gone, or ids ran out.
    pub draining: bool,
    /// The connection failed; why.
    pub dead: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("open_streams", &self.streams.len())
            .field("next_id", &self.next_id)
            .field("queued_bytes", &self.out.len())
            .field("draining", &self.draining)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    /// A session whose preface, settings and window are queued in `out`.
    pub fn new() -> Session {
        let mut out = frame::PREFACE.to_vec();
        frame::write_settings(
            &mut out,
            &[
                (frame::setting::ENABLE_PUSH, 0),
                (frame::setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (frame::setting::MAX_HEADER_LIST_SIZE, MAX_HEAD as u32),
            ],
        );
        frame::write_window_update(&mut out, 0, CONNECTION_WINDOW - frame::DEFAULT_WINDOW);
        Session {
            out,
            driver: None,
            streams: Vec::new(),
            next_id: 1,
            decoder: hpack::Decoder::default(),
            block: Vec::new(),
            spare: None,
            continuing: None,
            got_settings: false,
            peer_max_streams: u32::MAX,
            peer_max_frame: frame::MIN_MAX_FRAME_SIZE as usize,
            unreturned: 0,
            draining: false,
            dead: None,
        }
    }

    /// Whether a new stream may be opened now.
    pub fn has_room(&self) -> bool {
        !self.draining
            && self.dead.is_none()
            && (self.streams.len() as u64) < u64::from(self.peer_max_streams)
            && self.next_id < LAST_STREAM_ID
    }

    /// How many streams are open.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    fn wake_driver(&mut self) {
        if let Some(w) = self.driver.take() {
            w.wake();
        }
    }

    /// Opens a stream for the bodiless request whose HTTP/1.1 head (as the proxy wrote it for
    /// the upstream: origin-form target, `Host`, end-to-end fields only) is `head`, and
    /// queues its `HEADERS`. `Host` becomes `:authority`; names are lowercased; the
    /// credential goes never-indexed.
    pub fn open(&mut self, head: &[u8], method: &Method) -> Result<u32, StreamError> {
        if !self.has_room() {
            return Err(StreamError::Refused("no stream could be opened".into()));
        }
        // Uninitialised, as in `raw.rs`: zeroing 512 fields costs more than the parse.
        let mut storage = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
            crate::proxy::raw::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            head,
            &mut storage,
        ) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => {
                return Err(StreamError::Invalid(
                    "the request head could not be re-read",
                ))
            }
        }
        let block = &mut self.block;
        block.clear();
        match req.method.unwrap_or("GET") {
            "GET" => encode::indexed(block, 2),
            other => encode::with_name(block, 2, other.as_bytes(), false),
        }
        encode::indexed(block, 7);
        match req.path.unwrap_or("/") {
            "/" => encode::indexed(block, 4),
            path => encode::with_name(block, 4, path.as_bytes(), false),
        }
        // Every pseudo-field comes before the fields (section 8.3): `Host` is written last.
        let host = req
            .headers
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case("host"))
            .map_or(&b""[..], |f| f.value);
        encode::with_name(block, 1, host, false);
        for field in req.headers.iter() {
            let name = field.name.as_bytes();
            if name.eq_ignore_ascii_case(b"host") {
                continue;
            } else if name.eq_ignore_ascii_case(b"authorization") {
                encode::with_name(block, 23, field.value, true);
            } else if headers::is_hop_by_hop(name) && !name.eq_ignore_ascii_case(b"te") {
                // Never written for the upstream; kept out all the same.
            } else {
                let never = name.eq_ignore_ascii_case(b"proxy-authorization")
                    || name.eq_ignore_ascii_case(b"cookie");
                encode::field_lowercased(block, name, field.value, never);
            }
        }
        let id = self.next_id;
        self.next_id += 2;
        frame::write_headers(&mut self.out, id, block, true, self.peer_max_frame);
        self.streams.push(Stream {
            id,
            head_request: *method == Method::HEAD,
            state: State::Waiting,
            data: Default::default(),
            trailers: None,
            ended: false,
            error: None,
            window: i64::from(STREAM_WINDOW),
            unreturned: 0,
            length: None,
            received: 0,
            has_body: true,
            waker: None,
        });
        self.wake_driver();
        Ok(id)
    }

    fn find(&self, id: u32) -> Option<usize> {
        self.streams.binary_search_by_key(&id, |s| s.id).ok()
    }

    /// The final response head of stream `id`, once it came.
    pub fn poll_head(
        &mut self,
        id: u32,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, StreamError>> {
        let dead = self.dead.clone();
        let Some(i) = self.find(id) else {
            return Poll::Ready(Err(StreamError::Connection(
                dead.unwrap_or_else(|| "the stream is gone".into()),
            )));
        };
        let s = &mut self.streams[i];
        if let State::Head(_) = s.state {
            let State::Head(head) = std::mem::replace(&mut s.state, State::Body) else {
                unreachable!()
            };
            return Poll::Ready(Ok(head));
        }
        if let Some(e) = s.error.clone() {
            self.remove(i);
            return Poll::Ready(Err(e));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next piece of stream `id`'s body: data, then trailers, then `None`.
    pub fn poll_data(
        &mut self,
        id: u32,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, StreamError>>> {
        let dead = self.dead.clone();
        let Some(i) = self.find(id) else {
            return Poll::Ready(Some(Err(StreamError::Connection(
                dead.unwrap_or_else(|| "the stream is gone".into()),
            ))));
        };
        let s = &mut self.streams[i];
        if let Some(data) = s.data.pop_front() {
            s.unreturned += data.len() as u32;
            // Return the window in large steps, not for each frame.
            if !s.ended && s.unreturned >= STREAM_WINDOW / 2 {
                let n = std::mem::take(&mut s.unreturned);
                s.window += i64::from(n);
                frame::write_window_update(&mut self.out, id, n);
                self.wake_driver();
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        if let Some(e) = s.error.clone() {
            self.remove(i);
            return Poll::Ready(Some(Err(e)));
        }
        if s.ended {
            let trailers = s.trailers.take();
            if trailers.is_none() {
                self.remove(i);
            }
            return Poll::Ready(trailers.map(|t| Ok(http_body::Frame::trailers(t))));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Takes back a response head once written, to reuse its buffers.
    pub fn recycle(&mut self, mut head: ResponseHead) {
        head.status = None;
        head.bytes.clear();
        head.fields.clear();
        head.length = None;
        head.date = false;
        head.trailer = false;
        self.spare = Some(head);
    }

    /// Whether stream `id` has nothing more to give (its data and trailers taken); not for a
    /// stream that is gone (its end, or its error, was given already).
    pub fn is_done(&self, id: u32) -> bool {
        self.find(id).is_some_and(|i| {
            let s = &self.streams[i];
            s.ended && s.data.is_empty() && s.trailers.is_none() && s.error.is_none()
        })
    }

    /// Stream `id` is no longer wanted (its request or body was dropped): reset it unless the
    /// upstream is done with it.
    pub fn cancel(&mut self, id: u32) {
        if let Some(i) = self.find(id) {
            if !self.streams[i].ended && self.dead.is_none() {
                frame::write_rst_stream(&mut self.out, id, Reason::CANCEL);
                self.wake_driver();
            }
            self.remove(i);
        }
    }

    fn remove(&mut self, i: usize) {
        let s = self.streams.remove(i);
        // The connection's window for data it still held is returned at once on arrival.
        drop(s);
        if self.streams.is_empty() {
            self.wake_driver();
        }
    }

    /// The connection failed: every stream fails with `why` (those not yet sent may go again).
    pub fn fail(&mut self, why: String) {
        if self.dead.is_some() {
            return;
        }
        for s in &mut self.streams {
            if s.error.is_none() && !s.ended {
                s.error = Some(StreamError::Connection(why.clone()));
            }
            s.wake();
        }
        self.dead = Some(why);
    }

    /// Ends the connection for a broken frame: `GOAWAY` with the reason, then close.
    fn connection_error(&mut self, e: FrameError) {
        if self.dead.is_none() {
            frame::write_goaway(&mut self.out, 0, e.reason);
            self.fail(format!("HTTP/2 connection error from the upstream: {e}"));
        }
    }

    /// Resets stream at `i` for a malformed response.
    fn stream_error(&mut self, i: usize, why: &'static str) {
        let s = &mut self.streams[i];
        frame::write_rst_stream(&mut self.out, s.id, Reason::PROTOCOL_ERROR);
        s.error = Some(StreamError::Invalid(why));
        s.ended = true;
        s.data.clear();
        s.wake();
    }

    /// Takes every complete frame at the front of `buf`. Returns `false` once the connection
    /// is dead (the caller writes what is queued and closes).
    pub fn receive(&mut self, buf: &mut BytesMut) -> bool {
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
        }
        // The driver, which called this, writes what was queued: no wake-up needed.
        self.dead.is_none()
    }

    fn frame(&mut self, head: &Head, payload: BytesMut) -> Result<(), FrameError> {
        let protocol = |what| FrameError {
            reason: Reason::PROTOCOL_ERROR,
            what,
        };
        if !self.got_settings && (head.kind != kind::SETTINGS || head.has(flag::ACK)) {
            return Err(protocol("the server's first frame was not SETTINGS"));
        }
        if let Some((stream, _, _)) = &self.continuing {
            if head.kind != kind::CONTINUATION || head.stream != *stream {
                return Err(protocol("a header block interrupted"));
            }
        }
        match head.kind {
            kind::DATA => self.data(head, payload.freeze()),
            kind::HEADERS => {
                let block = frame::headers(head, &payload)?;
                let end_stream = head.has(flag::END_STREAM);
                if head.has(flag::END_HEADERS) {
                    self.block_done(head.stream, block, end_stream)
                } else {
                    self.continuing = Some((head.stream, block.to_vec(), end_stream));
                    Ok(())
                }
            }
            kind::CONTINUATION => {
                let Some((stream, mut block, end_stream)) = self.continuing.take() else {
                    return Err(protocol("CONTINUATION without a header block"));
                };
                block.extend_from_slice(&payload);
                if block.len() > 2 * MAX_HEAD {
                    return Err(FrameError {
                        reason: Reason::ENHANCE_YOUR_CALM,
                        what: "a header block over twice the largest head",
                    });
                }
                if head.has(flag::END_HEADERS) {
                    self.block_done(stream, &block, end_stream)
                } else {
                    self.continuing = Some((stream, block, end_stream));
                    Ok(())
                }
            }
            kind::RST_STREAM => {
                let reason = frame::rst_stream(head, &payload)?;
                if let Some(i) = self.find(head.stream) {
                    let s = &mut self.streams[i];
                    let answered = !matches!(s.state, State::Waiting);
                    s.error = Some(if reason == Reason::REFUSED_STREAM && !answered {
                        StreamError::Refused(format!("stream refused ({reason})"))
                    } else {
                        StreamError::Reset(reason)
                    });
                    s.ended = true;
                    s.wake();
                } else if head.stream >= self.next_id {
                    return Err(protocol("RST_STREAM on a stream never opened"));
                }
                Ok(())
            }
            kind::SETTINGS => {
                if let Some(s) = frame::settings(head, &payload)? {
                    self.got_settings = true;
                    if let Some(n) = s.max_concurrent_streams {
                        self.peer_max_streams = n;
                    }
                    if let Some(n) = s.max_frame_size {
                        self.peer_max_frame = n as usize;
                    }
                    // Its table size bounds an encoder that indexes; ours never does.
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
                let (last, reason) = frame::goaway(head, &payload)?;
                self.draining = true;
                for s in self.streams.iter_mut().filter(|s| s.id > last) {
                    s.error = Some(StreamError::Refused(format!("GOAWAY ({reason})")));
                    s.ended = true;
                    s.wake();
                }
                Ok(())
            }
            kind::WINDOW_UPDATE => {
                // We send no data: the windows of our sending side need no keeping.
                match frame::window_update(&payload) {
                    Err(e) if head.stream == 0 => Err(e),
                    _ => Ok(()),
                }
            }
            kind::PUSH_PROMISE => Err(protocol("PUSH_PROMISE after we disabled push")),
            // PRIORITY, and unknown types, are ignored.
            _ => Ok(()),
        }
    }

    fn data(&mut self, head: &Head, mut payload: Bytes) -> Result<(), FrameError> {
        let len = payload.len();
        let data = frame::data(head, &payload)?;
        let (start, data_len) = (
            data.as_ptr() as usize - payload.as_ptr() as usize,
            data.len(),
        );
        // The connection's window comes back at once: the streams' windows bound memory.
        self.unreturned += len as u32;
        if self.unreturned >= CONNECTION_WINDOW / 2 {
            frame::write_window_update(&mut self.out, 0, std::mem::take(&mut self.unreturned));
        }
        let Some(i) = self.find(head.stream) else {
            if head.stream >= self.next_id {
                return Err(FrameError {
                    reason: Reason::PROTOCOL_ERROR,
                    what: "DATA on a stream never opened",
                });
            }
            // A stream we reset or finished: its data is dropped.
            return Ok(());
        };
        let s = &mut self.streams[i];
        if s.ended {
            return Err(FrameError {
                reason: Reason::STREAM_CLOSED,
                what: "DATA after the end of the stream",
            });
        }
        s.window -= len as i64;
        if s.window < 0 {
            return Err(FrameError {
                reason: Reason::FLOW_CONTROL_ERROR,
                what: "DATA over the stream's window",
            });
        }
        if !matches!(s.state, State::Head(_) | State::Body) {
            self.stream_error(i, "DATA before the response head");
            return Ok(());
        }
        s.received += data_len as u64;
        if data_len > 0 && !s.has_body {
            self.stream_error(i, "a body after HEAD, 204 or 304");
            return Ok(());
        }
        if s.length.is_some_and(|n| s.received > n) {
            self.stream_error(i, "more DATA than its Content-Length");
            return Ok(());
        }
        if data_len > 0 {
            payload.advance(start);
            payload.truncate(data_len);
            s.data.push_back(payload);
        }
        if head.has(flag::END_STREAM) {
            self.end(i)?;
        }
        if let Some(s) = self.streams.get_mut(i) {
            s.wake();
        }
        Ok(())
    }

    /// The upstream ended stream at `i`: its length must have been met.
    fn end(&mut self, i: usize) -> Result<(), FrameError> {
        let s = &mut self.streams[i];
        if s.has_body && s.length.is_some_and(|n| s.received != n) {
            self.stream_error(i, "less DATA than its Content-Length");
            return Ok(());
        }
        s.ended = true;
        Ok(())
    }

    fn block_done(&mut self, id: u32, block: &[u8], end_stream: bool) -> Result<(), FrameError> {
        let found = self.find(id);
        let trailers = found.is_some_and(|i| !matches!(self.streams[i].state, State::Waiting));
        let mut check = HeadCheck {
            head: self.spare.take().unwrap_or_default(),
            ..HeadCheck::default()
        };
        self.decoder
            .decode(block, |n, v| check.field(n, v, trailers))
            .map_err(|_| FrameError {
                reason: Reason::COMPRESSION_ERROR,
                what: "a header block that does not decode",
            })?;
        let Some(i) = found else {
            if id >= self.next_id || id.is_multiple_of(2) {
                return Err(FrameError {
                    reason: Reason::PROTOCOL_ERROR,
                    what: "HEADERS on a stream never opened",
                });
            }
            return Ok(());
        };
        if let Some(why) = check.error {
            self.stream_error(i, why);
            return Ok(());
        }
        let s = &mut self.streams[i];
        if s.ended {
            return Err(FrameError {
                reason: Reason::STREAM_CLOSED,
                what: "HEADERS after the end of the stream",
            });
        }
        if trailers {
            if !end_stream {
                self.stream_error(i, "trailers that do not end the stream");
                return Ok(());
            }
            let mut map = HeaderMap::new();
            for (n, v) in check.head.fields() {
                if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                    map.append(n, v);
                }
            }
            s.trailers = Some(map);
            self.recycle(check.head);
            self.end(i)?;
            self.streams[i].wake();
            return Ok(());
        }
        let Some(status) = check.head.status else {
            self.stream_error(i, "a response head without :status");
            return Ok(());
        };
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                self.stream_error(i, "101 Switching Protocols is not allowed in HTTP/2");
            } else if end_stream {
                self.stream_error(i, "an interim response that ends the stream");
            }
            // 100, 103: the final head follows.
            return Ok(());
        }
        let method = if s.head_request {
            Method::HEAD
        } else {
            Method::GET
        };
        s.has_body = codec::response_has_body(&method, status);
        s.length = check.head.length;
        s.state = State::Head(check.head);
        if end_stream {
            self.end(i)?;
        }
        self.streams[i].wake();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h2::frame::HEAD_LEN;

    const GET: &[u8] =
        b"GET /x HTTP/1.1\r\nauthorization: Bearer s3cret-token\r\nhost: api\r\n\r\n";

    /// A session past the server's preface, with one stream open (id 1).
    fn open() -> (Session, Context<'static>) {
        let mut s = Session::new();
        let mut buf = BytesMut::new();
        let mut settings = Vec::new();
        frame::write_settings(&mut settings, &[]);
        buf.extend_from_slice(&settings);
        assert!(s.receive(&mut buf));
        assert_eq!(s.open(GET, &Method::GET).unwrap(), 1);
        s.out.clear();
        (s, Context::from_waker(Waker::noop()))
    }

    fn feed(s: &mut Session, frames: &[u8]) -> bool {
        let mut buf = BytesMut::from(frames);
        s.receive(&mut buf)
    }

    fn headers(id: u32, fields: &[(&[u8], &[u8])], end: bool) -> Vec<u8> {
        let mut block = Vec::new();
        for (n, v) in fields {
            encode::field(&mut block, n, v, false);
        }
        let mut out = Vec::new();
        frame::write_headers(&mut out, id, &block, end, 16_384);
        out
    }

    fn data(id: u32, bytes: &[u8], end: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let flags = if end { flag::END_STREAM } else { 0 };
        frame::write_head(&mut out, bytes.len(), kind::DATA, flags, id);
        out.extend_from_slice(bytes);
        out
    }

    /// The `GOAWAY` reason the session queued, if it ended the connection.
    fn goaway(s: &Session) -> Option<Reason> {
        let mut buf = s.out.strip_prefix(frame::PREFACE).unwrap_or(&s.out);
        while let Some(head) = Head::parse(buf) {
            let payload = &buf[HEAD_LEN..HEAD_LEN + head.len];
            if head.kind == kind::GOAWAY {
                return Some(frame::goaway(&head, payload).unwrap().1);
            }
            buf = &buf[HEAD_LEN + head.len..];
        }
        None
    }

    #[test]
    fn a_session_starts_with_the_preface_our_settings_and_a_larger_window() {
        let s = Session::new();
        let rest = s
            .out
            .strip_prefix(frame::PREFACE)
            .expect("the preface first");
        let settings = Head::parse(rest).unwrap();
        assert_eq!(settings.kind, kind::SETTINGS);
        let ours = frame::settings(&settings, &rest[HEAD_LEN..HEAD_LEN + settings.len])
            .unwrap()
            .unwrap();
        assert_eq!(ours.enable_push, Some(false));
        assert_eq!(ours.initial_window_size, Some(256 * 1024));
        assert_eq!(ours.max_header_list_size, Some(64 * 1024));
        let rest = &rest[HEAD_LEN + settings.len..];
        let update = Head::parse(rest).unwrap();
        assert_eq!((update.kind, update.stream), (kind::WINDOW_UPDATE, 0));
        let increment = frame::window_update(&rest[HEAD_LEN..HEAD_LEN + update.len]).unwrap();
        assert_eq!(
            increment + 65_535,
            16 * 1024 * 1024,
            "the connection's window: 16 MiB"
        );
        assert_eq!(rest.len(), HEAD_LEN + update.len, "nothing else");
    }

    #[test]
    fn its_debug_shows_no_token() {
        let (mut s, _) = open();
        s.open(GET, &Method::GET).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            s.out.windows(6).any(|w| w == b"s3cret"),
            "the token did go out"
        );
    }

    #[test]
    fn a_response_head_and_body_are_taken_in_turn() {
        let (mut s, mut cx) = open();
        assert!(s.poll_head(1, &mut cx).is_pending());
        let mut wire = headers(1, &[(b":status", b"200"), (b"content-length", b"5")], false);
        wire.extend(data(1, b"hel", false));
        wire.extend(data(1, b"lo", true));
        assert!(feed(&mut s, &wire));
        let Poll::Ready(Ok(head)) = s.poll_head(1, &mut cx) else {
            panic!("no head")
        };
        assert_eq!((head.status, head.length), (Some(StatusCode::OK), Some(5)));
        assert_eq!(head.fields().count(), 0, "content-length is written anew");
        let mut body = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = s.poll_data(1, &mut cx) {
            body.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(body, b"hello");
        assert_eq!(s.open_streams(), 0);
    }

    /// A stream the upstream ended is closed: dropping its body sends nothing (no frame but
    /// PRIORITY may go on a closed stream); one still open is reset.
    #[test]
    fn a_dropped_body_resets_its_stream_only_while_it_is_open() {
        let (mut s, mut cx) = open();
        s.open(GET, &Method::GET).unwrap();
        s.out.clear();
        let mut wire = headers(1, &[(b":status", b"200")], false);
        wire.extend(data(1, b"all of it", true));
        wire.extend(headers(3, &[(b":status", b"200")], false));
        assert!(feed(&mut s, &wire));
        assert!(matches!(s.poll_head(1, &mut cx), Poll::Ready(Ok(_))));
        assert!(matches!(s.poll_head(3, &mut cx), Poll::Ready(Ok(_))));
        s.cancel(1);
        assert!(s.out.is_empty(), "nothing on a closed stream: {:?}", s.out);
        s.cancel(3);
        let rst = Head::parse(&s.out).unwrap();
        assert_eq!((rst.kind, rst.stream), (kind::RST_STREAM, 3));
        assert_eq!(s.open_streams(), 0);
    }

    #[test]
    fn lengths_that_disagree_with_the_data_reset_the_stream() {
        for (wire, why) in [
            (
                [
                    headers(1, &[(b":status", b"200"), (b"content-length", b"5")], false),
                    data(1, b"hel", true),
                ]
                .concat(),
                "less DATA",
            ),
            (
                [
                    headers(1, &[(b":status", b"200"), (b"content-length", b"1")], false),
                    data(1, b"hel", true),
                ]
                .concat(),
                "more DATA",
            ),
        ] {
            let (mut s, mut cx) = open();
            assert!(feed(&mut s, &wire), "a stream error, not a connection one");
            let _ = s.poll_head(1, &mut cx);
            let mut got = None;
            while let Poll::Ready(Some(r)) = s.poll_data(1, &mut cx) {
                if let Err(e) = r {
                    got = Some(e);
                    break;
                }
            }
            assert!(
                matches!(got, Some(StreamError::Invalid(w)) if w.contains(why)),
                "{got:?}"
            );
            let rst = Head::parse(&s.out).unwrap();
            assert_eq!((rst.kind, rst.stream), (kind::RST_STREAM, 1));
        }
        // After HEAD, no body may come.
        let mut s = Session::new();
        let mut settings = Vec::new();
        frame::write_settings(&mut settings, &[]);
        feed(&mut s, &settings);
        s.open(GET, &Method::HEAD).unwrap();
        let mut wire = headers(1, &[(b":status", b"200"), (b"content-length", b"5")], false);
        wire.extend(data(1, b"hello", true));
        feed(&mut s, &wire);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(s.poll_head(1, &mut cx), Poll::Ready(Ok(_))));
        assert!(matches!(
            s.poll_data(1, &mut cx),
            Poll::Ready(Some(Err(StreamError::Invalid(_))))
        ));
    }

    #[test]
    fn broken_frames_end_the_connection_with_their_reason() {
        let push = {
            let mut out = Vec::new();
            frame::write_head(&mut out, 4, kind::PUSH_PROMISE, flag::END_HEADERS, 1);
            out.extend_from_slice(&[0, 0, 0, 2]);
            out
        };
        let interrupted = {
            let mut block = Vec::new();
            encode::with_name(&mut block, 8, b"200", false);
            let mut out = Vec::new();
            frame::write_head(&mut out, block.len(), kind::HEADERS, 0, 1);
            out.extend_from_slice(&block);
            out.extend(data(1, b"x", false));
            out
        };
        let over_window = [
            headers(1, &[(b":status", b"200")], false),
            data(1, &vec![0; 16_384], false).repeat(17),
        ]
        .concat();
        let too_big = {
            let mut out = Vec::new();
            frame::write_head(&mut out, 16_385, kind::DATA, 0, 1);
            out.extend(vec![0; 16_385]);
            out
        };
        let never_opened = headers(5, &[(b":status", b"200")], true);
        for (wire, reason) in [
            (push, Reason::PROTOCOL_ERROR),
            (interrupted, Reason::PROTOCOL_ERROR),
            (over_window, Reason::FLOW_CONTROL_ERROR),
            (too_big, Reason::FRAME_SIZE_ERROR),
            (never_opened, Reason::PROTOCOL_ERROR),
            (
                vec![0, 0, 1, kind::HEADERS, 4, 0, 0, 0, 1, 0xbf],
                Reason::COMPRESSION_ERROR,
            ),
        ] {
            let (mut s, mut cx) = open();
            assert!(!feed(&mut s, &wire), "{reason}");
            assert_eq!(goaway(&s), Some(reason));
            // The stream fails with the connection: at its head, or (a head came first) in
            // its body.
            let failed = match s.poll_head(1, &mut cx) {
                Poll::Ready(Err(e)) => e,
                Poll::Ready(Ok(_)) => loop {
                    match s.poll_data(1, &mut cx) {
                        Poll::Ready(Some(Err(e))) => break e,
                        Poll::Ready(Some(Ok(_))) => {}
                        other => panic!("{reason}: {other:?}"),
                    }
                },
                Poll::Pending => panic!("{reason}: pending"),
            };
            assert!(
                matches!(failed, StreamError::Connection(_)),
                "{reason}: {failed:?}"
            );
            assert!(!s.has_room());
        }
        // The server's first frame must be its SETTINGS, not another frame nor an ack.
        let mut ack = Vec::new();
        frame::write_settings_ack(&mut ack);
        for first in [data(1, b"x", false), ack] {
            let mut s = Session::new();
            assert!(!feed(&mut s, &first));
            assert_eq!(goaway(&s), Some(Reason::PROTOCOL_ERROR));
        }
    }

    #[test]
    fn malformed_heads_reset_only_their_stream() {
        for fields in [
            &[(&b":status"[..], &b"200"[..]), (b":path", b"/")][..],
            &[(b"x-a", b"1"), (b":status", b"200")],
            &[(b":status", b"200"), (b"Upper", b"1")],
            &[(b":status", b"200"), (b"transfer-encoding", b"chunked")],
            &[(b":status", b"200"), (b"x-a", b"a\rb")],
            &[(b":status", b"2000")],
            &[(b":status", b"20")],
            &[(b":status", b"200"), (b":status", b"204")],
            &[(b"x-a", b"1")],
        ] {
            let (mut s, mut cx) = open();
            assert!(feed(&mut s, &headers(1, fields, true)), "{fields:?}");
            assert!(
                matches!(
                    s.poll_head(1, &mut cx),
                    Poll::Ready(Err(StreamError::Invalid(_)))
                ),
                "{fields:?}"
            );
            assert!(s.has_room(), "the connection serves on");
        }
    }

    /// A head of exactly [`MAX_HEAD`] (names, values and 32 per field, as RFC 9113 counts a
    /// header list) passes; a byte more resets the stream.
    #[test]
    fn a_response_head_may_be_as_large_as_the_limit_and_no_larger() {
        // `:status: 200` counts 7 + 3 + 32, `x-a` 3 + 32 and its value.
        let fits = vec![b'v'; MAX_HEAD - 42 - 35];
        for (value, ok) in [(fits.clone(), true), ([fits, vec![b'v']].concat(), false)] {
            let (mut s, mut cx) = open();
            let wire = headers(1, &[(b":status", b"200"), (b"x-a", &value)], true);
            assert!(feed(&mut s, &wire));
            match s.poll_head(1, &mut cx) {
                Poll::Ready(Ok(head)) => {
                    assert!(ok, "one byte over the limit was taken");
                    assert_eq!(head.fields().next().unwrap().1.len(), value.len());
                }
                Poll::Ready(Err(StreamError::Invalid(why))) => {
                    assert!(!ok, "refused at the limit: {why}");
                    assert!(why.contains("too large"), "{why}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn interim_heads_are_skipped_and_trailers_end_the_stream() {
        let (mut s, mut cx) = open();
        let mut wire = headers(1, &[(b":status", b"103"), (b"link", b"</a>")], false);
        wire.extend(headers(
            1,
            &[(b":status", b"200"), (b"trailer", b"x-sum")],
            false,
        ));
        wire.extend(data(1, b"abc", false));
        wire.extend(headers(1, &[(b"x-sum", b"7")], true));
        assert!(feed(&mut s, &wire));
        let Poll::Ready(Ok(head)) = s.poll_head(1, &mut cx) else {
            panic!("no head")
        };
        assert_eq!(head.status, Some(StatusCode::OK));
        assert!(head.trailer);
        assert!(matches!(s.poll_data(1, &mut cx), Poll::Ready(Some(Ok(f))) if f.is_data()));
        let Poll::Ready(Some(Ok(trailers))) = s.poll_data(1, &mut cx) else {
            panic!("no trailers")
        };
        assert_eq!(trailers.into_trailers().unwrap()["x-sum"], "7");
        assert!(matches!(s.poll_data(1, &mut cx), Poll::Ready(None)));
    }

    #[test]
    fn goaway_and_refused_streams_may_go_again_and_settings_are_obeyed() {
        let (mut s, mut cx) = open();
        s.open(GET, &Method::GET).unwrap();
        let mut wire = Vec::new();
        frame::write_rst_stream(&mut wire, 1, Reason::REFUSED_STREAM);
        frame::write_goaway(&mut wire, 1, Reason::NO_ERROR);
        assert!(feed(&mut s, &wire));
        assert!(matches!(
            s.poll_head(1, &mut cx),
            Poll::Ready(Err(StreamError::Refused(_)))
        ));
        assert!(matches!(
            s.poll_head(3, &mut cx),
            Poll::Ready(Err(StreamError::Refused(_)))
        ));
        assert!(!s.has_room(), "no new stream after GOAWAY");
        // The stream limit and frame size of the peer's settings.
        let (mut s, _) = open();
        let mut wire = Vec::new();
        frame::write_settings(
            &mut wire,
            &[
                (frame::setting::MAX_CONCURRENT_STREAMS, 2),
                (frame::setting::MAX_FRAME_SIZE, 20_000),
            ],
        );
        frame::write_head(&mut wire, 8, kind::PING, 0, 0);
        wire.extend_from_slice(b"12345678");
        assert!(feed(&mut s, &wire));
        assert!(s.has_room());
        s.open(GET, &Method::GET).unwrap();
        assert!(!s.has_room(), "two streams open: the limit");
        let acks: Vec<Head> = {
            let mut heads = Vec::new();
            let mut buf = &s.out[..];
            while let Some(h) = Head::parse(buf) {
                heads.push(h);
                buf = &buf[HEAD_LEN + h.len..];
            }
            heads
        };
        assert!(acks
            .iter()
            .any(|h| h.kind == kind::SETTINGS && h.has(flag::ACK)));
        assert!(acks
            .iter()
            .any(|h| h.kind == kind::PING && h.has(flag::ACK)));
        assert_eq!(s.peer_max_frame, 20_000);
    }
}
