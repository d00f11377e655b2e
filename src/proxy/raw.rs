//! A lean HTTP/1.1 exchange for the commonest proxied request: one without a body (`GET`,
//! `HEAD`, `DELETE`, `OPTIONS`), to a plain-`http` upstream or over TLS to an `https` one
//! (`stream.rs`): the same bytes and rules either way.
//!
//! Why: through hyper's client, such a request crosses a channel to a connection task, which
//! encodes it, parses the answer into a second channel, and is woken several times; callgrind
//! put about 40 % of a proxied GET's instructions in that task. Here the request future
//! writes the head itself (one `write`), parses the response head with `httparse` (as hyper
//! does) straight into the response, header values sliced from the read buffer without a copy,
//! and the response body reads the socket itself, all in the client connection's task.
//!
//! Framing follows RFC 9112 §6.3: no body after `HEAD` and for 1xx, 204 and 304; a final
//! `chunked` transfer coding is decoded (trailers included); `Content-Length` must be one
//! number; anything else is read to the end of the connection. Interim 1xx answers are skipped
//! (`101` was not asked for: an error). A connection goes back to the pool only when the
//! response was complete, HTTP/1.1, not `Connection: close`, and nothing followed it.
//!
//! The response comes back with its hop-by-hop fields already taken out (`Connection` and the
//! fields it names, `Transfer-Encoding`, `TE`, `Upgrade`, `Keep-Alive`, `Proxy-Connection`,
//! `Proxy-Authenticate`, `Proxy-Authorization`, and `Trailer` unless the body is streamed):
//! the parser sees each field once anyway, and this spares a second pass over the map.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{request, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::stream::{Idle, UpstreamStream};
use super::{codec, headers};

/// Largest response head (and trailer section) accepted: nginx's default is one 4 or 8 KiB
/// buffer, HAProxy's 16 KiB.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head (HAProxy's limit is 101, hyper's default 100).
pub const MAX_HEADERS: usize = 512;
/// Bytes asked of the socket per read of a response head.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes asked of the socket per read of a response body, at first and at most: a read that
/// fills its buffer doubles the next one, so large bodies stream in large frames. An idle
/// connection keeps a buffer of the first size only (see `RawBody::finish`).
const BODY_CHUNK: (usize, usize) = (16 * 1024, 512 * 1024);

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// A reused connection ended before any byte of the answer: the upstream had closed it
    /// (the keep-alive race); the request may be sent again on a new connection.
    #[error("the upstream closed a kept-alive connection before answering")]
    Stale,
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The upstream's answer is not valid HTTP/1.1.
    #[error("invalid response from the upstream: {0}")]
    Invalid(String),
}

/// One upstream connection for bodiless requests. Boxed once, when it is made: it travels
/// inside each response body, which is moved several times on its way to the client.
#[derive(Debug)]
pub struct RawConn(Box<ConnState>);

/// What a [`RawConn`] holds.
#[derive(Debug)]
pub struct ConnState {
    stream: UpstreamStream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    out: Vec<u8>,
    /// Whether it served a request before (a failure to answer then means "stale").
    reused: bool,
    /// Scratch space for parsing response heads (kept to reuse its allocation).
    fields: Vec<Field>,
    /// When it was last put back.
    pub idle_since: Instant,
}

impl std::ops::Deref for RawConn {
    type Target = ConnState;
    fn deref(&self) -> &ConnState {
        &self.0
    }
}

impl std::ops::DerefMut for RawConn {
    fn deref_mut(&mut self) -> &mut ConnState {
        &mut self.0
    }
}

impl RawConn {
    /// A fresh connection over `stream` (TCP, or TLS over TCP).
    pub fn new(stream: impl Into<UpstreamStream>) -> RawConn {
        RawConn(Box::new(ConnState {
            stream: stream.into(),
            buf: BytesMut::new(),
            out: Vec::new(),
            reused: false,
            fields: Vec::new(),
            idle_since: Instant::now(),
        }))
    }

    /// Whether this idle connection may carry another request: nothing has arrived on it since
    /// its last response ended. A stray byte (a body after a `HEAD` or `204` head, more than
    /// its `Content-Length`, a `408` sent before closing) means the upstream's framing and
    /// ours disagree, and reading on would hand those bytes to the next client as its
    /// answer; an end of stream means the upstream closed it. Either way it must go.
    ///
    /// Nearly free: tokio keeps the socket's readiness, so while no event came since the last
    /// read drained it, this makes no system call (see [`UpstreamStream::idle_state`]).
    pub fn is_quiet(&mut self) -> bool {
        match self.0.stream.idle_state() {
            Idle::Quiet => true,
            Idle::Closed => {
                tracing::debug!("idle upstream connection was closed by the upstream");
                false
            }
            Idle::Stray => {
                tracing::debug!(
                    "idle upstream connection got bytes no request asked for: closing it"
                );
                false
            }
            Idle::Failed(e) => {
                tracing::debug!(error = %e, "idle upstream connection failed");
                false
            }
        }
    }

