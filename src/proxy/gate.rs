//! The gate: what hyper's HTTP/1.1 server reads, judged first by the codec.
//!
//! Why: the front door hands a connection to hyper at the first request it does not serve
//! itself (a body, an upgrade, an HTTP/1.0 request, a route without the lean path), and
//! hyper reads every later request on that connection. hyper is lenient where the codec is
//! not (it reads a request with both `Content-Length` and `Transfer-Encoding` by the latter,
//! takes 17-digit chunk sizes and bare LFs in trailers, and answers its own refusals with an
//! empty body), so without the gate the rules of `codec.rs` would hold for a connection's
//! first request only. The gate follows the byte stream message by message (heads, then each
//! body by its framing), lets through only what the codec accepts, and refuses the rest as the
//! front door does: the JSON error, then the connection closes.
//!
//! - A refused head (at a message boundary) is never seen by hyper: the gate stops reading,
//!   asks the connection to wind down (`refused`), and writes the answer when hyper, having
//!   finished any response in flight, shuts the connection down.
//! - A refused chunked body (mid-message) fails hyper's read: the answer goes first, unless
//!   hyper has already begun a response, and the connection closes.
//! - After an upgrade request, the gate lets nothing more through until hyper's answer shows
//!   whether the protocol switched (`101`: the bytes are no longer HTTP) or not.
//! - Targets that the `http` crate refuses although clients send them (`<`, `>`, a backtick,
//!   a `"` in the query) are percent-encoded for hyper; the front door forwards bodiless
//!   requests with such targets byte for byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::codec::{self, Field, Parsed, RequestBody};
use super::service::ProxyService;
use super::ProxyError;
use crate::config::ClientLimits;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// A client connection as hyper's HTTP/1.1 server reads it, through the codec.
pub struct Gate<T> {
    inner: T,
    /// Bytes read from `inner`, not yet judged.
    raw: BytesMut,
    /// Judged bytes, for hyper.
    ready: BytesMut,
    state: State,
    fields: Vec<Field>,
    limits: ClientLimits,
    /// Who answers refusals (logged and counted as the route's errors).
    service: Option<ProxyService>,
    /// A request head was let through.
    served: bool,
    /// hyper wrote since the last head was let through.
    wrote: bool,
    /// The answer to a refusal, still to be written (and how much of it is).
    answer: Option<Bytes>,
    /// Fired when a head is refused: the connection should wind down.
    refused: CancellationToken,
    /// The inner stream ended.
    eof: bool,
    /// The last head let through asked to close the connection.
    closing: bool,
    /// A refused body's answer is ours to write (hyper had written nothing of its own).
    answered: bool,
}

impl<T> std::fmt::Debug for Gate<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Where the gate is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A request head comes next.
    Head,
    /// This many bytes of a sized body remain.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// An upgrade request was let through: nothing more until hyper's answer shows whether
    /// the protocol switched.
    Hold,
    /// No longer HTTP/1.1 (HTTP/2 with prior knowledge, or a switched protocol): bytes pass.
    Transparent,
    /// A head was refused: nothing more passes, the answer goes at shutdown.
    Refused,
    /// A body was refused: reads fail, and once the answer went, what hyper writes after it
    /// is dropped (its own error for the cut body).
    Broken,
    /// The last request let through ends the connection (`Connection: close`): nothing after
    /// it is judged or passed, as hyper would read nothing after it either.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What judging the bytes at hand came to.
enum Judged {
    /// Judge again: progress was made.
    Again,
    /// More bytes are needed (or none pass for now).
    Wait,
}

impl<T> Gate<T> {
    /// `inner` as hyper should read it, refusals answered by `service`; `refused` fires when
    /// a head is refused. Without a service (the admin listener), bytes pass unjudged.
    pub fn new(
        inner: T,
        limits: ClientLimits,
        service: Option<ProxyService>,
        refused: CancellationToken,
    ) -> Gate<T> {
        let (state, service) = match service {
            Some(service) => (State::Head, Some(service)),
            None => (State::Transparent, None),
        };
        Gate {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            state,
            fields: Vec::new(),
            limits,
            service,
            served: false,
            wrote: false,
            answer: None,
            refused,
            eof: false,
            closing: false,
            answered: false,
        }
    }

