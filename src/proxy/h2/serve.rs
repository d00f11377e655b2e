//! The task that owns a client's HTTP/2 connection: it feeds the connection's [`Server`]
//! what it reads, writes what the streams queued (all of it in one write where it came
//! together), and runs a future per stream, made by its caller, in the same task.
//!
//! The sessions live in a thread-local table, as the upstream side's do (`conn.rs`), so that
//! a stream's request body can be read from another task of the thread (the upstream
//! connection's, which sends it), holding only the session's key and the stream's id: plain
//! numbers, so the futures stay `Send`. A worker is a current-thread runtime, so a task stays
//! on the thread that first polled it.
//!
//! Why the streams run in the connection's task, not one task each as in hyper's server: a
//! stream's wake-up then polls only that stream (`FuturesUnordered`), with no hop through the
//! scheduler between the stream and the connection.
//!
//! The connection ends when the client closes it or breaks a rule, when `stop` fires and its
//! streams are done (a `GOAWAY` first tells the client no new stream will be taken), or when
//! the client stops reading: frames for a client queue only up to a cap (see `server.rs`), and
//! reading stops while a write is pending, so a client that does not read is not read either.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::server::{Arrived, Server, StreamError};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// One client connection's session on this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    index: usize,
    serial: u64,
}

thread_local! {
    static SERVERS: RefCell<Table> = const { RefCell::new(Table { entries: Vec::new(), free: Vec::new() }) };
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

/// The thread's sessions: a slot each, reused once free (a key holds its slot's serial, so a
/// key outliving its session finds nothing).
struct Table {
    entries: Vec<Option<(u64, Server)>>,
    free: Vec<usize>,
}

/// Runs `f` on session `key`, if it is still there.
pub fn with<R>(key: Key, f: impl FnOnce(&mut Server) -> R) -> Option<R> {
    SERVERS.with_borrow_mut(|t| match t.entries.get_mut(key.index) {
        Some(Some((serial, server))) if *serial == key.serial => Some(f(server)),
        _ => None,
    })
}

fn insert(server: Server) -> Key {
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    SERVERS.with_borrow_mut(|t| {
        let index = match t.free.pop() {
            Some(i) => {
                t.entries[i] = Some((serial, server));
                i
            }
            None => {
                t.entries.push(Some((serial, server)));
                t.entries.len() - 1
            }
        };
        Key { index, serial }
    })
}

fn remove(key: Key) -> Option<Server> {
    SERVERS.with_borrow_mut(|t| match t.entries.get_mut(key.index) {
        Some(slot @ Some(_)) if slot.as_ref().is_some_and(|(s, _)| *s == key.serial) => {
            t.free.push(key.index);
            slot.take().map(|(_, server)| server)
        }
        _ => None,
    })
}

/// Serves the HTTP/2 connection `io`, whose first bytes (the preface, perhaps more) were
/// read already into `first`, with requests' header lists of up to `max_list` bytes.
/// `respond` makes the future that serves each new stream; it runs in this task until it
/// ends or the stream cannot go on (then it is dropped), and the stream is finished (see
/// [`Server::finish`]) when it ends.
pub async fn serve<T, F, Fut>(
    mut io: T,
    first: Bytes,
    max_list: usize,
    stop: &CancellationToken,
    mut respond: F,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Key, u32, Arrived) -> Fut,
    Fut: Future<Output = ()>,
{
    let key = insert(Server::new(max_list));
    let mut read = BytesMut::from(&first[..]);
    let (mut write, mut written, mut unflushed) = (Vec::<u8>::new(), 0usize, false);
    let mut streams = FuturesUnordered::new();
    let mut stopped = std::pin::pin!(stop.cancelled());
    let mut fed = false;
    let end: Option<String> = poll_fn(|cx| loop {
        let mut progress = false;
        if stopped.as_mut().poll(cx).is_ready() {
            with(key, Server::shutdown);
        }
        // What was read before (the bytes the front door had), once.
        if !fed {
            fed = true;
            if !read.is_empty() && with(key, |s| s.receive(&mut read)) == Some(false) {
                progress = true;
            }
        }
        // New streams start; the streams woken run.
        while let Some((id, arrived)) = with(key, Server::next_arrived).flatten() {
            streams.push(Running {
                key,
                id,
                work: respond(key, id, arrived),
            });
        }
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {
            progress = true;
        }
        // Write what the streams queued, all of it together.
        if written == write.len() {
            write.clear();
            written = 0;
            with(key, |s| {
                std::mem::swap(&mut s.out, &mut write);
                s.drained();
            });
        }
        while written < write.len() {
            match Pin::new(&mut io).poll_write(cx, &write[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Some("the client stopped taking data".into()))
                }
                Poll::Ready(Ok(n)) => {
                    written += n;
                    unflushed = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(format!("writing to the client failed: {e}")))
                }
                Poll::Pending => break,
            }
        }
        let flushed_before = written == write.len();
        if unflushed && flushed_before {
            match Pin::new(&mut io).poll_flush(cx) {
                Poll::Ready(Ok(())) => unflushed = false,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(format!("writing to the client failed: {e}")))
                }
                Poll::Pending => {}
            }
        }
        let Some((dead, draining, idle, queued)) = with(key, |s| {
            if !s.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                s.driver = Some(cx.waker().clone());
            }
            (s.dead.clone(), s.draining, s.is_idle(), !s.out.is_empty())
        }) else {
            return Poll::Ready(Some("the session is gone".into()));
        };
        let flushed = written == write.len() && !unflushed;
        if flushed {
            if let Some(why) = dead {
                return Poll::Ready(Some(why));
            }
            if draining && idle && streams.is_empty() && !queued {
                return Poll::Ready(None);
            }
        }
        // Read while what we owe the client is written: one that does not read is not read.
        if flushed_before && dead.is_none() {
            if read.capacity() - read.len() < READ_CHUNK / 4 {
                read.reserve(READ_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut read) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Some("the client closed the connection".into()))
                }
                Poll::Ready(Ok(_)) => {
                    with(key, |s| s.receive(&mut read));
                    progress = true;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(format!("reading from the client failed: {e}")))
                }
                Poll::Pending => {}
            }
        }
        if queued && flushed {
            continue;
        }
        if !progress {
            return Poll::Pending;
        }
    })
    .await;
    if let Some(why) = &end {
        tracing::debug!(error = %why, "client HTTP/2 connection ended");
    }
    // The streams still running see the connection gone, then end with it.
    let server = remove(key);
    if let Some(mut server) = server {
        server.fail(end.unwrap_or_else(|| "the HTTP/2 connection closed".into()));
    }
    drop(streams);
}

