//! Listeners: the accept loop, one span per connection, and graceful drain.
//!
//! Each accepted connection is served in a task owned by a [`TaskTracker`]: on a proxy route,
//! first by the front door (`proxy::front`), which judges each HTTP/1.1 head by the codec's
//! rules and, on a route with a plain-`http` upstream, answers bodiless requests itself; then
//! by hyper-util's auto builder (HTTP/1.1 and h2c on the same port, upgrades allowed), which
//! gets the bytes the front door had already read. When `cancel` fires the loop
//! stops accepting and every connection is told to finish its requests in flight and close;
//! the caller waits on the tracker, bounded by the grace period.
//!
//! With several workers, the binary runs one current-thread runtime per worker (see
//! [`Workers`]) and the accept loop hands connections to them in turn: a connection then
//! lives on one thread, with no work-stealing and no cross-thread wake-ups on the request
//! path (the benchmark showed a work-stealing pool of 2 slower than one thread).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::config::{ClientLimits, ListenAddr};
use crate::proxy::front::{self, Outcome, Rewind};
use crate::proxy::front_h2;
use crate::proxy::gate::Gate;
use crate::proxy::service::ProxyService;

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

/// Where a listener is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix domain socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundAddr::Tcp(a) => a.fmt(f),
            BoundAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listener: TCP, or a Unix domain socket whose file permissions decide who may
