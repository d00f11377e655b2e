//! The front door: a lean HTTP/1.1 server for the commonest request, a bodiless `GET`,
//! `HEAD`, `DELETE` or `OPTIONS` to a route with a plain-`http` upstream.
//!
//! Why: with the upstream side already lean (`raw.rs`), callgrind put about 40 % of a proxied
//! GET's instructions in hyper's server dispatcher (its buffers, its state machine, the
//! service future it boxes per request). Here the connection's own task reads the head,
//! parses it with `httparse` (as hyper does) into an `http` head whose header values are
//! slices of the read buffer, hands it to the service, and writes the response head and the
//! first body bytes in one `write`.
//!
//! Anything else goes to hyper, with the bytes read so far put back in front of the socket
//! ([`Rewind`]), and the connection stays with hyper from then on: a request with a body
//! (`Content-Length` other than 0, `Transfer-Encoding`, `Expect`), an `Upgrade`, another
//! method or HTTP version (h2c's preface included), a target that is not origin-form, and every
//! head hyper must refuse (malformed, over `max_header_bytes` or `max_headers`: its 400 and
//! 431). So whatever is not plainly the common case meets hyper's conformance, unchanged.
//!
//! The same rules as hyper's hold here: `header_read_timeout` bounds each head (and the idle
//! time before it); `Connection: close` is answered with `connection: close` and the
//! connection closes; a `date` is added when the upstream sent none; a body of unknown length
//! goes out chunked, with trailers only to a client that sent `TE: trailers` and only the
//! fields the response's `Trailer` header declares; a body that breaks off mid-way closes the
//! connection without its end, so the client sees it was cut. When the listener stops or a
//! reload retires the route, an idle connection closes at once and a busy one after its
//! response.

use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{DATE, TRAILER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::service::ProxyService;
use super::ProxyBody;
use crate::config::ClientLimits;

/// Most header fields parsed here; a head with more goes to hyper, which applies the
/// configured `max_headers`.
const MAX_FIELDS: usize = 128;
/// Bytes asked of the socket per read of a request head.
const READ_CHUNK: usize = 4096;
/// Body frames up to this size are copied behind the head (or the previous frame) so that
/// both go out in one write; larger ones are written from their own buffer.
const GATHER: usize = 16 * 1024;

/// How a connection left the front door.
#[derive(Debug)]
pub enum Outcome<T> {
    /// It is closed (or should be): the client went away, asked to close, timed out, or the
    /// listener stopped.
    Closed,
    /// hyper takes it from here, reading first the bytes the front door had read.
    Handoff(Rewind<T>),
}

/// Serves requests on `io` until it closes or a request needs hyper. When `stop` fires (the
/// route was retired or its listener stopped), the connection closes before its next request.
pub async fn serve<T>(
    mut io: T,
    service: &ProxyService,
    limits: &ClientLimits,
    stop: &CancellationToken,
) -> Outcome<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut stopped = pin!(stop.cancelled());
    let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
    loop {
        let request = match read_head(
            &mut io,
            &mut buf,
            &mut fields,
            limits,
            stopped.as_mut(),
            timer.as_mut(),
        )
        .await
        {
            Next::Head(request) => request,
            Next::Handoff => return Outcome::Handoff(Rewind::new(io, buf.freeze())),
            Next::Close => return Outcome::Closed,
        };
        let Request { head, close, te } = request;
        let head_only = head.method == Method::HEAD;
        let response = service.handle_bodiless(head).await;
        let close = close || stop.is_cancelled();
        let written = write_response(&mut io, &mut out, response, head_only, te, close).await;
        if written.is_err() {
            return Outcome::Closed;
        }
        if close {
            let _ = io.shutdown().await;
            return Outcome::Closed;
        }
        // An idle connection keeps no large buffers.
        if out.capacity() > GATHER * 4 {
            out = Vec::new();
        }
    }
}

/// A request head the front door serves.
struct Request {
    head: http::request::Parts,
    /// The client sent `Connection: close`.
    close: bool,
    /// The client's `TE` accepts trailers.
    te: bool,
}

// Boxing the head would cost an allocation per request; the enum is moved once.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Request),
    Handoff,
    Close,
}

