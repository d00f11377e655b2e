//! HTTP/1.1 syntax and framing (RFC 9112), once, as pure functions over bytes: reading a
//! request head and judging its framing, the framing of a response, chunk-size lines and
//! trailer sections, and which fields may not be trailers.
//!
//! Why one module: token-proxy speaks HTTP/1.1 through two implementations, hyper's and its
//! own lean path (the front door, `front.rs`, and the lean exchange, `raw.rs`). A rule written
//! twice drifts, and a proxy whose two readers of one byte stream disagree about where a
//! message ends can be made to smuggle a request past one of them, or to hand one client's
//! response to another. So every framing rule the lean path applies lives here, is held to
//! hyper's verdicts by the conformance corpus (`tests/conformance.rs`) and the differential
//! test below, and is as strict as hyper, nginx and HAProxy where they refuse something:
//!
//! - a request with both `Content-Length` and `Transfer-Encoding` is refused (`400`), as
//!   nginx and Envoy do (hyper would read it by its `Transfer-Encoding`);
//! - a request's `Transfer-Encoding` must be exactly `chunked`: any other coding, or a list,
//!   is refused with `501`, since the proxy would not forward it faithfully;
//! - `Content-Length` is digits only; repeated equal values are one length, differing ones a
//!   `400`;
//! - a chunk-size is hex digits only (no sign, no leading space), every line of the chunked
//!   framing and of a trailer section ends in CRLF (a bare LF is an error, not a line end);
//! - `Content-Length`, `Transfer-Encoding`, `Host`, `Authorization`, `Set-Cookie` and the other
//!   fields RFC 9110 §6.5.1 keeps out of trailers are never passed on as trailers.

use std::mem::MaybeUninit;

use http::{Method, StatusCode};

/// Most header fields parsed without a heap allocation for the parser's index.
const STACK_FIELDS: usize = 128;

/// Longest chunk-size line (with its extensions) accepted, as hyper's limit on extensions.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Where a field's name and value are in the head it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The name's byte range.
    pub name: (usize, usize),
    /// The value's byte range.
    pub value: (usize, usize),
}

/// How a request body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body: neither `Content-Length` nor `Transfer-Encoding`.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A request head at the front of a buffer, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Its length in the buffer.
    pub len: usize,
    /// The method.
    pub method: Method,
    /// Where the request target is.
    pub target: (usize, usize),
    /// HTTP/1.1 (else HTTP/1.0).
    pub http11: bool,
    /// How its body is delimited.
    pub body: RequestBody,
    /// The connection ends after this request (`Connection: close`, or HTTP/1.0 without
    /// `keep-alive`).
    pub close: bool,
    /// `TE` accepts trailers.
    pub te_trailers: bool,
    /// It has an `Upgrade` field.
    pub upgrade: bool,
    /// It has an `Expect` field.
    pub expect: bool,
}

/// What [`parse_request`] found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A complete request head.
    Head(RequestHead),
    /// Not complete yet.
    Partial,
    /// The HTTP/2 connection preface (`PRI * HTTP/2.0`, all 24 bytes of it).
    Preface,
}

/// Why a request is refused. Each maps to one status; the connection closes after the answer,
/// since where this message ends (and the next begins) cannot be known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Malformed: `400`.
    #[error("{0}")]
    Malformed(String),
    /// Over the header limits: `431`.
    #[error("{0}")]
    TooLarge(String),
    /// A transfer coding the proxy does not forward: `501`.
    #[error("{0}")]
    Unsupported(String),
}

