//! The HTTP/2 connections of one thread to one upstream, each a [`Session`] kept in a
//! thread-local table and driven by its own task, which owns the socket: it writes what the
//! streams queued, all of them in one write where they came together, and feeds the session
//! what it reads.
//!
//! Why thread-local: the requests and bodies of the thread's client connections reach their
//! session without a lock or a channel, holding only its key and their stream's id (plain
//! numbers, so their futures stay `Send`). A worker is a current-thread runtime, so a task
//! stays on the thread that first polled it.
//!
//! Streams go to the first session with room, so that in a burst the thread's requests share
//! one connection and a spare one goes idle and closes (after the pool's idle timeout, as an
//! HTTP/1.1 connection does). Only one connection is made at a time per thread and pool: the
//! others wait for it rather than each making their own.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

use super::session::{ResponseHead, Session, StreamError};
use crate::proxy::raw::{ClientFraming, ClientHead, UpstreamFraming};
use crate::proxy::stream::UpstreamStream;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// One session of this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pool: u64,
    serial: u64,
}

struct Entry {
    key: Key,
    session: Session,
}

/// A connection being made for a pool on this thread, and who waits for it.
struct Connecting {
    pool: u64,
    waiters: Vec<Waker>,
}

/// How many ended sessions of a thread remember why they ended.
const ENDED_KEPT: usize = 8;

thread_local! {
    static SESSIONS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
    static CONNECTING: RefCell<Vec<Connecting>> = const { RefCell::new(Vec::new()) };
    /// Why the thread's last few sessions ended. A session leaves the table before its
    /// streams are woken, so they look here to answer with the cause (a refused client
    /// certificate, say) rather than only that the connection closed.
    static ENDED: RefCell<VecDeque<(Key, String)>> = const { RefCell::new(VecDeque::new()) };
}

/// Keeps why session `key` ended, forgetting the oldest kept beyond [`ENDED_KEPT`].
fn remember_end(key: Key, why: String) {
    ENDED.with_borrow_mut(|all| {
        if all.len() == ENDED_KEPT {
            all.pop_front();
        }
        all.push_back((key, why));
    });
}

/// Why session `key` ended, as far as this thread still knows.
fn ended(key: Key) -> String {
    ENDED
        .with_borrow(|all| {
            all.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, why)| why.clone())
        })
        .unwrap_or_else(|| "the HTTP/2 connection closed".into())
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

fn with<R>(key: Key, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
    SESSIONS.with_borrow_mut(|all| {
        all.iter_mut()
            .find(|e| e.key == key)
            .map(|e| f(&mut e.session))
    })
}

/// The first session of `pool` on this thread with room for a stream.
pub fn pick(pool: u64) -> Option<Key> {
    SESSIONS.with_borrow(|all| {
        all.iter()
            .find(|e| e.key.pool == pool && e.session.has_room())
            .map(|e| e.key)
    })
}

/// How many sessions `pool` has on this thread (for tests and the idle check).
pub fn count(pool: u64) -> usize {
    SESSIONS.with_borrow(|all| all.iter().filter(|e| e.key.pool == pool).count())
}

/// Waits while another request of this thread makes a connection for `pool`; `true` if it
/// waited (then look again for a session), `false` if none was being made.
pub async fn wait_for_connect(pool: u64) -> bool {
    let mut waited = false;
    poll_fn(|cx| {
        CONNECTING.with_borrow_mut(|all| match all.iter_mut().find(|c| c.pool == pool) {
            Some(c) => {
                if !c.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    c.waiters.push(cx.waker().clone());
                }
                waited = true;
                Poll::Pending
            }
            None => Poll::Ready(()),
        })
    })
    .await;
    waited
}

/// Marks a connection being made for `pool` on this thread until dropped.
#[derive(Debug)]
pub struct ConnectGuard(u64);

/// Marks that this request makes `pool`'s connection: the thread's other requests wait.
pub fn connecting(pool: u64) -> ConnectGuard {
    CONNECTING.with_borrow_mut(|all| {
        if !all.iter().any(|c| c.pool == pool) {
            all.push(Connecting {
                pool,
                waiters: Vec::new(),
            });
        }
    });
    ConnectGuard(pool)
}