    /// Sends the bodiless request `parts` (target as in `parts.uri`, headers ready) and reads
    /// the response head into a [`Response`]. The body reads the rest and hands the connection
    /// to `done` when it may serve another request.
    pub async fn exchange(
        mut self,
        parts: &request::Parts,
        done: Done,
    ) -> Result<Response<RawBody>, RawError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        write_head(&mut out, parts);
        let sent = self.roundtrip(&out, &parts.method).await;
        self.out = out;
        let head = sent?;
        let bytes = Bytes::copy_from_slice(&self.buf[..head.len]);
        let mut headers = HeaderMap::with_capacity(head.fields.len());
        for field in head.fields.iter().filter(|f| f.kept) {
            let name = HeaderName::from_bytes(&bytes[field.name.0..field.name.1])
                .map_err(|_| RawError::Invalid("a header name".into()))?;
            let value = HeaderValue::from_maybe_shared(bytes.slice(field.value.0..field.value.1))
                .map_err(|_| RawError::Invalid("a header value".into()))?;
            headers.append(name, value);
        }
        if let Some(n) = head.length.filter(|_| passes_length(head.status)) {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let (status, version) = (head.status, head.version);
        let body = self.into_body(head, done);
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(response)
    }

    /// Sends the bodiless request `head` (a complete request head, ready for the upstream) for
    /// `method` and writes the response head, ready for the client, to `client.out`: what the
    /// front door sends back, without `http` types in between. Returns the status, the body
    /// and how the client's copy of the body is framed.
    pub async fn exchange_for_client(
        mut self,
        head: &[u8],
        method: &Method,
        client: &mut ClientHead<'_>,
        done: Done,
    ) -> Result<(StatusCode, RawBody, ClientFraming), RawError> {
        let parsed = self.roundtrip(head, method).await?;
        let framing = client.write(&self.buf[..parsed.len], &parsed, method);
        let status = parsed.status;
        Ok((status, self.into_body(parsed, done), framing))
    }

    /// The body that reads the rest of the response whose head is `head`.
    fn into_body(mut self, head: Head, done: Done) -> RawBody {
        self.buf.advance(head.len);
        self.fields = head.fields;
        self.reused = true;
        let mut body = RawBody {
            conn: Some(self),
            chunk: BODY_CHUNK.0,
            framing: head.framing,
            reusable: head.reusable,
            done: None,
        };
        body.on_done(done);
        body
    }