/// The HTTP/2 connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Parses and judges the request head at the front of `buf` (left there). `fields` is scratch
/// space kept by the connection; on success it holds the head's fields. A head over
/// `max_bytes` or with more than `max_headers` fields is [`Refusal::TooLarge`].
/// `after_request` says whether an HTTP/1.1 request came before on this connection: HTTP/2
/// with prior knowledge starts a connection, and its preface after a request is an attempt
/// to change the protocol under the proxy, refused (as nginx and HAProxy do).
pub fn parse_request(
    buf: &[u8],
    max_headers: usize,
    max_bytes: usize,
    fields: &mut Vec<Field>,
    after_request: bool,
) -> Result<Parsed, Refusal> {
    let n = buf.len().min(PREFACE.len());
    if buf[..n] == PREFACE[..n] {
        // Only the whole preface is HTTP/2; bytes that part from it are read as HTTP/1.1.
        return match (n == PREFACE.len(), after_request) {
            (false, _) => Ok(Parsed::Partial),
            (true, false) => Ok(Parsed::Preface),
            (true, true) => Err(Refusal::Malformed(
                "an HTTP/2 connection preface after an HTTP/1.1 request on the same connection"
                    .into(),
            )),
        };
    }
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_FIELDS];
    let mut heap = Vec::new();
    let storage: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_FIELDS {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, storage) {
        Ok(httparse::Status::Complete(len)) if len > max_bytes => return Err(too_large(max_bytes)),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_bytes => {
            return Err(too_large(max_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::TooLarge(format!(
                "the request has more than {max_headers} header fields (max_headers)"
            )))
        }
        Err(e) => return Err(Refusal::Malformed(format!("malformed request head: {e}"))),
    };
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refusal::Malformed("malformed request method".into()))?;
    let http11 = req.version == Some(1);
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let path = req.path.unwrap_or_default().as_bytes();
    if !target_form_ok(path, &method) {
        return Err(Refusal::Malformed(format!(
            "the request target {:?} is neither a path (origin-form), an absolute URI, `*` nor (for CONNECT) host:port",
            String::from_utf8_lossy(&path[..path.len().min(64)])
        )));
    }
    let target = span(path);
    let mut framing = Framing::default();
    let (mut close, mut keep_alive, mut te_trailers) = (false, false, false);
    let (mut upgrade, mut expect) = (false, false);
    fields.clear();
    for header in req.headers.iter() {
        let (name, value) = (header.name.as_bytes(), header.value);
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        if is(b"transfer-encoding") {
            framing.transfer_encoding(value);
        } else if is(b"content-length") {
            framing.content_length(value);
        } else if is(b"connection") {
            close |= has_token(value, b"close");
            keep_alive |= has_token(value, b"keep-alive");
        } else if is(b"te") {
            te_trailers |= has_token(value, b"trailers");
        } else if is(b"upgrade") {
            upgrade = true;
        } else if is(b"expect") {
            expect = true;
        }
        fields.push(Field {
            name: span(name),
            value: span(value),
        });
    }
    Ok(Parsed::Head(RequestHead {
        len,
        method,
        target,
        http11,
        body: framing.request(http11)?,
        close: close || (!http11 && !keep_alive),
        te_trailers,
        upgrade,
        expect,
    }))
}

/// Whether `target` has one of the four forms of RFC 9112 §3.2: origin-form (`/path`),
/// absolute-form (`scheme://...`), authority-form (CONNECT only) or asterisk-form (`*`).
/// Which of them the proxy forwards is the service's decision; anything else is malformed.
fn target_form_ok(target: &[u8], method: &Method) -> bool {
    if target.starts_with(b"/") || target == b"*" {
        return true;
    }
    let scheme = target
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        .count();
    let absolute =
        scheme > 0 && target[0].is_ascii_alphabetic() && target[scheme..].starts_with(b"://");
    absolute || (*method == Method::CONNECT && http::uri::Authority::try_from(target).is_ok())
}

fn too_large(max_bytes: usize) -> Refusal {
    Refusal::TooLarge(format!(
        "the request head is larger than {max_bytes} bytes (max_header_bytes)"
    ))
}

/// The framing fields of a request, as they are read.
#[derive(Debug)]
struct Framing {
    /// `Transfer-Encoding` fields seen.
    codings: usize,
    /// The last `Transfer-Encoding` value is exactly `chunked`.
    chunked: bool,
    /// `Content-Length` fields seen.
    lengths: usize,
    /// Their value so far, or why they are unusable.
    length: Result<Option<u64>, &'static str>,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            codings: 0,
            chunked: false,
            lengths: 0,
            length: Ok(None),
        }
    }
}