impl Drop for ConnectGuard {
    fn drop(&mut self) {
        let waiters = CONNECTING.with_borrow_mut(|all| {
            let i = all.iter().position(|c| c.pool == self.0)?;
            Some(all.swap_remove(i).waiters)
        });
        for w in waiters.into_iter().flatten() {
            w.wake();
        }
    }
}

/// Starts a session over `io` (TLS with `h2` chosen by ALPN), driven by a task of this
/// thread until it fails, the upstream ends it, it has been idle for `idle_timeout`, or
/// `closed` fires and its streams are done.
pub fn start(
    pool: u64,
    io: UpstreamStream,
    idle_timeout: Duration,
    closed: CancellationToken,
) -> Key {
    let key = Key {
        pool,
        serial: SERIAL.fetch_add(1, Ordering::Relaxed),
    };
    SESSIONS.with_borrow_mut(|all| {
        all.push(Entry {
            key,
            session: Session::new(),
        })
    });
    tokio::spawn(drive(key, io, idle_timeout, closed));
    key
}

/// Runs session `key` over `io`; at the end its streams fail and it leaves the table.
async fn drive(
    key: Key,
    mut io: UpstreamStream,
    idle_timeout: Duration,
    closed: CancellationToken,
) {
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    let (mut write, mut written, mut unflushed) = (Vec::<u8>::new(), 0usize, false);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let mut idle_armed = false;
    let stop = closed.cancelled();
    tokio::pin!(stop);
    let end: Option<String> = poll_fn(|cx| loop {
        if stop.as_mut().poll(cx).is_ready() {
            with(key, |s| s.draining = true);
        }
        let mut progress = false;
        // Write what the streams queued, all of it together.
        if written == write.len() {
            write.clear();
            written = 0;
            with(key, |s| std::mem::swap(&mut s.out, &mut write));
        }
        while written < write.len() {
            match Pin::new(&mut io).poll_write(cx, &write[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Some("the upstream stopped taking data".into()))
                }
                Poll::Ready(Ok(n)) => {
                    written += n;
                    unflushed = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(format!("writing to the upstream failed: {e}")))
                }
                Poll::Pending => break,
            }
        }
        if unflushed && written == write.len() {
            match Pin::new(&mut io).poll_flush(cx) {
                Poll::Ready(Ok(())) => unflushed = false,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(format!("writing to the upstream failed: {e}")))
                }
                Poll::Pending => {}
            }
        }
        // Read what came, and let the session make sense of it.
        if read.capacity() - read.len() < READ_CHUNK / 4 {
            read.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut read) {
            Poll::Ready(Ok(0)) => {
                return Poll::Ready(Some("the upstream closed the HTTP/2 connection".into()))
            }
            Poll::Ready(Ok(_)) => {
                with(key, |s| s.receive(&mut read));
                progress = true;
            }
            Poll::Ready(Err(e)) => {
                return Poll::Ready(Some(format!("reading from the upstream failed: {e}")))
            }
            Poll::Pending => {}
        }
        let Some((dead, draining, open, queued)) = with(key, |s| {
            if !s.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.driver = Some(cx.waker().clone());
            }
            (
                s.dead.clone(),
                s.draining,
                s.open_streams(),
                !s.out.is_empty(),
            )
        }) else {
            return Poll::Ready(Some("the session is gone".into()));
        };
        let flushed = written == write.len() && !unflushed;
        if queued && flushed {
            continue;
        }
        if flushed {
            if let Some(why) = dead {
                return Poll::Ready(Some(why));
            }
            if draining && open == 0 {
                return Poll::Ready(None);
            }
        }
        if open == 0 {
            if !idle_armed {
                idle.as_mut()
                    .reset(tokio::time::Instant::now() + idle_timeout);
                idle_armed = true;
            }
            if idle.as_mut().poll(cx).is_ready() {
                with(key, |s| s.draining = true);
                continue;
            }
        } else {
            idle_armed = false;
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await;
    if let Some(why) = &end {
        tracing::debug!(error = %why, "upstream HTTP/2 connection ended");
        remember_end(key, why.clone());
    }
    let entry = SESSIONS.with_borrow_mut(|all| {
        let i = all.iter().position(|e| e.key == key)?;
        // In order: streams go to the first session with room.
        Some(all.remove(i))
    });
    // Streams still open fail (outside the table's borrow: waking runs nothing here, but
    // the session's drop should not happen inside it either).
    if let Some(mut entry) = entry {
        entry
            .session
            .fail(end.unwrap_or_else(|| "the HTTP/2 connection closed".into()));
    }
}