    /// Writes `request` and reads up to a complete final response head (left in the buffer).
    async fn roundtrip(&mut self, request: &[u8], method: &Method) -> Result<Head, RawError> {
        let state = &mut *self.0;
        // Over TLS the records are written by the flush (a no-op over TCP).
        let written = match state.stream.write_all(request).await {
            Ok(()) => state.stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            return Err(if state.reused {
                RawError::Stale
            } else {
                e.into()
            });
        }
        let mut fields = std::mem::take(&mut state.fields);
        loop {
            match parse_head(&state.buf, method, &mut fields) {
                Ok(Some(head)) if head.status.is_informational() => {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(RawError::Invalid(
                            "101 Switching Protocols to a request that asked for no upgrade".into(),
                        ));
                    }
                    // 100 Continue, 103 Early Hints: the final answer follows.
                    state.buf.advance(head.len);
                    fields = head.fields;
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            state.buf.reserve(READ_CHUNK);
            match state.stream.read_buf(&mut state.buf).await {
                Ok(0) if state.buf.is_empty() && state.reused => return Err(RawError::Stale),
                Ok(0) => {
                    return Err(RawError::Invalid(
                        "the connection closed before the response head".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) if state.buf.is_empty() && state.reused => {
                    tracing::debug!(error = %e, "reused upstream connection failed");
                    return Err(RawError::Stale);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `METHOD target HTTP/1.1`, the headers, an empty line.
fn write_head(out: &mut Vec<u8>, parts: &request::Parts) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    if let (Some(scheme), Some(authority)) = (parts.uri.scheme_str(), parts.uri.authority()) {
        out.extend_from_slice(scheme.as_bytes());
        out.extend_from_slice(b"://");
        out.extend_from_slice(authority.as_str().as_bytes());
    }
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        codec::write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head, still in the read buffer: its status, where its fields are and
/// which of them go on (hop-by-hop ones do not), and what framing and reuse need of the rest.
struct Head {
    status: StatusCode,
    version: Version,
    /// Length of the head in the buffer.
    len: usize,
    fields: Vec<Field>,
    /// Whether the fields include a `Date`.
    date: bool,
    /// The `Content-Length` to pass on, if the response had a valid one (and no
    /// `Transfer-Encoding`): its fields are not passed on as they came.
    length: Option<u64>,
    framing: Framing,
    /// Whether the connection can serve another request after this response.
    reusable: bool,
}

/// Where a response field's name and value are in the head, and whether it goes on.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    name: (usize, usize),
    value: (usize, usize),
    kept: bool,
    trailer: bool,
}

/// Parses a complete response head at the front of `buf` (left there), or `None` if more
/// bytes are needed. `fields` is scratch space, returned in the head.
///
/// Hop-by-hop fields (RFC 9110 §7.6.1) are marked not to go on as the parser sees them: a
/// bodiless request never upgrades, so `Connection` and the fields it names,
/// `Transfer-Encoding`, `TE`, `Upgrade`, `Keep-Alive`, `Proxy-Connection`,
/// `Proxy-Authenticate`, `Proxy-Authorization`; `Trailer` unless the body is streamed; and a
/// `Content-Length` that came with `Transfer-Encoding`, which also ends the connection.
fn parse_head(
    buf: &[u8],
    method: &Method,
    fields: &mut Vec<Field>,
) -> Result<Option<Head>, RawError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Uninitialised: zeroing 128 fields costs more than parsing a typical head.
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut storage) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return Err(head_too_large()),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(head_too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(head_too_large()),
        Err(e) => return Err(RawError::Invalid(e.to_string())),
    };
    let code = parsed.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| RawError::Invalid(format!("status code {code}")))?;
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let (mut chunked, mut length, mut close, mut date) = (None, Ok(None), false, false);
    let mut has_length = false;
    // Fields a `Connection` header names besides its options (rare): hop-by-hop too.
    let mut named: Vec<&[u8]> = Vec::new();
    fields.clear();
    for field in parsed.headers.iter() {
        let (name, value) = (field.name.as_bytes(), field.value);
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        let mut kept = true;
        let mut trailer = false;
        if is(b"connection") {
            close |= codec::has_token(value, b"close");
            named.extend(headers::connection_named(value, false));
            kept = false;
        } else if is(b"transfer-encoding") {
            chunked = Some(codec::ends_chunked(value));
            kept = false;
        } else if is(b"content-length") {
            // Written anew, once, from the length (see `ClientHead::write`): repeated equal
            // values, or a list of them, reach the client as one.
            length = length.and_then(|l| codec::content_length(value, l));
            has_length = true;
            kept = false;
        } else if is(b"date") {
            date = true;
        } else if is(b"trailer") {
            trailer = true;
        } else if headers::is_hop_by_hop(name) {
            kept = false;
        }
        fields.push(Field {
            name: span(name),
            value: span(value),
            kept,
            trailer,
        });
    }
    let framing = match codec::response_framing(method, status, chunked, length) {
        Ok(codec::ResponseBody::Empty) => Framing::Empty,
        Ok(codec::ResponseBody::Length(n)) => Framing::Length(n),
        Ok(codec::ResponseBody::Chunked) => Framing::Chunked(Chunk::Size),
        Ok(codec::ResponseBody::Close) => Framing::Close,
        Err(e) => return Err(RawError::Invalid(e.into())),
    };
    let streamed = matches!(framing, Framing::Chunked(_) | Framing::Close);
    // Transfer-Encoding overrides Content-Length, which must not be passed on with it
    // (RFC 9112 §6.3), and such a message ends the connection.
    let both = chunked.is_some() && has_length;
    if both || !streamed || !named.is_empty() {
        for field in fields.iter_mut() {
            let name = &buf[field.name.0..field.name.1];
            if (field.trailer && !streamed) || named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                field.kept = false;
            }
        }
    }
    let keep_alive = !both && version == Version::HTTP_11 && !close;
    Ok(Some(Head {
        status,
        version,
        len,
        fields: std::mem::take(fields),
        date,
        // A length that came with `Transfer-Encoding` is stale: not passed on.
        length: if chunked.is_some() {
            None
        } else {
            length.ok().flatten()
        },
        reusable: keep_alive && !matches!(framing, Framing::Close),
        framing,
    }))
}

fn head_too_large() -> RawError {
    RawError::Invalid(format!(
        "response head too large: over {MAX_HEAD} bytes or {MAX_HEADERS} fields"
    ))
}

/// Whether a response with `status` carries on its `Content-Length` when it sends no body:
/// a `HEAD`'s or a `304`'s describes the body not sent; 1xx and 204 have none (RFC 9110 §8.6).
fn passes_length(status: StatusCode) -> bool {
    !(status.is_informational() || status == StatusCode::NO_CONTENT)
}

/// How the client's copy of a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    /// No body (`HEAD`, 1xx, 204, 304).
    None,
    /// As many bytes as its `Content-Length` says.
    Length,
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Where the front door wants the response head written, and what its client asked.
#[derive(Debug)]
pub struct ClientHead<'a> {
    /// The buffer the head is written to.
    pub out: &'a mut Vec<u8>,
    /// The client asked to close: the head says `connection: close`.
    pub close: bool,
    /// The client's `TE` accepts trailers.
    pub te: bool,
    /// The trailer fields the response declares, collected when the client accepts trailers.
    pub trailers: Vec<HeaderName>,
    /// Where redirects to the upstream's own origin go instead (`rewrite_location`).
    pub relocate: Option<headers::Relocation<'a>>,
    /// The client speaks HTTP/2: the head is an HPACK block (literals only, names lowercase,
    /// no connection-specific field, no `transfer-encoding`: the stream frames the body).
    pub http2: bool,
}

/// How the upstream delimits a response body, as far as the client's copy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFraming {
    /// None follows (or its length is 0).
    Empty,
    /// Its `Content-Length`.
    Length,
    /// Chunked, by the end of the connection, or (HTTP/2) by the end of the stream.
    Streamed,
}

impl ClientHead<'_> {
    /// Writes the response head `head` (its bytes in `bytes`) for the client.
    fn write(&mut self, bytes: &[u8], head: &Head, method: &Method) -> ClientFraming {
        let fields = head
            .fields
            .iter()
            .filter(|f| f.kept)
            .map(|f| (&bytes[f.name.0..f.name.1], &bytes[f.value.0..f.value.1]));
        let framing = match head.framing {
            Framing::Empty => UpstreamFraming::Empty,
            Framing::Length(_) => UpstreamFraming::Length,
            Framing::Chunked(_) | Framing::Close => UpstreamFraming::Streamed,
        };
        self.write_response(head.status, fields, framing, head.length, head.date, method)
    }