impl Framing {
    fn transfer_encoding(&mut self, value: &[u8]) {
        self.codings += 1;
        self.chunked = value.trim_ascii().eq_ignore_ascii_case(b"chunked");
    }

    fn content_length(&mut self, value: &[u8]) {
        self.lengths += 1;
        // One number per field in a request (as hyper reads it); repeated equal fields are
        // one length.
        self.length = if value.contains(&b',') {
            Err("Content-Length is not a single number")
        } else {
            self.length.and_then(|seen| content_length(value, seen))
        };
    }

    /// The request's body framing, or why it is refused (RFC 9112 §6.1, §6.3).
    fn request(self, http11: bool) -> Result<RequestBody, Refusal> {
        if self.codings > 0 && self.lengths > 0 {
            return Err(Refusal::Malformed(
                "the request has both Content-Length and Transfer-Encoding: where its body ends is ambiguous".into(),
            ));
        }
        if self.codings > 0 {
            if !http11 {
                return Err(Refusal::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 request".into(),
                ));
            }
            if self.codings > 1 || !self.chunked {
                return Err(Refusal::Unsupported(
                    "the request's Transfer-Encoding is not supported: only a single `chunked` is forwarded".into(),
                ));
            }
            return Ok(RequestBody::Chunked);
        }
        match self.length {
            Ok(Some(n)) => Ok(RequestBody::Length(n)),
            Ok(None) => Ok(RequestBody::None),
            Err(why) => Err(Refusal::Malformed(format!("the request's {why}"))),
        }
    }
}

/// Adds one `Content-Length` field's value (a number, or a list of equal numbers, as RFC 9110
/// §8.6 allows a recipient to take) to the length seen so far.
pub fn content_length(value: &[u8], seen: Option<u64>) -> Result<Option<u64>, &'static str> {
    let mut length = seen;
    for part in value.split(|b| *b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err("Content-Length is not a number");
        }
        let n = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("Content-Length is too large")?;
        if length.is_some_and(|l| l != n) {
            return Err("Content-Length values conflict");
        }
        length = Some(n);
    }
    Ok(length)
}

/// Whether the comma-separated field value holds `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a response to `method` with `status` has a body (RFC 9112 §6.3): not after `HEAD`,
/// and not for 1xx, 204 and 304.
pub fn response_has_body(method: &Method, status: StatusCode) -> bool {
    !(*method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the connection closes.
    Close,
}

/// The framing of a response to `method` with `status`, from its `Transfer-Encoding` (whether
/// its final coding is `chunked`, if it has one) and `Content-Length` (as [`content_length`]
/// left it). `Transfer-Encoding` overrides `Content-Length`; another final coding than
/// `chunked` is read until the connection closes.
pub fn response_framing(
    method: &Method,
    status: StatusCode,
    chunked: Option<bool>,
    length: Result<Option<u64>, &'static str>,
) -> Result<ResponseBody, &'static str> {
    if !response_has_body(method, status) {
        return Ok(ResponseBody::Empty);
    }
    match chunked {
        Some(true) => return Ok(ResponseBody::Chunked),
        Some(false) => return Ok(ResponseBody::Close),
        None => {}
    }
    Ok(match length? {
        Some(0) => ResponseBody::Empty,
        Some(n) => ResponseBody::Length(n),
        None => ResponseBody::Close,
    })
}