/// connect (its file is removed when the listener stops).
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket and its path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`; for a Unix socket, replaces a stale socket file and applies `mode`.
    pub async fn bind(addr: &ListenAddr, mode: Option<u32>) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(bind(*a).await?)),
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        // Replace a stale socket, never one another process still serves.
                        if std::os::unix::net::UnixStream::connect(path).is_ok() {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::AddrInUse,
                                "another process is serving this socket",
                            ));
                        }
                        std::fs::remove_file(path)?;
                    }
                }
                let listener = UnixListener::bind(path)?;
                if let Some(mode) = mode {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
                }
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// Where it is bound (for TCP port 0, the port the OS chose).
    pub fn bound_addr(&self) -> std::io::Result<BoundAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(BoundAddr::Tcp),
            Listener::Unix(_, path) => Ok(BoundAddr::Unix(path.clone())),
        }
    }

    async fn accept(&self) -> std::io::Result<(Conn, Option<SocketAddr>)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Conn::Tcp(stream), Some(peer)))
            }
            Listener::Unix(l, _) => Ok((Conn::Unix(l.accept().await?.0), None)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // A Unix socket's file goes with its listener (also when a reload is abandoned).
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

/// An accepted client connection.
#[derive(Debug)]
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An accepted connection as its task gets it: on the runtime that accepted it, or detached
/// for another (registered there when its task first runs).
enum Arriving {
    Here(Conn),
    Moved(StdConn),
}

/// An accepted connection detached from its runtime, on its way to another.
enum StdConn {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Conn {
    fn into_std(self) -> std::io::Result<StdConn> {
        Ok(match self {
            Conn::Tcp(s) => StdConn::Tcp(s.into_std()?),
            Conn::Unix(s) => StdConn::Unix(s.into_std()?),
        })
    }

    /// Registers `conn` with the runtime this is called on.
    fn from_std(conn: StdConn) -> std::io::Result<Conn> {
        Ok(match conn {
            StdConn::Tcp(s) => Conn::Tcp(TcpStream::from_std(s)?),
            StdConn::Unix(s) => Conn::Unix(UnixStream::from_std(s)?),
        })
    }
}

/// Whether this task runs on a current-thread runtime, so stays on its thread.
fn on_current_thread_runtime() -> bool {
    tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::CurrentThread
}

/// The runtimes that serve client connections besides the one that accepts them, each a
/// current-thread runtime on its own thread. Installed once by the binary before it serves;
/// without it (tests, one worker) connections are served where they are accepted.
#[derive(Debug)]
pub struct Workers {
    others: Vec<Handle>,
    next: AtomicUsize,
}

static WORKERS: OnceLock<Workers> = OnceLock::new();

impl Workers {
    /// Serves connections on `others` too, in turn with the accepting runtime.
    pub fn install(others: Vec<Handle>) {
        let _ = WORKERS.set(Workers {
            others,
            next: AtomicUsize::new(0),
        });
    }

    /// The runtime for the next connection: `None` for the accepting one.
    fn next() -> Option<&'static Handle> {
        let workers = WORKERS.get()?;
        let n = workers.next.fetch_add(1, Ordering::Relaxed) % (workers.others.len() + 1);
        workers.others.get(n.checked_sub(1)?)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Unix(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What serves one connection.
#[derive(Debug)]
pub struct Served<S> {
    /// hyper's service.
    pub service: S,
    /// Fired when the service is retired (a reload replaced it): the connection then finishes
    /// its requests and closes. Where there is a front door, this token must also fire when
    /// the listener's `cancel` does (a child of it): the front door watches only this one.
    pub retire: CancellationToken,
    /// The front door, for a proxy route: it reads HTTP/1.1 heads first, refuses those the
    /// codec refuses, and answers bodiless ones itself where the route has the lean path
    /// ([`ProxyService::has_lean_path`]); hyper serves the rest.
    pub front: Option<ProxyService>,
}

/// Accepts connections on `listener` and serves each as `make` says for the peer, until
/// `cancel` fires.
/// `permits` bounds the open connections: when none is left, the accept loop waits and new
/// connections stay in the kernel's accept queue.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S, B, F>(
    listener: impl Into<Listener>,
    make: F,
    limits: ClientLimits,
    permits: Arc<Semaphore>,
    cancel: CancellationToken,
    connections: TaskTracker,
    name: &'static str,
) where
    F: Fn(Option<SocketAddr>) -> Served<S> + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    // Shared: every connection's task would otherwise carry its own copy (hundreds of bytes,
    // idle connections included).
    let builder = Arc::new(builder);
    let listener: Listener = listener.into();
    let local = listener
        .bound_addr()
        .ok()
        .map(|a| a.to_string())
        .unwrap_or_default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Only an accepted connection takes a permit, so an idle listener holds none.
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let Served {
            service,
            retire,
            front,
        } = make(peer);
        let cancel = cancel.clone();
        let span = tracing::debug_span!("conn", listener = name, local = %local, peer = ?peer);
        let builder = builder.clone();
        let serve = move |arriving: Arriving| async move {
            let _permit = permit;
            let stream = match arriving {
                Arriving::Here(stream) => stream,
                Arriving::Moved(detached) => match Conn::from_std(detached) {
                    Ok(stream) => stream,
                    Err(e) => {
                        warn!(error = %e, "could not move a connection to its worker");
                        return;
                    }
                },
            };
            let stream = match &front {
                Some(front) => match front::serve(stream, front, &limits, &retire).await {
                    Outcome::Closed => return,
                    Outcome::Handoff(rewound) => rewound,
                    // Boxed for the same reason as hyper's below. Its sessions are kept per
                    // thread (see `h2::serve`), which needs a task that stays on its thread: a
                    // current-thread runtime, as every worker of the binary is. On another
                    // (a library user's), hyper serves HTTP/2 as before.
                    Outcome::Http2(stream, first) if on_current_thread_runtime() => {
                        return Box::pin(front_h2::serve(stream, first, front, &limits, &retire))
                            .await
                    }
                    Outcome::Http2(stream, first) => Rewind::new(stream, first),
                },
                None => Rewind::new(stream, Bytes::new()),
            };
            // Boxed: hyper's connection state is large, and a connection the front door
            // keeps (most of them, idle ones included) would otherwise carry room for it.
            Box::pin(async move {
                // Every HTTP/1.1 request hyper reads passes the codec first (see `gate.rs`).
                let refused = CancellationToken::new();
                let stream = Gate::new(stream, limits, front, refused.clone());
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    // A refused head: the response in flight finishes, then the refusal is
                    // written and the connection closes.
                    _ = refused.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                    _ = cancel.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                    _ = retire.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                }
            })
            .await
        };
        // The task's future is made here and first polled on its worker, where the moved
        // connection is registered: one future, so the captures are not held twice.
        match Workers::next() {
            None => {
                connections.spawn(serve(Arriving::Here(stream)).instrument(span));
            }
            Some(handle) => match stream.into_std() {
                Ok(detached) => {
                    connections.spawn_on(serve(Arriving::Moved(detached)).instrument(span), handle);
                }
                Err(e) => warn!(listener = name, error = %e, "could not detach a connection"),
            },
        }
    }
    drop(listener);
    debug!(listener = name, "stopped accepting");
}