    /// Writes a response head for the client, whichever protocol brought it: the status
    /// line, the `fields` that go on, as they came (a `Trailer` among them is collected when
    /// the client accepts trailers), then the framing, `date` and `connection` fields the
    /// front door's answer needs. `length` is the valid `Content-Length` (not among the
    /// fields), `date` whether the fields hold one.
    pub fn write_response<'f>(
        &mut self,
        status: StatusCode,
        fields: impl Iterator<Item = (&'f [u8], &'f [u8])>,
        framing: UpstreamFraming,
        length: Option<u64>,
        date: bool,
        method: &Method,
    ) -> ClientFraming {
        if self.http2 {
            return self.write_block(status, fields, framing, length, date, method);
        }
        let out = &mut *self.out;
        codec::write_status_line(out, status);
        for (name, value) in fields {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            // `relocated()` written out: through it, 35 instructions more per proxied GET
            // (callgrind), on the lean path's hottest loop.
            match self.relocate.filter(|_| headers::is_location(name)) {
                Some(relocate) => match relocate.rewrite(value) {
                    Some(new) => out.extend_from_slice(&new),
                    None => out.extend_from_slice(value),
                },
                None => out.extend_from_slice(value),
            }
            out.extend_from_slice(b"\r\n");
            declared(self.te, &mut self.trailers, name, value);
        }
        let framing = client_framing(framing, status, method);
        if framing == ClientFraming::Chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        match (framing, length) {
            // The length, once (an empty body delimited by the status alone says 0).
            (ClientFraming::Length, n) => codec::write_length(out, n.unwrap_or(0)),
            // After `HEAD` or for a `304`, the length of the body not sent.
            (ClientFraming::None, Some(n)) if passes_length(status) => codec::write_length(out, n),
            _ => {}
        }
        if !date {
            out.extend_from_slice(b"date: ");
            codec::date(out);
            out.extend_from_slice(b"\r\n");
        }
        if self.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        framing
    }

    /// [`write_response`](Self::write_response) for an HTTP/2 client: the same fields, as
    /// an HPACK block. Not inlined: `write_response` stays as small as the HTTP/1.1 form
    /// alone, where the lean exchange inlines it.
    #[inline(never)]
    fn write_block<'f>(
        &mut self,
        status: StatusCode,
        fields: impl Iterator<Item = (&'f [u8], &'f [u8])>,
        framing: UpstreamFraming,
        length: Option<u64>,
        date: bool,
        method: &Method,
    ) -> ClientFraming {
        use crate::proxy::h2::hpack::encode;
        let out = &mut *self.out;
        crate::proxy::h2::server::encode_status(out, status);
        for (name, value) in fields {
            if !crate::proxy::h2::server::sendable(name) {
                continue;
            }
            encode::field_lowercased(out, name, &relocated(self.relocate, name, value), false);
            declared(self.te, &mut self.trailers, name, value);
        }
        let framing = client_framing(framing, status, method);
        let mut digits = Digits::new();
        match (framing, length) {
            (ClientFraming::Length, n) => {
                encode::with_name(out, 28, digits.format(n.unwrap_or(0)).as_bytes(), false)
            }
            (ClientFraming::None, Some(n)) if passes_length(status) => {
                encode::with_name(out, 28, digits.format(n).as_bytes(), false)
            }
            _ => {}
        }
        if !date {
            let mut now = Vec::with_capacity(29);
            codec::date(&mut now);
            encode::with_name(out, 33, &now, false);
        }
        framing
    }
}