/// Whether a response's `Transfer-Encoding` value ends in `chunked`.
pub fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Reads a chunk-size line at the front of `buf`: `Ok(Some((size, line length)))`, `Ok(None)`
/// if it is not complete yet, or why it is invalid. The size is 1*HEXDIG (RFC 9112 §7.1):
/// no sign, no leading whitespace; whitespace may follow it, then extensions after `;`, and
/// the line ends in CRLF. A bare LF, or a CR that does not end the line, is an error.
pub fn chunk_size_line(buf: &[u8]) -> Result<Option<(u64, usize)>, &'static str> {
    let Some(lf) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > MAX_CHUNK_LINE {
            return Err("chunk size line too long");
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err("chunk size line not ended by CRLF");
    }
    let line = &buf[..lf - 1];
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("invalid chunk size");
    }
    let mut size: u64 = 0;
    for b in &line[..digits] {
        let d = (*b as char).to_digit(16).unwrap_or_default();
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or("chunk size too large")?;
    }
    let rest = &line[digits..];
    let ext = &rest[rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count()..];
    if !(ext.is_empty() || ext.starts_with(b";")) {
        return Err("invalid chunk size");
    }
    if ext.iter().any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f) {
        return Err("invalid chunk extension");
    }
    Ok(Some((size, lf + 1)))
}

/// Checks the CRLF that must follow a chunk's data: `Ok(Some(2))` when it is there,
/// `Ok(None)` if it is not complete yet, or why it is invalid.
pub fn chunk_data_end(buf: &[u8]) -> Result<Option<usize>, &'static str> {
    match buf {
        [b'\r', b'\n', ..] => Ok(Some(2)),
        [] | [b'\r'] => Ok(None),
        _ => Err("chunk data not followed by CRLF"),
    }
}

/// Most fields in a trailer section.
pub const MAX_TRAILER_FIELDS: usize = 128;

/// The length of the trailer section at the front of `buf` (after the last chunk), its empty
/// last line included: `Ok(None)` if it is not complete yet, or why it is invalid. Every line
/// must end in CRLF, and every field must be one `httparse` reads (as in a head).
pub fn trailer_section(buf: &[u8], max: usize) -> Result<Option<usize>, &'static str> {
    let mut start = 0;
    while let Some(lf) = buf[start..].iter().position(|b| *b == b'\n') {
        let end = start + lf;
        if end == 0 || buf[end - 1] != b'\r' || buf[start..end - 1].contains(&b'\r') {
            return Err("trailer line not ended by CRLF");
        }
        if end - 1 == start {
            let len = end + 1;
            let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
            let valid = len == 2
                || matches!(
                    httparse::parse_headers(&buf[..len], &mut fields),
                    Ok(httparse::Status::Complete(_))
                );
            return if valid {
                Ok(Some(len))
            } else {
                Err("invalid trailer section")
            };
        }
        start = end + 1;
    }
    if buf.len() > max {
        return Err("trailer section too large");
    }
    Ok(None)
}

/// Fields that must not be sent as trailers (RFC 9110 §6.5.1): framing, routing, request
/// modifiers, authentication, response control and content metadata, which a recipient may
/// otherwise act on after the fact (the list Go's `net/http` keeps, and `Set-Cookie`).
const FORBIDDEN_TRAILERS: &[&[u8]] = &[
    b"authorization",
    b"cache-control",
    b"connection",
    b"content-encoding",
    b"content-length",
    b"content-range",
    b"content-type",
    b"expect",
    b"host",
    b"keep-alive",
    b"max-forwards",
    b"pragma",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"range",
    b"set-cookie",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"www-authenticate",
];

/// Whether a field named `name` must not be passed on as a trailer.
pub fn is_forbidden_trailer(name: &[u8]) -> bool {
    FORBIDDEN_TRAILERS
        .iter()
        .any(|f| f.eq_ignore_ascii_case(name))
}

/// The target as hyper's path forwards it, with the bytes the `http` crate refuses
/// percent-encoded (`<` and `>` anywhere, a backtick in the path, a `"` in the query), or
/// `None` if it has none.
pub fn hyper_target(target: &[u8]) -> Option<Vec<u8>> {
    let query = target
        .iter()
        .position(|b| *b == b'?')
        .unwrap_or(target.len());
    let refused = |i: usize, b: u8| {
        matches!(b, b'<' | b'>') || (b == b'`' && i < query) || (b == b'"' && i > query)
    };
    if !target.iter().enumerate().any(|(i, b)| refused(i, *b)) {
        return None;
    }
    let mut out = Vec::with_capacity(target.len() + 8);
    for (i, b) in target.iter().enumerate() {
        if refused(i, *b) {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(*b);
        }
    }
    Some(out)
}