/// Resets its stream if dropped before the response head was taken (a timeout, or the
/// client went away); once the head is taken, the body does.
struct Opened {
    key: Key,
    id: u32,
    armed: bool,
}

impl Drop for Opened {
    fn drop(&mut self) {
        if self.armed {
            with(self.key, |s| s.cancel(self.id));
        }
    }
}

/// Sends the bodiless request whose HTTP/1.1 head (written for the upstream) is `head` on
/// session `key`, and writes the response head for the front door's client into `client`
/// (see `raw::ClientHead`). Returns the status, the body and how the client's copy is framed.
pub async fn send_for_client(
    key: Key,
    head: &[u8],
    method: &Method,
    client: &mut ClientHead<'_>,
) -> Result<(StatusCode, H2Body, ClientFraming), StreamError> {
    let gone = || StreamError::Refused(ended(key));
    let id = with(key, |s| s.open(head, method)).ok_or_else(gone)??;
    let mut opened = Opened {
        key,
        id,
        armed: true,
    };
    let response: ResponseHead = poll_fn(|cx| {
        with(key, |s| s.poll_head(id, cx))
            .unwrap_or_else(|| Poll::Ready(Err(StreamError::Connection(ended(key)))))
    })
    .await?;
    opened.armed = false;
    let status = response.status.unwrap_or(StatusCode::BAD_GATEWAY);
    let done = with(key, |s| s.is_done(id)).unwrap_or(false);
    let framing = match () {
        _ if done && response.length.is_none() => UpstreamFraming::Empty,
        _ if response.length.is_some() => UpstreamFraming::Length,
        _ => UpstreamFraming::Streamed,
    };
    let streamed = framing == UpstreamFraming::Streamed;
    let fields = response
        .fields()
        .filter(|(n, _)| streamed || *n != b"trailer");
    let client_framing = client.write_response(
        status,
        fields,
        framing,
        response.length,
        response.date,
        method,
    );
    let body = H2Body {
        key,
        id,
        ended: false,
        left: response.length,
    };
    with(key, |s| s.recycle(response));
    Ok((status, body, client_framing))
}

/// A response body arriving on an HTTP/2 stream; dropped before its end, the stream is
/// reset.
#[derive(Debug)]
pub struct H2Body {
    key: Key,
    id: u32,
    ended: bool,
    /// What its `Content-Length` says is still to come.
    left: Option<u64>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let (key, id) = (self.key, self.id);
        let polled = with(key, |s| s.poll_data(id, cx))
            .unwrap_or_else(|| Poll::Ready(Some(Err(StreamError::Connection(ended(key))))));
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.ended = true,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(left), Some(data)) = (self.left, frame.data_ref()) {
                    self.left = Some(left.saturating_sub(data.len() as u64));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || with(self.key, |s| s.is_done(self.id)).unwrap_or(false)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        if !self.ended {
            with(self.key, |s| s.cancel(self.id));
        }
    }
}

/// Whether `io` chose HTTP/2 by ALPN.
pub fn chose_h2(io: &UpstreamStream) -> bool {
    io.alpn() == Some(b"h2".as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last [`ENDED_KEPT`] sessions' causes are kept, each under its own key; older
    /// ones and unknown keys read as the connection closing.
    #[test]
    fn the_last_few_sessions_remember_why_they_ended() {
        let key = |serial| Key { pool: 7, serial };
        for serial in 0..=ENDED_KEPT as u64 {
            remember_end(key(serial), format!("cause {serial}"));
        }
        assert_eq!(ended(key(0)), "the HTTP/2 connection closed");
        for serial in 1..=ENDED_KEPT as u64 {
            assert_eq!(ended(key(serial)), format!("cause {serial}"));
        }
        assert_eq!(
            ended(Key { pool: 8, serial: 1 }),
            "the HTTP/2 connection closed"
        );
        ENDED.with_borrow(|all| assert_eq!(all.len(), ENDED_KEPT));
    }
}