/// `value` of field `name` as the client gets it: a redirect to the upstream's own origin
/// rewritten to the client's address (`rewrite_location`).
fn relocated<'v>(
    relocate: Option<headers::Relocation<'_>>,
    name: &[u8],
    value: &'v [u8],
) -> std::borrow::Cow<'v, [u8]> {
    match relocate
        .filter(|_| headers::is_location(name))
        .and_then(|r| r.rewrite(value))
    {
        Some(new) => std::borrow::Cow::Owned(new),
        None => std::borrow::Cow::Borrowed(value),
    }
}

/// Collects into `trailers` the names a `Trailer` field declares, for a client that takes
/// them (`te`).
fn declared(te: bool, trailers: &mut Vec<HeaderName>, name: &[u8], value: &[u8]) {
    if te && name.eq_ignore_ascii_case(b"trailer") {
        let names = std::str::from_utf8(value).unwrap_or_default();
        trailers.extend(
            names
                .split(',')
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
        );
    }
}

/// How the client's copy of a body is framed, from how the upstream's is.
fn client_framing(framing: UpstreamFraming, status: StatusCode, method: &Method) -> ClientFraming {
    match framing {
        _ if !codec::response_has_body(method, status) => ClientFraming::None,
        UpstreamFraming::Empty | UpstreamFraming::Length => ClientFraming::Length,
        UpstreamFraming::Streamed => ClientFraming::Chunked,
    }
}

/// A decimal number written on the stack (a length for an HPACK literal).
struct Digits([u8; 20], usize);

impl Digits {
    fn new() -> Digits {
        Digits([0; 20], 0)
    }