/// Appends the status line `HTTP/1.1 <code> <reason>` for `status`.
pub fn write_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends the field `name: value` and its CRLF.
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a `content-length` field of `n`.
pub fn write_length(out: &mut Vec<u8>, n: u64) {
    use std::io::Write as _;
    let _ = write!(out, "content-length: {n}\r\n");
}

/// Appends the current `date` value.
pub fn date(out: &mut Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Parsed, Refusal> {
        parse_request(text.as_bytes(), 100, 64 * 1024, &mut Vec::new(), false)
    }

    fn body_of(text: &str) -> Result<RequestBody, Refusal> {
        match head(text)? {
            Parsed::Head(h) => Ok(h.body),
            other => panic!("{other:?}"),
        }
    }

    /// A `max_headers` beyond what fits on the stack parses on the heap, up to that limit.
    #[test]
    fn more_fields_than_the_stack_holds_are_parsed_up_to_max_headers() {
        let fields: String = (0..200).map(|i| format!("X-F{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
        let mut scratch = Vec::new();
        let parsed = parse_request(text.as_bytes(), 300, 64 * 1024, &mut scratch, false);
        assert!(matches!(parsed, Ok(Parsed::Head(_))), "{parsed:?}");
        assert_eq!(scratch.len(), 201);
        let parsed = parse_request(text.as_bytes(), 150, 64 * 1024, &mut scratch, false);
        assert!(matches!(parsed, Err(Refusal::TooLarge(_))), "{parsed:?}");
    }

    #[test]
    fn the_four_target_forms_and_nothing_else() {
        let get = Method::GET;
        for ok in [&b"/p?q"[..], b"*", b"http://a/b", b"h2c+x-1.y://a"] {
            assert!(target_form_ok(ok, &get), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b"a",
            b"://a",
            b"1http://a",
            b"http:/a",
            b"a.example:443",
        ] {
            assert!(
                !target_form_ok(bad, &get),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(target_form_ok(b"a.example:443", &Method::CONNECT));
    }

    #[test]
    fn request_framing_follows_rfc_9112_and_refuses_what_is_ambiguous() {
        let r = |fields: &str| body_of(&format!("POST / HTTP/1.1\r\nHost: x\r\n{fields}\r\n"));
        assert_eq!(r(""), Ok(RequestBody::None));
        assert_eq!(r("Content-Length: 5\r\n"), Ok(RequestBody::Length(5)));
        assert_eq!(
            r("Content-Length: 5\r\nContent-Length: 5\r\n"),
            Ok(RequestBody::Length(5))
        );
        assert_eq!(
            r("Transfer-Encoding: chunked\r\n"),
            Ok(RequestBody::Chunked)
        );
        assert_eq!(
            r("transfer-encoding:  Chunked \r\n"),
            Ok(RequestBody::Chunked)
        );
        for both in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Transfer-Encoding: gzip\r\nContent-Length: 0\r\n",
        ] {
            assert!(matches!(r(both), Err(Refusal::Malformed(_))), "{both:?}");
        }
        for coding in [
            "gzip, chunked",
            "chunked, chunked",
            ",chunked",
            "chunked,",
            "identity",
            "xchunked",
            "chunked;q=1",
            "",
            "\"chunked\"",
        ] {
            let fields = format!("Transfer-Encoding: {coding}\r\n");
            assert!(
                matches!(r(&fields), Err(Refusal::Unsupported(_))),
                "{coding:?}"
            );
        }
        assert!(matches!(
            r("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
            Err(Refusal::Unsupported(_))
        ));
        for length in [
            "+5",
            "-1",
            "0x5",
            "5.0",
            "",
            "1 2",
            "5, 6",
            "5, 5",
            "99999999999999999999",
        ] {
            let fields = format!("Content-Length: {length}\r\n");
            assert!(
                matches!(r(&fields), Err(Refusal::Malformed(_))),
                "{length:?}"
            );
        }
        assert!(matches!(
            body_of("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn heads_over_the_limits_and_malformed_heads_are_refused() {
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..101 {
            many.push_str(&format!("X-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(head(&many), Err(Refusal::TooLarge(_))));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(70 * 1024));
        assert!(matches!(head(&long), Err(Refusal::TooLarge(_))));
        assert!(matches!(
            head(&long[..65 * 1024]),
            Err(Refusal::TooLarge(_))
        ));
        for bad in [
            "GET / HTTP/1.1\r\nName : v\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nBad\x01Name: v\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            "GET / HTTP/1.2\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(Refusal::Malformed(_))), "{bad:?}");
        }
        // A bare LF ends a head line, as in httparse, hyper and nginx.
        assert!(matches!(
            head("GET / HTTP/1.1\nHost: x\n\n"),
            Ok(Parsed::Head(_))
        ));
    }

    #[test]
    fn the_http2_preface_is_told_apart() {
        assert_eq!(
            head("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Ok(Parsed::Preface)
        );
        assert_eq!(head("PRI * HT"), Ok(Parsed::Partial));
        assert!(matches!(
            head("PRI * HTTP/2.0\r\nHost: h\r\n\r\n"),
            Err(Refusal::Malformed(_))
        ));
        assert_eq!(head("GET / HT"), Ok(Parsed::Partial));
        let after = parse_request(PREFACE, 100, 1024, &mut Vec::new(), true);
        assert!(matches!(after, Err(Refusal::Malformed(m)) if m.contains("preface")));
    }

    #[test]
    fn a_head_says_how_the_connection_goes_on() {
        let Ok(Parsed::Head(h)) = head(
            "GET /a?b HTTP/1.1\r\nConnection: keep-alive, Close\r\nTE: trailers\r\n\
             Upgrade: h2c\r\nExpect: 100-continue\r\n\r\nrest",
        ) else {
            panic!()
        };
        assert_eq!(
            (h.close, h.te_trailers, h.upgrade, h.expect),
            (true, true, true, true)
        );
        assert_eq!(h.target, (4, 8));
        assert_eq!(h.len, "GET /a?b HTTP/1.1\r\nConnection: keep-alive, Close\r\nTE: trailers\r\nUpgrade: h2c\r\nExpect: 100-continue\r\n\r\n".len());
        let Ok(Parsed::Head(h)) = head("GET / HTTP/1.0\r\n\r\n") else {
            panic!()
        };
        assert!(h.close && !h.http11);
        let Ok(Parsed::Head(h)) = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n") else {
            panic!()
        };
        assert!(!h.close);
    }

    #[test]
    fn chunk_size_lines_are_hex_digits_ended_by_crlf() {
        assert_eq!(chunk_size_line(b"5\r\nhello"), Ok(Some((5, 3))));
        assert_eq!(chunk_size_line(b"1F;ext=\"a b\"\r\n"), Ok(Some((31, 14))));
        assert_eq!(chunk_size_line(b"5 ; x\r\n"), Ok(Some((5, 7))));
        assert_eq!(chunk_size_line(b"5\t\r\n"), Ok(Some((5, 4))));
        assert_eq!(
            chunk_size_line(b"0000000000000000005\r\n"),
            Ok(Some((5, 21)))
        );
        assert_eq!(chunk_size_line(b"5"), Ok(None));
        assert_eq!(chunk_size_line(b"5;ext"), Ok(None));
        for bad in [
            &b"+5\r\n"[..],
            b" 5 \r\n",
            b"0x5\r\n",
            b"5\n",
            b"0\n\n",
            b"5;a\nb\r\n",
            b"5;a\rb\r\n",
            b"5 6\r\n",
            b"\r\n",
            b"z\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(
                chunk_size_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(chunk_size_line(&[b'1'; MAX_CHUNK_LINE + 1]).is_err());
        // Exactly the limit is still only incomplete.
        let mut at_limit = vec![b'0'; MAX_CHUNK_LINE - 1];
        at_limit.push(b';');
        assert_eq!(chunk_size_line(&at_limit), Ok(None));
    }

    #[test]
    fn trailer_sections_end_at_an_empty_crlf_line() {
        assert_eq!(trailer_section(b"\r\nGET", 100), Ok(Some(2)));
        assert_eq!(
            trailer_section(b"X: 1\r\nY: 2\r\n\r\nGET", 100),
            Ok(Some(14))
        );
        assert_eq!(trailer_section(b"X: 1\r\n", 100), Ok(None));
        assert!(trailer_section(b"X: 1\n\r\n", 100).is_err());
        assert!(trailer_section(b"\n", 100).is_err());
        assert!(trailer_section(b"X: 1\r\r\n\r\n", 100).is_err());
        assert!(trailer_section(&[b'x'; 101], 100).is_err());
        assert_eq!(trailer_section(&[b'x'; 100], 100), Ok(None), "at the limit");
        for bad in [
            &b"X y\r\n\r\n"[..],
            b"X : y\r\n\r\n",
            b"X: a\r\n b\r\n\r\n",
            b"X: a\x00b\r\n\r\n",
        ] {
            assert!(
                trailer_section(bad, 100).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_data_is_followed_by_crlf() {
        assert_eq!(chunk_data_end(b"\r\n5\r\n"), Ok(Some(2)));
        assert_eq!(chunk_data_end(b"\r"), Ok(None));
        assert_eq!(chunk_data_end(b""), Ok(None));
        for bad in [&b"\n"[..], b"X", b"\r\r", b"XX"] {
            assert!(chunk_data_end(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn response_framing_after_head_and_bodiless_statuses() {
        use ResponseBody::*;
        let f = |m: Method, s: u16, te, cl| {
            response_framing(&m, StatusCode::from_u16(s).unwrap(), te, cl)
        };
        assert_eq!(f(Method::HEAD, 200, None, Ok(Some(5))), Ok(Empty));
        assert_eq!(f(Method::GET, 204, Some(true), Ok(None)), Ok(Empty));
        assert_eq!(f(Method::GET, 304, None, Ok(Some(5))), Ok(Empty));
        assert_eq!(f(Method::GET, 200, Some(true), Ok(Some(5))), Ok(Chunked));
        assert_eq!(f(Method::GET, 200, Some(false), Ok(None)), Ok(Close));
        assert_eq!(f(Method::GET, 200, None, Ok(Some(0))), Ok(Empty));
        assert_eq!(f(Method::GET, 200, None, Ok(None)), Ok(Close));
        assert!(f(Method::GET, 200, None, Err("x")).is_err());
        assert!(ends_chunked(b"gzip, Chunked "));
        assert!(!ends_chunked(b"chunked, gzip"));
    }

    #[test]
    fn framing_fields_are_not_trailers() {
        for name in [
            &b"Content-Length"[..],
            b"transfer-encoding",
            b"Set-Cookie",
            b"AUTHORIZATION",
            b"host",
        ] {
            assert!(is_forbidden_trailer(name));
        }
        assert!(!is_forbidden_trailer(b"x-checksum"));
        assert!(!is_forbidden_trailer(b"grpc-status"));
    }
    #[test]
    fn targets_the_http_crate_refuses_are_percent_encoded() {
        let enc = |t: &str| hyper_target(t.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(enc("/a?b=1"), None);
        assert_eq!(
            enc(r#"/s?where={"a":1}"#),
            Some("/s?where={%22a%22:1}".into())
        );
        assert_eq!(enc("/a<b>?c=<d>"), Some("/a%3Cb%3E?c=%3Cd%3E".into()));
        assert_eq!(enc("/a`b?c=`"), Some("/a%60b?c=`".into()));
        assert_eq!(enc(r#"/"quoted"/{x}"#), None);
    }
}