pin_project_lite::pin_project! {
    /// A stream's future, as the connection runs it: it ends when its work does, or as soon as
    /// the stream cannot go on (the client reset it, the connection ended), dropping the work
    /// and what it waited for (an upstream exchange) at once; and it finishes the stream (see
    /// [`Server::finish`]) when it ends or is dropped.
    ///
    /// A struct, not an async fn around the work: an async fn would hold the work future twice
    /// (as its argument and as the value it awaits), and this future is moved into its place
    /// among the connection's streams once per stream.
    struct Running<F> {
        key: Key,
        id: u32,
        #[pin]
        work: F,
    }

    impl<F> PinnedDrop for Running<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            with(*this.key, |s| s.finish(*this.id));
        }
    }
}

impl<F: Future<Output = ()>> Future for Running<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = self.project();
        // Looked at first: work woken by the reset itself (a write that would fail) is not
        // done for nothing.
        match with(*this.key, |s| s.poll_reset(*this.id, cx)) {
            Some(Poll::Pending) => this.work.poll(cx),
            Some(Poll::Ready(why)) => {
                tracing::debug!(stream = *this.id, error = %why, "HTTP/2 stream ended before its response");
                Poll::Ready(())
            }
            None => Poll::Ready(()),
        }
    }
}

/// The stream's id, its session's key, and what it can do.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    pub key: Key,
    pub id: u32,
}

impl Stream {
    /// The next piece of the request body: data, then trailers, then `None`.
    pub async fn data(&self) -> Option<Result<http_body::Frame<Bytes>, StreamError>> {
        poll_fn(|cx| {
            with(self.key, |s| s.poll_data(self.id, cx)).unwrap_or(Poll::Ready(Some(Err(gone()))))
        })
        .await
    }

    /// Sends the response head (see [`Server::send_head`]).
    pub fn head<'f>(
        &self,
        status: StatusCode,
        fields: impl Iterator<Item = (&'f [u8], &'f [u8])>,
        end_stream: bool,
    ) -> Result<(), StreamError> {
        with(self.key, |s| {
            s.send_head(self.id, status, fields, end_stream)
        })
        .unwrap_or(Err(gone()))
    }

    /// Sends `data`, within the client's windows.
    pub async fn send(&self, mut data: Bytes, end_stream: bool) -> Result<(), StreamError> {
        poll_fn(|cx| {
            with(self.key, |s| {
                s.poll_send_data(self.id, &mut data, end_stream, cx)
            })
            .unwrap_or(Poll::Ready(Err(gone())))
        })
        .await
    }

    /// Ends the stream with trailers.
    pub fn trailers(&self, fields: &HeaderMap) -> Result<(), StreamError> {
        with(self.key, |s| s.send_trailers(self.id, fields)).unwrap_or(Err(gone()))
    }
}