    /// Judges what is in `raw`, moving what passes to `ready`.
    fn judge(&mut self) {
        while let Judged::Again = self.step() {}
    }

    fn step(&mut self) -> Judged {
        if self.state == State::Head && self.closing {
            self.state = State::Closing;
        }
        if self.raw.is_empty() {
            return Judged::Wait;
        }
        match self.state {
            State::Head => self.head(),
            State::Length(left) => {
                let n = left.min(self.raw.len() as u64);
                self.pass(n as usize);
                self.state = if n == left {
                    State::Head
                } else {
                    State::Length(left - n)
                };
                Judged::Again
            }
            State::Chunked(chunk) => self.chunk(chunk),
            State::Hold | State::Refused | State::Broken | State::Closing => Judged::Wait,
            State::Transparent => {
                self.pass(self.raw.len());
                Judged::Wait
            }
        }
    }

    /// Lets the first `n` judged bytes through. Usually nothing is waiting for hyper, and the
    /// bytes change hands without a copy.
    fn pass(&mut self, n: usize) {
        if self.ready.is_empty() {
            self.ready = self.raw.split_to(n);
        } else {
            let bytes = self.raw.split_to(n);
            self.ready.extend_from_slice(&bytes);
        }
    }

    fn head(&mut self) -> Judged {
        let limits = self.limits;
        let parsed = codec::parse_request(
            &self.raw,
            limits.max_headers,
            limits.max_header_bytes,
            &mut self.fields,
            self.served,
        );
        let head = match parsed {
            Ok(Parsed::Partial) => return Judged::Wait,
            Ok(Parsed::Preface) => {
                self.state = State::Transparent;
                return Judged::Again;
            }
            Err(refusal) => {
                self.refuse_head(refusal.into());
                return Judged::Wait;
            }
            Ok(Parsed::Head(head)) => head,
        };
        let (start, end) = head.target;
        match codec::hyper_target(&self.raw[start..end]) {
            Some(encoded) => {
                self.ready.extend_from_slice(&self.raw[..start]);
                self.ready.extend_from_slice(&encoded);
                self.ready.extend_from_slice(&self.raw[end..head.len]);
                self.raw.advance(head.len);
            }
            None => self.pass(head.len),
        }
        self.served = true;
        self.wrote = false;
        self.closing = head.close;
        self.state = match head.body {
            RequestBody::None | RequestBody::Length(0) if head.upgrade && head.http11 => {
                State::Hold
            }
            RequestBody::None | RequestBody::Length(0) => State::Head,
            RequestBody::Length(n) => State::Length(n),
            RequestBody::Chunked => State::Chunked(Chunk::Size),
        };
        Judged::Again
    }