/// Reads until `buf` starts with a complete request head, or decides the connection's fate.
async fn read_head<T>(
    io: &mut T,
    buf: &mut BytesMut,
    fields: &mut Vec<Field>,
    limits: &ClientLimits,
    mut stopped: Pin<&mut impl Future<Output = ()>>,
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Next
where
    T: AsyncRead + Unpin,
{
    let started = Instant::now();
    let mut armed = false;
    loop {
        if !buf.is_empty() {
            match parse(buf, limits.max_headers, fields) {
                Parsed::Complete(request) => return Next::Head(request),
                Parsed::Other => return Next::Handoff,
                // hyper answers an oversized head with 431.
                Parsed::Partial if buf.len() >= limits.max_header_bytes => return Next::Handoff,
                Parsed::Partial => {}
            }
        }
        buf.reserve(READ_CHUNK);
        let read = poll_fn(|cx| {
            if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                return Poll::Ready(Some(r));
            }
            // Only a connection that has to wait pays for the timer.
            if !armed {
                timer.as_mut().reset(started + limits.header_read_timeout);
                armed = true;
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            if buf.is_empty() && stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match read {
            Some(Ok(n)) if n > 0 => {}
            // End of stream, an error, the header read timeout, or a stop while idle.
            _ => return Next::Close,
        }
    }
}

#[allow(clippy::large_enum_variant)]
enum Parsed {
    Complete(Request),
    Partial,
    /// Not for the front door: hyper serves (or refuses) it.
    Other,
}

/// Where a parsed field's name and value are in the head.
#[derive(Clone, Copy)]
struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

/// Parses a complete request head off the front of `buf` if it is one the front door serves.
/// `fields` is scratch space kept by the connection.
fn parse(buf: &mut BytesMut, max_headers: usize, fields: &mut Vec<Field>) -> Parsed {
    // Uninitialised: zeroing 128 fields costs more than parsing a typical head.
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = req.parse_with_uninit_headers(buf, &mut storage[..max_headers.min(MAX_FIELDS)]);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("DELETE") => Method::DELETE,
        Some("OPTIONS") => Method::OPTIONS,
        _ => return Parsed::Other,
    };
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else {
        return Parsed::Other;
    };
    if req.version != Some(1) {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let path = span(path.as_bytes());
    let (mut close, mut te) = (false, false);
    fields.clear();
    for parsed in req.headers.iter() {
        let (name, value) = (parsed.name.as_bytes(), parsed.value);
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        if is(b"transfer-encoding") || is(b"expect") || is(b"upgrade") {
            return Parsed::Other;
        }
        if is(b"content-length") && value.trim_ascii() != b"0" {
            return Parsed::Other;
        }
        if is(b"connection") {
            close |= has_token(value, b"close");
        } else if is(b"te") {
            te |= has_token(value, b"trailers");
        }
        fields.push(Field {
            name: span(name),
            value: span(value),
        });
    }
    // The head is frozen so that the target and values are slices of it, not copies; should
    // one not convert after all, its bytes go back in front for hyper.
    let bytes = buf.split_to(len).freeze();
    match build(&bytes, method, path, fields) {
        Some(head) => Parsed::Complete(Request { head, close, te }),
        None => {
            let mut all = BytesMut::with_capacity(bytes.len() + buf.len());
            all.extend_from_slice(&bytes);
            all.extend_from_slice(buf);
            *buf = all;
            Parsed::Other
        }
    }
}

/// The `http` head for a parsed request, or `None` if a part does not convert.
fn build(
    bytes: &Bytes,
    method: Method,
    path: (usize, usize),
    fields: &[Field],
) -> Option<http::request::Parts> {
    let uri = Uri::from_maybe_shared(bytes.slice(path.0..path.1)).ok()?;
    // Room for what `prepare_request` adds (`Via`), so that the map does not grow.
    let mut headers = HeaderMap::with_capacity(fields.len() + 2);
    for field in fields {
        let name = HeaderName::from_bytes(&bytes[field.name.0..field.name.1]).ok()?;
        let value =
            HeaderValue::from_maybe_shared(bytes.slice(field.value.0..field.value.1)).ok()?;
        headers.append(name, value);
    }
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = method;
    head.uri = uri;
    head.version = Version::HTTP_11;
    head.headers = headers;
    Some(head)
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How the response body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, 1xx, 204, 304).
    None,
    /// As many bytes as `content-length` says.
    Length,
    /// `transfer-encoding: chunked`.
    Chunked,
}

/// Writes `response` to the client: its head, then its body as the upstream delivers it.
/// `te` says whether the client accepts trailers; `close` adds `connection: close`.
async fn write_response<T>(
    io: &mut T,
    out: &mut Vec<u8>,
    response: Response<ProxyBody>,
    head_only: bool,
    te: bool,
    close: bool,
) -> io::Result<()>
where
    T: AsyncWrite + Unpin,
{
    let (parts, mut body) = response.into_parts();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("<none>")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    let mut has_length = false;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        has_length |= name == http::header::CONTENT_LENGTH;
        has_date |= name == DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if head_only || !can_have_body(parts.status) {
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        if !has_length {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None {
        return io.write_all(out).await;
    }
    // Trailers go to a client that asked for them, and only the fields the response declared.
    let trailers: Vec<HeaderName> = if framing == Framing::Chunked && te {
        parts
            .headers
            .get_all(TRAILER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let chunked = framing == Framing::Chunked;
    let mut ended = body.is_end_stream();
    while !ended {
        // Frames ready now are gathered behind what is pending; the write waits until the
        // body would have to wait.
        let frame = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Pending if !out.is_empty() => Poll::Ready(Step::Flush),
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(Step::Frame(frame)),
        })
        .await;
        let frame = match frame {
            Step::Flush => {
                io.write_all(out).await?;
                out.clear();
                continue;
            }
            Step::Frame(None) => break,
            Step::Frame(Some(Err(e))) => return Err(io::Error::other(e)),
            Step::Frame(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                if chunked {
                    let _ = write!(out, "{:x}\r\n", data.len());
                }
                if data.len() <= GATHER {
                    out.extend_from_slice(&data);
                } else {
                    write_two(io, out, data).await?;
                    out.clear();
                }
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
            Err(frame) => {
                if let (Ok(fields), true) = (frame.into_trailers(), chunked) {
                    out.extend_from_slice(b"0\r\n");
                    write_trailers(out, &fields, &trailers);
                    out.extend_from_slice(b"\r\n");
                    return io.write_all(out).await;
                }
            }
        }
        ended = body.is_end_stream();
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    io.write_all(out).await
}

enum Step {
    /// Nothing more is ready now: write what is pending.
    Flush,
    Frame(Option<Result<Frame<Bytes>, <ProxyBody as Body>::Error>>),
}

/// Whether a response with `status` has a body (RFC 9112 §6.3).
fn can_have_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// The trailer `fields` whose names the response's `Trailer` header declared.
fn write_trailers(out: &mut Vec<u8>, fields: &HeaderMap, allowed: &[HeaderName]) {
    for (name, value) in fields {
        if allowed.contains(name) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Writes `first` then `second`, with vectored writes.
async fn write_two<T>(io: &mut T, first: &[u8], mut second: Bytes) -> io::Result<()>
where
    T: AsyncWrite + Unpin,
{
    let mut first = first;
    while !first.is_empty() {
        let n = io
            .write_vectored(&[io::IoSlice::new(first), io::IoSlice::new(&second)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_first = n.min(first.len());
        first = &first[from_first..];
        second.advance(n - from_first);
    }
    io.write_all(&second).await
}

/// Appends the current `date` value.
pub(super) fn date(out: &mut Vec<u8>) {
    date::extend(out);
}

/// The `date` value, formatted once a second per thread (as hyper does).
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    /// Appends the current date in IMF-fixdate form.
    pub(super) fn extend(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

/// A connection with bytes already read from it put back in front: hyper reads those first.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `inner`, reading `prefix` first.
    pub fn new(inner: T, prefix: Bytes) -> Rewind<T> {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let parsed = parse(&mut buf, 100, &mut Vec::new());
        (parsed, buf)
    }

    #[test]
    fn a_bodiless_request_is_parsed_and_the_next_one_stays_in_the_buffer() {
        let (p, rest) = parsed(
            "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\nTE: trailers\r\n\
             Content-Length: 0\r\nX-Two: 1\r\nX-Two: 2\r\n\r\nGET /next",
        );
        let Parsed::Complete(r) = p else {
            panic!("not complete")
        };
        assert_eq!(r.head.method, Method::GET);
        assert_eq!(r.head.uri, "/a?b=1");
        assert_eq!(r.head.version, Version::HTTP_11);
        assert_eq!(r.head.headers.get_all("x-two").iter().count(), 2);
        assert_eq!(r.head.headers["host"], "x");
        assert!(r.close && r.te);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nHost: x\r\n").0,
            Parsed::Partial
        ));
    }

    #[test]
    fn everything_else_goes_to_hyper_with_its_bytes_intact() {
        for text in [
            "POST / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
        ] {
            let (p, rest) = parsed(text);
            assert!(matches!(p, Parsed::Other), "{text:?}");
            assert_eq!(&rest[..], text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn a_head_with_more_fields_than_the_limit_goes_to_hyper() {
        let mut text = String::from("GET / HTTP/1.1\r\n");
        for i in 0..5 {
            text.push_str(&format!("X-{i}: 1\r\n"));
        }
        text.push_str("\r\n");
        let mut buf = BytesMut::from(text.as_bytes());
        assert!(matches!(parse(&mut buf, 4, &mut Vec::new()), Parsed::Other));
    }

    #[test]
    fn rewind_reads_the_prefix_first() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::AsyncReadExt;
            let inner: &[u8] = b" world";
            let mut io = Rewind::new(inner, Bytes::from_static(b"hello"));
            let mut all = String::new();
            io.read_to_string(&mut all).await.unwrap();
            assert_eq!(all, "hello world");
        });
    }
}