    fn format(&mut self, mut n: u64) -> &str {
        let mut i = self.0.len();
        loop {
            i -= 1;
            self.0[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.1 = i;
        std::str::from_utf8(&self.0[i..]).expect("digits")
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug)]
enum Framing {
    /// No body.
    Empty,
    /// This many bytes remain.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// Until the connection closes.
    Close,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// A chunk-size line comes next.
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// The CRLF after chunk data comes next.
    DataEnd,
    /// The trailer section (possibly empty) comes next.
    Trailers,
}

/// Where a connection goes when its response body is done and it can serve another request.
pub trait Reuse: Send + Sync {
    /// Takes the connection back.
    fn reuse(&self, conn: RawConn);
}

/// The pool a body returns its connection to.
pub type Done = std::sync::Arc<dyn Reuse>;

/// The response body, read from the connection as the client takes it. At its end the
/// connection goes to `done` if it can serve another request; dropped early, it closes.
pub struct RawBody {
    conn: Option<RawConn>,
    /// Bytes to ask of the socket at the next read.
    chunk: usize,
    framing: Framing,
    reusable: bool,
    done: Option<Done>,
}

impl std::fmt::Debug for RawBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBody")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl RawBody {
    /// Hands the connection to `done` when the body has been read to its end (at once if it
    /// has no body).
    fn on_done(&mut self, done: Done) {
        self.done = Some(done);
        if matches!(self.framing, Framing::Empty) {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.framing = Framing::Empty;
        if let (Some(mut conn), true) = (self.conn.take(), self.reusable) {
            // Bytes after the response: the connection's framing cannot be trusted.
            if conn.buf.is_empty() {
                // An idle connection keeps a read buffer of the first size only; one grown
                // for a large body goes.
                if conn.buf.capacity() > READ_CHUNK {
                    conn.buf = BytesMut::new();
                } else {
                    conn.buf.clear();
                }
                if let Some(done) = self.done.take() {
                    done.reuse(conn);
                }
            }
        }
    }

    /// Reads more from the socket into the buffer; `Ok(false)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        conn.buf.reserve(self.chunk);
        let room = conn.buf.capacity() - conn.buf.len();
        let conn = &mut *conn.0;
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.stream),
            cx,
            &mut conn.buf
        ))?;
        if n == room {
            self.chunk = (self.chunk * 2).min(BODY_CHUNK.1);
        }
        Poll::Ready(Ok(n > 0))
    }

    fn buf(&mut self) -> &mut BytesMut {
        &mut self
            .conn
            .as_mut()
            .expect("body reads need the connection")
            .buf
    }

    /// The next piece of the body, or `None` when more bytes are needed.
    fn step(&mut self) -> Result<Option<Option<Frame<Bytes>>>, std::io::Error> {
        let invalid =
            |msg: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string());
        match self.framing {
            Framing::Empty => Ok(Some(None)),
            Framing::Length(0) => {
                self.finish();
                Ok(Some(None))
            }
            Framing::Length(left) => {
                let buf = self.buf();
                if buf.is_empty() {
                    return Ok(None);
                }
                let take = left.min(buf.len() as u64) as usize;
                let data = buf.split_to(take).freeze();
                self.framing = Framing::Length(left - take as u64);
                if left == take as u64 {
                    self.finish();
                }
                Ok(Some(Some(Frame::data(data))))
            }
            Framing::Close => {
                let buf = self.buf();
                if buf.is_empty() {
                    return Ok(None);
                }
                Ok(Some(Some(Frame::data(buf.split().freeze()))))
            }
            Framing::Chunked(state) => match state {
                Chunk::Size => {
                    let buf = self.buf();
                    let Some((size, line)) = codec::chunk_size_line(buf).map_err(&invalid)? else {
                        return Ok(None);
                    };
                    buf.advance(line);
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                    self.step()
                }
                Chunk::Data(left) => {
                    let buf = self.buf();
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = left.min(buf.len() as u64) as usize;
                    let data = buf.split_to(take).freeze();
                    self.framing = Framing::Chunked(if left == take as u64 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take as u64)
                    });
                    Ok(Some(Some(Frame::data(data))))
                }
                Chunk::DataEnd => {
                    let buf = self.buf();
                    let Some(end) = codec::chunk_data_end(buf).map_err(&invalid)? else {
                        return Ok(None);
                    };
                    buf.advance(end);
                    self.framing = Framing::Chunked(Chunk::Size);
                    self.step()
                }
                Chunk::Trailers => {
                    let buf = self.buf();
                    let Some(end) = codec::trailer_section(buf, MAX_HEAD).map_err(&invalid)? else {
                        return Ok(None);
                    };
                    let block = buf.split_to(end);
                    if end == 2 {
                        self.finish();
                        return Ok(Some(None));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; codec::MAX_TRAILER_FIELDS];
                    let trailers = match httparse::parse_headers(&block, &mut fields) {
                        Ok(httparse::Status::Complete((_, fields))) => {
                            let mut map = HeaderMap::with_capacity(fields.len());
                            for f in fields.iter() {
                                if codec::is_forbidden_trailer(f.name.as_bytes()) {
                                    continue;
                                }
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| invalid("invalid trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| invalid("invalid trailer value"))?;
                                map.append(name, value);
                            }
                            map
                        }
                        _ => return Err(invalid("invalid trailer section")),
                    };
                    self.finish();
                    Ok(Some(Some(Frame::trailers(trailers))))
                }
            },
        }
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            match self.step() {
                Ok(Some(frame)) => return Poll::Ready(frame.map(Ok)),
                Ok(None) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) if matches!(self.framing, Framing::Close) => {
                    self.reusable = false;
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(false) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before the end of the body",
                    ))));
                }
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Empty | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    /// An upstream that answers each request with the next of `answers`, byte for byte, then
    /// closes if `close` says so; returns the address and what it read.
    async fn upstream(
        answers: Vec<&'static [u8]>,
        close: bool,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let mut chunk = [0u8; 4096];
                while !seen.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return seen;
                    }
                    seen.extend_from_slice(&chunk[..n]);
                }
                s.write_all(answer).await.unwrap();
                seen.extend_from_slice(b"|");
            }
            if !close {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            }
            seen
        });
        (addr, task)
    }

    /// A connection to an [`upstream`] answering `answers`, whose record is not looked at.
    async fn connected(answers: Vec<&'static [u8]>, close: bool) -> RawConn {
        let (addr, _seen) = upstream(answers, close).await;
        RawConn::new(tokio::net::TcpStream::connect(addr).await.unwrap())
    }

    fn parts(method: Method, target: &str) -> request::Parts {
        let (mut parts, ()) = http::Request::builder()
            .method(method)
            .uri(target)
            .body(())
            .unwrap()
            .into_parts();
        parts.headers.insert("host", HeaderValue::from_static("up"));
        parts
    }

    struct Back(std::sync::Mutex<Option<RawConn>>);

    impl Reuse for Back {
        fn reuse(&self, conn: RawConn) {
            *self.0.lock().unwrap() = Some(conn);
        }
    }

    fn back() -> std::sync::Arc<Back> {
        std::sync::Arc::new(Back(std::sync::Mutex::new(None)))
    }

    async fn fetch(
        conn: RawConn,
        method: Method,
    ) -> (Response<()>, Bytes, Option<HeaderMap>, Option<RawConn>) {
        let back = back();
        let response = conn
            .exchange(&parts(method, "/p?q=1"), back.clone())
            .await
            .unwrap();
        let (head, body) = response.into_parts();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let bytes = collected.to_bytes();
        let conn = back.0.lock().unwrap().take();
        (Response::from_parts(head, ()), bytes, trailers, conn)
    }

    #[tokio::test]
    async fn length_chunked_with_trailers_and_interim_answers_on_one_connection() {
        let (addr, seen) = upstream(
            vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 9\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
            ],
            false,
        )
        .await;
        let conn = RawConn::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (r, body, _, conn) = fetch(conn, Method::GET).await;
        assert_eq!((r.status(), &body[..]), (StatusCode::OK, &b"hello"[..]));
        assert_eq!(r.headers()["x-a"], "1");
        let (r, body, trailers, conn) = fetch(conn.expect("reused"), Method::GET).await;
        assert_eq!((r.status(), &body[..]), (StatusCode::OK, &b"abcde"[..]));
        assert_eq!(trailers.unwrap()["x-checksum"], "9");
        let (r, body, _, conn) = fetch(conn.expect("reused"), Method::DELETE).await;
        assert_eq!((r.status(), body.len()), (StatusCode::NO_CONTENT, 0));
        // HEAD: Content-Length describes the GET's body, none follows.
        let (r, body, _, conn) = fetch(conn.expect("reused"), Method::HEAD).await;
        assert_eq!((r.status(), body.len()), (StatusCode::OK, 0));
        assert!(conn.is_some());
        drop(conn); // the upstream reads until the connection closes
        let seen = String::from_utf8(seen.await.unwrap()).unwrap();
        assert!(
            seen.starts_with("GET /p?q=1 HTTP/1.1\r\nhost: up\r\n\r\n|"),
            "{seen}"
        );
        assert!(seen.contains("HEAD /p?q=1 HTTP/1.1\r\n"), "{seen}");
    }

    #[tokio::test]
    async fn close_delimited_connection_close_and_te_with_cl_are_not_reused() {
        let conn = connected(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"], true).await;
        let (_, body, _, conn) = fetch(conn, Method::GET).await;
        assert_eq!(&body[..], b"until the end");
        assert!(conn.is_none());
        let conn = connected(
            vec![b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"],
            false,
        )
        .await;
        let (_, body, _, conn) = fetch(conn, Method::GET).await;
        assert_eq!(&body[..], b"ok");
        assert!(conn.is_none());
        // Both framings: chunked wins, the length is not passed on, the connection ends.
        let conn = connected(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
            false).await;
        let (r, body, _, conn) = fetch(conn, Method::GET).await;
        assert_eq!(&body[..], b"ok");
        assert!(!r.headers().contains_key(http::header::CONTENT_LENGTH));
        assert!(conn.is_none());
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            let conn = connected(vec![bad], true).await;
            let result = conn.exchange(&parts(Method::GET, "/"), back()).await;
            assert!(matches!(result, Err(RawError::Invalid(_))), "{bad:?}");
        }
        // A body cut short is an error, not a short body.
        let conn = connected(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
            true,
        )
        .await;
        let response = conn
            .exchange(&parts(Method::GET, "/"), back())
            .await
            .unwrap();
        assert!(response.into_body().collect().await.is_err());
        let conn = connected(
            vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"],
            true,
        )
        .await;
        let response = conn
            .exchange(&parts(Method::GET, "/"), back())
            .await
            .unwrap();
        assert!(response.into_body().collect().await.is_err());
    }

    #[tokio::test]
    async fn hop_by_hop_fields_do_not_come_back() {
        let conn = connected(
            vec![
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Named\r\nX-Named: hop\r\n\
                  Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
                  Upgrade: h2c\r\nProxy-Authenticate: Basic\r\nTrailer: X-Sum\r\n\
                  X-End: kept\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n\
                  2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n",
            ],
            false,
        )
        .await;
        let (head, body, _, conn) = fetch(conn, Method::GET).await;
        assert_eq!(&body[..], b"ok");
        let mut names: Vec<_> = head.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-end"], "{:?}", head.headers());
        // A streamed body keeps its `Trailer`; the connection was kept alive.
        let (head, body, trailers, _) = fetch(conn.expect("reused"), Method::GET).await;
        assert_eq!(&body[..], b"ok");
        assert_eq!(head.headers()["trailer"], "X-Sum");
        assert!(!head.headers().contains_key("transfer-encoding"));
        assert_eq!(trailers.unwrap()["x-sum"], "1");
    }

    /// The client's head in both protocols, from the same upstream fields: HTTP/2's has the
    /// same fields as HPACK literals, lowercase, with neither `transfer-encoding` nor
    /// `connection` (the stream frames the body and the connection stays).
    #[test]
    fn the_clients_head_is_written_for_either_protocol() {
        let config = crate::config::Config::parse(
            "[credentials.c]\ntoken_url=\"https://t/\"\nclient_id=\"i\"\nclient_secret=\"s\"\n\
             [[routes]]\nlisten=\"127.0.0.1:1\"\nupstream=\"https://api.example.cn/base\"\ncredential=\"c\"\n",
            "t.toml",
            &|_| None,
        )
        .unwrap();
        let upstream = &config.routes[0].upstream;
        let fields: [(&[u8], &[u8]); 4] = [
            (b"Content-Type", b"text/plain"),
            (b"Location", b"https://api.example.cn/base/next"),
            (b"Trailer", b"x-sum"),
            (b"Transfer-Encoding", b"chunked"),
        ];
        let head = |http2: bool, framing, length, method: &Method, status: u16| {
            let mut out = Vec::new();
            let mut client = ClientHead {
                out: &mut out,
                close: true,
                te: true,
                trailers: Vec::new(),
                relocate: Some(headers::Relocation {
                    upstream,
                    client_host: Some(b"127.0.0.1:8080"),
                    client_prefix: "",
                }),
                http2,
            };
            let status = StatusCode::from_u16(status).unwrap();
            let framing =
                client.write_response(status, fields.into_iter(), framing, length, false, method);
            let trailers = client.trailers.clone();
            (out, framing, trailers)
        };
        let decode = |block: &[u8]| {
            let mut fields = Vec::new();
            crate::proxy::h2::hpack::Decoder::default()
                .decode(block, |n, v| {
                    let v = if n == b"date" {
                        "<date>".into()
                    } else {
                        String::from_utf8(v.to_vec()).unwrap()
                    };
                    fields.push((String::from_utf8(n.to_vec()).unwrap(), v));
                })
                .unwrap();
            fields
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };

        let (block, framing, trailers) =
            head(true, UpstreamFraming::Streamed, None, &Method::GET, 200);
        assert_eq!(framing, ClientFraming::Chunked);
        assert_eq!(trailers, [HeaderName::from_static("x-sum")]);
        assert_eq!(
            decode(&block),
            pairs(&[
                (":status", "200"),
                ("content-type", "text/plain"),
                ("location", "http://127.0.0.1:8080/next"),
                ("trailer", "x-sum"),
                ("date", "<date>"),
            ])
        );
        let (block, framing, _) = head(true, UpstreamFraming::Length, Some(5), &Method::GET, 201);
        assert_eq!(framing, ClientFraming::Length);
        let got = decode(&block);
        assert_eq!(got[0], (":status".into(), "201".into()));
        assert!(
            got.contains(&("content-length".into(), "5".into())),
            "{got:?}"
        );
        // After HEAD: no body, the length of the one not sent.
        let (block, framing, _) = head(
            true,
            UpstreamFraming::Length,
            Some(1234567),
            &Method::HEAD,
            200,
        );
        assert_eq!(framing, ClientFraming::None);
        assert!(decode(&block).contains(&("content-length".into(), "1234567".into())));

        // HTTP/1.1 from the same fields: the framing and the close said in fields.
        let (bytes, framing, _) = head(false, UpstreamFraming::Streamed, None, &Method::GET, 200);
        assert_eq!(framing, ClientFraming::Chunked);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(
            text.contains("Location: http://127.0.0.1:8080/next\r\n"),
            "{text}"
        );
    }
}