/// A stream's request body, read from its session wherever the reader runs on this thread
/// (the upstream connection's task, which sends it). The stream's window is given back as it
/// is read (see `server.rs`).
#[derive(Debug)]
pub struct RequestBody {
    stream: Stream,
    /// The `content-length` the client sent.
    length: Option<u64>,
    ended: bool,
}

impl RequestBody {
    /// The body of `stream`, of `length` bytes if the client said so.
    pub fn new(stream: Stream, length: Option<u64>) -> RequestBody {
        RequestBody {
            stream,
            length,
            ended: false,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, StreamError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let Stream { key, id } = self.stream;
        let polled = with(key, |s| s.poll_data(id, cx)).unwrap_or(Poll::Ready(Some(Err(gone()))));
        if let Poll::Ready(None | Some(Err(_))) = &polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.length == Some(0)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.length {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

fn gone() -> StreamError {
    StreamError::Connection("the HTTP/2 connection closed".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::time::Duration;

    /// The responder of these tests: `/echo` answers the request's body, `/big?N` answers N
    /// bytes, `/slow` answers a body that never ends; each response names its path.
    async fn respond(stream: Stream, arrived: Arrived, seen: std::rc::Rc<RefCell<Vec<String>>>) {
        let Arrived::Request { head, body } = arrived else {
            let _ = stream.head(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                std::iter::empty(),
                true,
            );
            return;
        };
        let path = String::from_utf8(head.path().unwrap_or_default().to_vec()).unwrap();
        seen.borrow_mut().push(format!("arrived {path}"));
        let _dropped = Dropped(seen.clone(), format!("dropped {path}"));
        let mut received = Vec::new();
        if path == "/collect" {
            // Through the body type, as the upstream's connection reads it.
            let collected = RequestBody::new(stream, head.length)
                .collect()
                .await
                .unwrap();
            let sum = collected
                .trailers()
                .and_then(|t| t.get("x-sum"))
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let fields: Vec<(&[u8], &[u8])> =
                vec![(b"x-path", b"/collect"), (b"x-sum", sum.as_bytes())];
            stream
                .head(StatusCode::OK, fields.into_iter(), false)
                .unwrap();
            let _ = stream.send(collected.to_bytes(), true).await;
            return;
        }
        if body {
            while let Some(piece) = stream.data().await {
                match piece {
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            received.extend_from_slice(&d);
                        }
                    }
                    Err(e) => {
                        seen.borrow_mut().push(format!("{path}: {e}"));
                        return;
                    }
                }
            }
        }
        let fields: Vec<(&[u8], &[u8])> = vec![(b"x-path", path.as_bytes())];
        if stream
            .head(StatusCode::OK, fields.into_iter(), false)
            .is_err()
        {
            return;
        }
        let answer = match path.as_str() {
            "/echo" => Bytes::from(received),
            p if p.starts_with("/big?") => Bytes::from(vec![b'b'; p[5..].parse().unwrap()]),
            "/slow" => loop {
                if let Err(e) = stream.send(Bytes::from_static(b"tick"), false).await {
                    seen.borrow_mut().push(format!("{path}: {e}"));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            },
            _ => Bytes::from_static(b"ok"),
        };
        let _ = stream.send(answer, true).await;
    }

    /// Tells the test its stream's work was dropped (or ended).
    struct Dropped(std::rc::Rc<RefCell<Vec<String>>>, String);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.borrow_mut().push(std::mem::take(&mut self.1));
        }
    }

    struct Started {
        send: hyper::client::conn::http2::SendRequest<ClientSends>,
        stop: CancellationToken,
        served: tokio::task::JoinHandle<()>,
        seen: std::rc::Rc<RefCell<Vec<String>>>,
        key: std::rc::Rc<RefCell<Option<Key>>>,
    }

    /// Polls `done` until it holds, for at most 5 s.
    async fn until(done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "not within 5 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn start() -> Started {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let seen = std::rc::Rc::new(RefCell::new(Vec::new()));
        let key = std::rc::Rc::new(RefCell::new(None));
        let (stop2, seen2, key2) = (stop.clone(), seen.clone(), key.clone());
        let served = tokio::task::spawn_local(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            serve(tcp, Bytes::new(), 16 * 1024, &stop2, |k, id, arrived| {
                *key2.borrow_mut() = Some(k);
                respond(Stream { key: k, id }, arrived, seen2.clone())
            })
            .await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Started {
            send,
            stop,
            served,
            seen,
            key,
        }
    }

    /// What the test client sends.
    type ClientSends = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

    fn request(method: &str, path: &str, body: Vec<u8>) -> http::Request<ClientSends> {
        http::Request::builder()
            .method(method)
            .uri(format!("http://localhost{path}"))
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap()
    }

    async fn fetch(
        send: &mut hyper::client::conn::http2::SendRequest<ClientSends>,
        req: http::Request<ClientSends>,
    ) -> (StatusCode, String, Vec<u8>) {
        let response = send.send_request(req).await.unwrap();
        let status = response.status();
        let path = response
            .headers()
            .get("x-path")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, path, body)
    }

    fn local<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            tokio::time::timeout(Duration::from_secs(20), f)
                .await
                .expect("the test finished in time")
        })
    }

    #[test]
    fn concurrent_streams_each_get_their_own_answer() {
        local(async {
            let r = start().await;
            let mut all = Vec::new();
            for i in 0..60 {
                let mut send = r.send.clone();
                all.push(tokio::spawn(async move {
                    let body = format!("body of {i}").into_bytes();
                    let (status, path, got) = if i % 2 == 0 {
                        fetch(&mut send, request("POST", "/echo", body.clone())).await
                    } else {
                        fetch(&mut send, request("GET", &format!("/big?{i}"), Vec::new())).await
                    };
                    assert_eq!(status, StatusCode::OK);
                    if i % 2 == 0 {
                        assert_eq!((path.as_str(), got), ("/echo", body));
                    } else {
                        assert_eq!(path, format!("/big?{i}"));
                        assert_eq!(got, vec![b'b'; i]);
                    }
                }));
            }
            for t in all {
                t.await.unwrap();
            }
            // Each stream was finished as its future ended: the session holds none.
            let key = r.key.borrow().expect("streams arrived");
            until(|| with(key, |s| s.is_idle()) == Some(true)).await;
        });
    }

    #[test]
    fn a_request_body_reads_through_its_body_type() {
        local(async {
            let mut r = start().await;
            let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = vec![
                Ok(http_body::Frame::data(Bytes::from(vec![b'a'; 70_000]))),
                Ok(http_body::Frame::data(Bytes::from_static(b"tail"))),
                Ok(http_body::Frame::trailers({
                    let mut t = HeaderMap::new();
                    t.insert("x-sum", "99".parse().unwrap());
                    t
                })),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
            let req = http::Request::builder()
                .method("POST")
                .uri("http://localhost/collect")
                .body(BodyExt::boxed(body))
                .unwrap();
            let response = r.send.send_request(req).await.unwrap();
            assert_eq!(response.headers()["x-sum"], "99");
            let got = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), 70_004);
            assert!(got.ends_with(b"tail"));
        });
    }

    #[test]
    fn large_bodies_pass_both_windows() {
        local(async {
            let mut r = start().await;
            let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
            let (status, _, got) = fetch(&mut r.send, request("POST", "/echo", big.clone())).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(got.len(), big.len());
            assert!(got == big, "the echo differs");
        });
    }

    #[test]
    fn a_request_the_client_drops_ends_its_stream_and_the_connection_serves_on() {
        local(async {
            let mut r = start().await;
            let response = r
                .send
                .send_request(request("GET", "/slow", Vec::new()))
                .await
                .unwrap();
            let mut body = response.into_body();
            let first = body.frame().await.unwrap().unwrap();
            assert_eq!(first.into_data().unwrap(), "tick");
            drop(body);
            // The stream is reset by the client: its work is dropped, not left to find out
            // at its next write.
            until(|| r.seen.borrow().iter().any(|s| s == "dropped /slow")).await;
            let seen = r.seen.borrow().clone();
            assert!(!seen.iter().any(|s| s.starts_with("/slow: ")), "{seen:?}");
            let (status, path, _) = fetch(&mut r.send, request("GET", "/after", Vec::new())).await;
            assert_eq!((status, path.as_str()), (StatusCode::OK, "/after"));
        });
    }

    #[test]
    fn stop_lets_the_streams_open_finish_then_ends_the_connection() {
        local(async {
            let r = start().await;
            let mut send = r.send.clone();
            let pending = tokio::spawn(async move {
                fetch(&mut send, request("GET", "/big?100000", Vec::new())).await
            });
            until(|| r.seen.borrow().iter().any(|s| s == "arrived /big?100000")).await;
            let key = r.key.borrow().expect("a stream arrived");
            assert!(with(key, |_| ()).is_some());
            r.stop.cancel();
            let (status, _, got) = pending.await.unwrap();
            assert_eq!((status, got.len()), (StatusCode::OK, 100_000));
            tokio::time::timeout(Duration::from_secs(5), r.served)
                .await
                .expect("the connection ended")
                .unwrap();
            assert!(with(key, |_| ()).is_none(), "the session left the table");
        });
    }
}