    fn chunk(&mut self, chunk: Chunk) -> Judged {
        match chunk {
            Chunk::Size => match codec::chunk_size_line(&self.raw) {
                Ok(None) => Judged::Wait,
                Ok(Some((size, line))) => {
                    self.pass(line);
                    self.state = State::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                    Judged::Again
                }
                Err(why) => self.refuse_body(why),
            },
            Chunk::Data(left) => {
                let n = left.min(self.raw.len() as u64);
                self.pass(n as usize);
                self.state = State::Chunked(if n == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                });
                Judged::Again
            }
            Chunk::DataEnd => match codec::chunk_data_end(&self.raw) {
                Ok(None) => Judged::Wait,
                Ok(Some(end)) => {
                    self.pass(end);
                    self.state = State::Chunked(Chunk::Size);
                    Judged::Again
                }
                Err(why) => self.refuse_body(why),
            },
            Chunk::Trailers => {
                match codec::trailer_section(&self.raw, self.limits.max_header_bytes) {
                    Ok(None) => Judged::Wait,
                    Ok(Some(end)) => {
                        self.pass(end);
                        self.state = State::Head;
                        Judged::Again
                    }
                    Err(why) => self.refuse_body(why),
                }
            }
        }
    }

    /// A head is refused: hyper sees nothing more; the answer goes when it shuts down.
    fn refuse_head(&mut self, e: ProxyError) {
        self.state = State::Refused;
        self.answer = Some(self.answer_bytes(e));
        self.refused.cancel();
    }

    /// A chunked body is refused mid-way: the answer goes first unless hyper has begun a
    /// response; hyper's read fails.
    fn refuse_body(&mut self, why: &str) -> Judged {
        self.state = State::Broken;
        let e = ProxyError::BadRequest(format!("malformed chunked request body: {why}"));
        let answer = self.answer_bytes(e);
        if !self.wrote {
            self.answer = Some(answer);
            self.answered = true;
        }
        Judged::Wait
    }

    /// The answer to `e` on the wire, logged and counted once by the service.
    fn answer_bytes(&self, e: ProxyError) -> Bytes {
        self.service
            .as_ref()
            .map_or_else(Bytes::new, |service| service.refuse(e))
    }

    /// Whether hyper's writes are dropped: a refused body's answer went (or is going) first.
    fn discards(&self) -> bool {
        self.state == State::Broken && self.answered
    }

    /// What hyper writes: while holding after an upgrade request, its status line tells
    /// whether the protocol switched. When the hold ends, what waited is judged and hyper's
    /// task woken to read it.
    fn saw_write(&mut self, first: &[u8], cx: &mut Context<'_>) {
        self.wrote = true;
        if self.state == State::Hold && first.len() >= 12 && first.starts_with(b"HTTP/1.") {
            match &first[9..12] {
                b"101" => self.state = State::Transparent,
                // An interim answer (100 Continue): the final one follows.
                [b'1', _, _] => return,
                _ => self.state = State::Head,
            }
            self.judge();
            cx.waker().wake_by_ref();
        }
    }
}

impl<T: AsyncWrite + Unpin> Gate<T> {
    /// Writes what is left of the answer.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(answer) = self.answer.as_mut() {
            if answer.is_empty() {
                self.answer = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, answer))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            answer.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Gate<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                if this.ready.is_empty() {
                    // Its storage goes back to `raw`, which can then reuse it; when nothing
                    // waits, an idle connection keeps no buffer here at all.
                    this.ready = BytesMut::new();
                    if this.raw.is_empty() {
                        this.raw = BytesMut::new();
                    }
                }
                return Poll::Ready(Ok(()));
            }
            match this.state {
                State::Broken => {
                    std::task::ready!(this.poll_answer(cx))?;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed chunked request body",
                    )));
                }
                // The connection winds down (see `refused`); nothing more is read.
                State::Refused => return Poll::Pending,
                // Until hyper answers the upgrade request, only a bounded amount is read
                // ahead; its answer wakes this (`saw_write`).
                State::Hold if this.raw.len() >= READ_CHUNK => return Poll::Pending,
                _ => {}
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // A body is read as hyper asks (its reads grow with the transfer), not a head's
            // chunk at a time: an upload takes as many system calls as without the gate.
            let want = match this.state {
                State::Length(_) | State::Chunked(Chunk::Data(_)) | State::Transparent => {
                    buf.remaining().max(READ_CHUNK)
                }
                _ => READ_CHUNK,
            };
            this.raw.reserve(want);
            let n = std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.raw
            ))?;
            if n == 0 {
                // What was not judged whole (a cut head or chunk line) never reaches hyper.
                this.eof = true;
                continue;
            }
            this.judge();
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Gate<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.discards() {
            return Poll::Ready(Ok(buf.len()));
        }
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.saw_write(&buf[..n], cx);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.discards() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        this.saw_write(&first[..first.len().min(n)], cx);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
