//! A per-thread pool of HTTP/1.1 connections to one upstream.
//!
//! Why not hyper-util's pool: it keeps idle connections in one `Mutex`'d map keyed by a
//! SipHashed scheme and authority, and spawns a task per request to hand a connection back;
//! callgrind put about an eighth of a proxied GET's instructions there. Here each worker
//! thread keeps its own stack of idle connections per route, so a checkout and a checkin are a
//! thread-local pop and push: no lock, no hashing, no task. A connection goes back when its
//! response body has been read to the end (HTTP/1.1 cannot start the next request before
//! that), into the pool of whichever thread read it.
//!
//! A pooled connection closes when it has been idle for `idle_timeout` (its own task checks),
//! when the upstream closes it, or when the pool is dropped (its route was removed or replaced
//! and every client connection using it is gone). A request that finds a pooled connection
//! closed under it before anything was sent is sent again on another one, as hyper hands
//! such a request back.
//!
//! A connection is only reused when nothing arrived on it after its response ended: the
//! body reader refuses one with bytes past the response's framed end, and every checkout
//! looks again (`RawConn::is_quiet`). Otherwise an upstream that wrote more than it framed
//! (a body after a `HEAD` head, a `408` on an idle connection) would have those bytes read as
//! the next client's answer, and each later client would get the answer of the one before.
//! (hyper's client connections watch for this themselves: their task reads while idle.)
//!
//! For an `https` upstream the pool keeps only lean connections (TLS over TCP, see
//! `stream.rs`), for bodiless requests; requests with bodies, and upgrades (WebSocket), keep
//! hyper-util's client. The front door's requests offer `h2` and `http/1.1` by ALPN: when the
//! upstream chooses `h2`, the thread's requests share HTTP/2 connections (`h2/conn.rs`), else
//! they take lean HTTP/1.1 connections. The requests hyper's server read offer `http/1.1`
//! only; an upstream that refuses it (one that speaks only HTTP/2) sends those through
//! hyper-util's client from then on.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::h2::conn::{self as h2conn, H2Body};
use super::h2::session::StreamError;
use super::raw::{ClientFraming, ClientHead, Done, RawBody, RawConn, RawError, Reuse};
use super::stream::UpstreamStream;
use super::upload::UpstreamBody;

/// Idle connections kept per thread and route; more are closed when they come back.
const MAX_IDLE_PER_THREAD: usize = 1024;

/// Marks a connection that is checked out (not idle).
const IN_USE: u64 = u64::MAX;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The TCP connection could not be made.
    #[error("{0}")]
    Connect(#[source] std::io::Error),
    /// The TCP connection was not made within the connect timeout.
    #[error("connecting timed out after {0:.1} s")]
    ConnectTimeout(f64),
    /// The connection failed during the exchange.
    #[error("{0}")]
    Http(#[source] hyper::Error),
    /// A kept-alive connection was closed by the upstream before it answered: the request
    /// may or may not have been seen, so only an idempotent one may be sent again.
    #[error("the upstream closed a kept-alive connection before answering: {0}")]
    Stale(#[source] hyper::Error),
    /// The lean exchange of a bodiless request failed.
    #[error("{0}")]
    Raw(#[source] RawError),
    /// The TLS handshake with the upstream failed (its certificate, most often).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    /// The upstream refused `http/1.1` by ALPN: nothing was sent, and the route's lean path is
    /// now off, so the request goes through hyper-util's client.
    #[error("the upstream refused HTTP/1.1 (ALPN)")]
    Http11Refused,
    /// An HTTP/2 stream gave no response, or an invalid one.
    #[error("{0}")]
    H2(#[source] StreamError),
}

/// A lean exchange's response body: HTTP/1.1 on its own connection, or an HTTP/2 stream.
#[derive(Debug)]
pub enum LeanBody {
    Http1(RawBody),
    H2(H2Body),
}

/// The route's TLS client settings for lean connections, by what they offer by ALPN.
#[derive(Debug)]
pub struct LeanTls {
    /// `http/1.1` only: for the requests hyper's server read.
    pub http11: Arc<rustls::ClientConfig>,
    /// `h2`, then `http/1.1`: for the front door's requests.
    pub h2: Arc<rustls::ClientConfig>,
}

/// What the upstream chose by ALPN when offered `h2` (`Shared::chose`).
const CHOSE_UNKNOWN: u8 = 0;
const CHOSE_H2: u8 = 1;
const CHOSE_HTTP11: u8 = 2;

/// TLS for an `https` pool: the client settings (swapped when the route's TLS files change)
/// and the name the upstream's certificate must hold.
#[derive(Debug)]
pub struct PoolTls {
    /// The route's TLS client settings; swapped by the watcher of the route's TLS files, for
    /// new connections.
    pub config: Arc<ArcSwap<LeanTls>>,
    /// The upstream's host, as its certificate names it.
    pub server_name: ServerName<'static>,
}

/// The pool of one route. Dropping it closes its idle connections on every thread.
#[derive(Debug)]
pub struct Http1Pool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Tells this pool's thread-local stacks apart.
    id: u64,
    target: Target,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Origin of the idle clocks kept in [`ConnState`].
    epoch: Instant,
    /// Fired when the pool is dropped: idle connections close.
    closed: CancellationToken,
    /// Set just before `closed` fires. Every returned connection checks it: a load of a line
    /// nobody writes, where `closed.is_cancelled()` would lock a mutex that all the workers
    /// share and pull its cache line from core to core on every request.
    dropped: AtomicBool,
    /// For an `https` upstream.
    tls: Option<PoolTls>,
    /// The upstream refused `http/1.1` by ALPN: no more lean connections.
    http11_refused: AtomicBool,
    /// What the upstream last chose when offered `h2` (`CHOSE_*`).
    chose: AtomicU8,
}

/// Where to connect: an address as configured, or a host name resolved at each connect.
#[derive(Debug)]
enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

/// One connection: the sender, and the idle clock its task reads.
struct Conn {
    sender: SendRequest<UpstreamBody>,
    state: Arc<ConnState>,
}

/// Milliseconds since the pool's epoch at which the connection became idle, or [`IN_USE`].
struct ConnState(AtomicU64);

/// A thread's idle connections of one pool.
struct Local {
    id: u64,
    closed: CancellationToken,
    idle: Vec<Conn>,
    /// Connections of the lean exchange for bodiless requests (see `raw.rs`).
    raw: Vec<RawConn>,
    /// Whether a sweeper closes this thread's idle raw connections.
    swept: bool,
    /// Where this thread's raw response bodies return their connections. Each thread has its
    /// own, so the clone each request takes bumps a reference count on this core's cache
    /// line only; a clone of the pool's one `Arc` would pull that line between the workers.
    done: Done,
}

/// Returns raw connections to the idle stack of the thread their body ends on.
struct Returner(Arc<Shared>);

impl Reuse for Returner {
    fn reuse(&self, conn: RawConn) {
        self.0.reuse_raw(conn);
    }
}

/// This thread's stack of the pool `id`, created if needed.
fn local<'a>(locals: &'a mut Vec<Local>, shared: &Arc<Shared>) -> &'a mut Local {
    match locals.iter().position(|l| l.id == shared.id) {
        Some(i) => &mut locals[i],
        None => {
            // A new pool on this thread: also forget the stacks of dropped pools.
            locals.retain(|l| !l.closed.is_cancelled());
            locals.push(Local {
                id: shared.id,
                closed: shared.closed.clone(),
                idle: Vec::new(),
                raw: Vec::new(),
                swept: false,
                done: Arc::new(Returner(shared.clone())),
            });
            locals.last_mut().expect("just pushed")
        }
    }
}

impl Shared {
    fn reuse_raw(self: &Arc<Self>, mut conn: RawConn) {
        if self.is_dropped() {
            return;
        }
        conn.idle_since = Instant::now();
        let sweep = IDLE.with_borrow_mut(|locals| {
            let local = local(locals, self);
            if local.raw.len() < MAX_IDLE_PER_THREAD {
                local.raw.push(conn);
            }
            !std::mem::replace(&mut local.swept, true)
        });
        if sweep {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(sweep_raw(self.id, self.closed.clone(), self.idle_timeout));
            }
        }
    }
}

/// Closes this thread's raw connections of the pool `id` once idle for `idle_timeout`, or
/// once the upstream closed them or sent on them unasked ([`RawConn::is_quiet`]), and all of
/// them when the pool is dropped. Idle raw connections are polled by nobody, so such a
/// connection lingers until the next sweep; a checkout makes the same check first, so it is
/// never used.
async fn sweep_raw(id: u64, closed: CancellationToken, idle_timeout: Duration) {
    let every = (idle_timeout / 4).max(Duration::from_millis(250));
    loop {
        let stopping = tokio::select! {
            _ = closed.cancelled() => true,
            _ = tokio::time::sleep(every) => false,
        };
        let now = Instant::now();
        IDLE.with_borrow_mut(|locals| {
            if stopping {
                // The pool is gone: its stack here goes, and with it the pool's last handle.
                locals.retain(|l| l.id != id);
            } else if let Some(local) = locals.iter_mut().find(|l| l.id == id) {
                local.raw.retain_mut(|c| {
                    now.saturating_duration_since(c.idle_since) < idle_timeout && c.is_quiet()
                });
            }
        });
        if stopping {
            return;
        }
    }
}

thread_local! {
    static IDLE: RefCell<Vec<Local>> = const { RefCell::new(Vec::new()) };
}

/// A connection lent to a response body, returned when that body has been read to its end.
pub struct Checkin {
    conn: Conn,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Checkin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checkin")
    }
}

impl Checkin {
    /// Puts the connection back into this thread's idle stack.
    pub fn finish(self) {
        let Checkin { conn, shared } = self;
        if shared.is_dropped() || conn.sender.is_closed() {
            return;
        }
        conn.state
            .0
            .store(shared.millis(Instant::now()), Ordering::Relaxed);
        IDLE.with_borrow_mut(|locals| {
            let local = local(locals, &shared);
            if local.idle.len() < MAX_IDLE_PER_THREAD {
                local.idle.push(conn);
            }
        });
    }
}

impl Shared {
    fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

impl Drop for Http1Pool {
    fn drop(&mut self) {
        self.shared.dropped.store(true, Ordering::Release);
        self.shared.closed.cancel();
    }
}

impl Http1Pool {
    /// A pool for `host:port` (an IP address is used as is; a name is resolved per connect).
    pub fn new(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Http1Pool {
        Http1Pool::build(host, port, connect_timeout, idle_timeout, None)
    }

    /// A pool of lean TLS connections to the `https` upstream `host:port`.
    pub fn with_tls(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        idle_timeout: Duration,
        tls: PoolTls,
    ) -> Http1Pool {
        Http1Pool::build(host, port, connect_timeout, idle_timeout, Some(tls))
    }

    fn build(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        idle_timeout: Duration,
        tls: Option<PoolTls>,
    ) -> Http1Pool {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let target = match bare.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
            Err(_) => Target::Name(host.to_owned(), port),
        };
        Http1Pool {
            shared: Arc::new(Shared {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                target,
                connect_timeout,
                idle_timeout,
                epoch: Instant::now(),
                closed: CancellationToken::new(),
                dropped: AtomicBool::new(false),
                tls,
                http11_refused: AtomicBool::new(false),
                chose: AtomicU8::new(CHOSE_UNKNOWN),
            }),
        }
    }

    /// Whether this pool's connections are TLS (then only bodiless requests use it).
    pub fn is_tls(&self) -> bool {
        self.shared.tls.is_some()
    }

    /// Whether bodiless requests may take the lean HTTP/1.1 exchange: not after the upstream
    /// refused `http/1.1` by ALPN.
    pub fn takes_bodiless(&self) -> bool {
        !self.shared.http11_refused.load(Ordering::Relaxed)
    }

    /// Whether the front door's bodiless requests may take the lean path: over HTTP/1.1, or
    /// over HTTP/2 where the upstream chose it.
    pub fn serves_front(&self) -> bool {
        self.takes_bodiless() || self.shared.chose.load(Ordering::Relaxed) == CHOSE_H2
    }

    /// Sends `req` (origin-form target, `Host` set) on an idle connection of this thread, or
    /// on a new one (always, if `fresh`). On success the response comes with the connection
    /// to return once its body has been read (`None` when it went back already).
    pub async fn send(
        &self,
        mut req: Request<UpstreamBody>,
        fresh: bool,
    ) -> Result<(Response<Incoming>, Option<Checkin>), SendError> {
        loop {
            let idle = if fresh { None } else { self.checkout() };
            let (mut conn, pooled) = match idle {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match conn.sender.try_send_request(req).await {
                Ok(response) => {
                    let checkin = Checkin {
                        conn,
                        shared: self.shared.clone(),
                    };
                    if response.body().is_end_stream() {
                        checkin.finish();
                        return Ok((response, None));
                    }
                    return Ok((response, Some(checkin)));
                }
                Err(mut e) => match e.take_message() {
                    // Nothing was sent: the pooled connection had been closed under us.
                    Some(back) if pooled => {
                        debug!(error = %e.error(), "pooled upstream connection was closed: sending on another");
                        req = back;
                    }
                    _ => {
                        let e = e.into_error();
                        if pooled && e.is_incomplete_message() {
                            return Err(SendError::Stale(e));
                        }
                        return Err(SendError::Http(e));
                    }
                },
            }
        }
    }

    /// Sends the bodiless request `parts` (target and headers ready) with the lean exchange
    /// on an idle raw connection of this thread, or on a new one. A reused connection that
    /// the upstream had closed is replaced and the request sent again: only bodiless
    /// idempotent requests come here. The body returns the connection when read to its end.
    pub async fn send_bodiless(
        &self,
        parts: &http::request::Parts,
    ) -> Result<Response<RawBody>, SendError> {
        loop {
            let (conn, pooled, done) = self.raw_conn().await?;
            match conn.exchange(parts, done).await {
                Err(RawError::Stale) if pooled => stale(),
                answer => return answer.map_err(SendError::Raw),
            }
        }
    }

    /// [`send_bodiless`](Self::send_bodiless) for a request head already written for the
    /// upstream (`head`, for `method`), the response head written for the front door's client
    /// (see [`RawConn::exchange_for_client`]). To an `https` upstream that chooses `h2`, the
    /// request goes on one of the thread's HTTP/2 connections; one that was not processed
    /// there (`GOAWAY`, `REFUSED_STREAM`) is sent again, as a stale HTTP/1.1 one is.
    pub async fn send_for_client(
        &self,
        head: &[u8],
        method: &http::Method,
        client: &mut ClientHead<'_>,
    ) -> Result<(http::StatusCode, LeanBody, ClientFraming), SendError> {
        let shared = &self.shared;
        if shared.tls.is_some() && shared.chose.load(Ordering::Relaxed) != CHOSE_HTTP11 {
            let (mut refused, mut made) = (0, 0);
            loop {
                if let Some(key) = h2conn::pick(shared.id) {
                    match h2conn::send_for_client(key, head, method, client).await {
                        Err(StreamError::Refused(why)) if refused < 2 => {
                            debug!(error = %why, "HTTP/2 stream not processed: sending on another");
                            refused += 1;
                            continue;
                        }
                        answer => {
                            return answer
                                .map(|(s, b, f)| (s, LeanBody::H2(b), f))
                                .map_err(SendError::H2)
                        }
                    }
                }
                if h2conn::wait_for_connect(shared.id).await {
                    continue;
                }
                // A new connection that has no room either (the upstream allows no stream
                // now): not one more.
                if made == 2 {
                    return Err(SendError::H2(StreamError::Refused(
                        "the upstream's HTTP/2 connections allow no new stream".into(),
                    )));
                }
                made += 1;
                let connecting = h2conn::connecting(shared.id);
                // Boxed: see `raw_conn`.
                let stream = Box::pin(self.connect_lean(true)).await?;
                if h2conn::chose_h2(&stream) {
                    shared.chose.store(CHOSE_H2, Ordering::Relaxed);
                    h2conn::start(
                        shared.id,
                        stream,
                        shared.idle_timeout,
                        shared.closed.clone(),
                    );
                    drop(connecting);
                    continue;
                }
                drop(connecting);
                // The upstream chose `http/1.1`: this connection serves the request, and the
                // route's front door takes HTTP/1.1 connections from now on.
                shared.chose.store(CHOSE_HTTP11, Ordering::Relaxed);
                let done = IDLE.with_borrow_mut(|locals| local(locals, shared).done.clone());
                return http1_answer(
                    RawConn::new(stream)
                        .exchange_for_client(head, method, client, done)
                        .await,
                );
            }
        }
        loop {
            let (conn, pooled, done) = self.raw_conn().await?;
            match conn.exchange_for_client(head, method, client, done).await {
                Err(RawError::Stale) if pooled => stale(),
                answer => return http1_answer(answer),
            }
        }
    }

    /// An idle raw connection of this thread, or a new one; whether it was idle; and where
    /// its body returns it.
    async fn raw_conn(&self) -> Result<(RawConn, bool, Done), SendError> {
        Ok(match self.checkout_raw() {
            (Some(conn), done) => (conn, true, done),
            // Boxed: a TLS handshake's state is large, and a connection is made rarely, while
            // every client connection's task would otherwise be sized for it.
            (None, done) => (
                RawConn::new(Box::pin(self.connect_lean(false)).await?),
                false,
                done,
            ),
        })
    }

    /// An idle raw connection of this thread, not idle for too long, if there is one; and
    /// this thread's return handle.
    fn checkout_raw(&self) -> (Option<RawConn>, Done) {
        let now = Instant::now();
        IDLE.with_borrow_mut(|locals| {
            let local = local(locals, &self.shared);
            let mut found = None;
            while let Some(mut conn) = local.raw.pop() {
                if now.saturating_duration_since(conn.idle_since) < self.shared.idle_timeout
                    && conn.is_quiet()
                {
                    found = Some(conn);
                    break;
                }
            }
            (found, local.done.clone())
        })
    }

    /// An idle connection of this thread that is still open.
    fn checkout(&self) -> Option<Conn> {
        let id = self.shared.id;
        IDLE.with_borrow_mut(|locals| {
            let local = locals.iter_mut().find(|l| l.id == id)?;
            while let Some(conn) = local.idle.pop() {
                if conn.sender.is_ready() {
                    conn.state.0.store(IN_USE, Ordering::Relaxed);
                    return Some(conn);
                }
            }
            None
        })
    }

    /// A new TCP connection to the upstream (or its forward proxy), `TCP_NODELAY` set.
    async fn connect_stream(&self) -> Result<TcpStream, SendError> {
        let shared = &self.shared;
        let connecting = async {
            match &shared.target {
                Target::Addr(addr) => TcpStream::connect(addr).await,
                Target::Name(host, port) => TcpStream::connect((host.as_str(), *port)).await,
            }
        };
        let stream = tokio::time::timeout(shared.connect_timeout, connecting)
            .await
            .map_err(|_| SendError::ConnectTimeout(shared.connect_timeout.as_secs_f64()))?
            .map_err(SendError::Connect)?;
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        Ok(stream)
    }

    /// A new connection for the lean exchange: TCP, then TLS for an `https` upstream (ALPN
    /// `h2` and `http/1.1` if `offer_h2`, else `http/1.1`), both within the connect timeout.
    async fn connect_lean(&self, offer_h2: bool) -> Result<UpstreamStream, SendError> {
        let shared = &self.shared;
        let Some(tls) = &shared.tls else {
            return Ok(self.connect_stream().await?.into());
        };
        let handshake = async {
            let tcp = self.connect_stream().await?;
            let configs = tls.config.load();
            let config = if offer_h2 {
                &configs.h2
            } else {
                &configs.http11
            };
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            connector
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(|e| {
                    if refused_http11(&e) {
                        shared.http11_refused.store(true, Ordering::Relaxed);
                        debug!("the upstream refused http/1.1 by ALPN: its bodiless requests go through hyper's client");
                        SendError::Http11Refused
                    } else {
                        SendError::Tls(e)
                    }
                })
        };
        let stream = tokio::time::timeout(shared.connect_timeout, handshake)
            .await
            .map_err(|_| SendError::ConnectTimeout(shared.connect_timeout.as_secs_f64()))??;
        Ok(stream.into())
    }

    /// A new connection, driven by its own task until it closes.
    async fn connect(&self) -> Result<Conn, SendError> {
        let shared = &self.shared;
        let stream = self.connect_stream().await?;
        let (sender, connection) = http1::Builder::new()
            .max_headers(super::raw::MAX_HEADERS)
            .max_header_size(super::raw::MAX_HEAD)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        let state = Arc::new(ConnState(AtomicU64::new(IN_USE)));
        tokio::spawn(drive(connection, state.clone(), shared.clone()));
        Ok(Conn { sender, state })
    }
}

/// Whether a failed handshake says the upstream would not speak `http/1.1`: its
/// `no_application_protocol` alert, or an ALPN answer we did not offer.
fn refused_http11(e: &std::io::Error) -> bool {
    use rustls::{AlertDescription, Error, PeerMisbehaved};
    matches!(
        e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()),
        Some(Error::AlertReceived(
            AlertDescription::NoApplicationProtocol
        )) | Some(Error::PeerMisbehaved(
            PeerMisbehaved::SelectedUnofferedApplicationProtocol
        ))
    )
}

/// Runs one connection until it fails, the upstream closes it, it has been idle for the
/// pool's idle timeout, or the pool is dropped.
async fn drive(
    connection: http1::Connection<TokioIo<TcpStream>, UpstreamBody>,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
) {
    tokio::pin!(connection);
    let timeout = shared.idle_timeout;
    let mut wait = timeout;
    loop {
        tokio::select! {
            biased;
            r = &mut connection => {
                if let Err(e) = r {
                    debug!(error = %e, "upstream connection ended");
                }
                return;
            }
            _ = shared.closed.cancelled() => return,
            _ = tokio::time::sleep(wait) => {
                let since = state.0.load(Ordering::Relaxed);
                let idle = Duration::from_millis(shared.millis(Instant::now()).saturating_sub(since));
                wait = if since == IN_USE {
                    timeout
                } else if idle >= timeout {
                    debug!("closing an idle upstream connection");
                    return;
                } else {
                    timeout - idle
                };
            }
        }
    }
}

/// A pooled raw connection failed before any answer: it had been closed under us.
/// A lean HTTP/1.1 exchange's answer, as [`Http1Pool::send_for_client`] gives it.
fn http1_answer(
    answer: Result<(http::StatusCode, RawBody, ClientFraming), RawError>,
) -> Result<(http::StatusCode, LeanBody, ClientFraming), SendError> {
    answer
        .map(|(s, b, f)| (s, LeanBody::Http1(b), f))
        .map_err(SendError::Raw)
}

fn stale() {
    debug!("pooled upstream connection was closed: sending on another");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::body::ResponseBody;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An upstream that answers one request, then reports how long the connection stayed
    /// open after that and whether it ended by the proxy closing it.
    async fn one_answer() -> (u16, tokio::task::JoinHandle<(usize, Duration)>) {
        answer_once(None).await
    }

    /// As [`one_answer`]; with `body_after`, the head goes at once and the body only when
    /// that signal comes.
    async fn answer_once(
        body_after: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> (u16, tokio::task::JoinHandle<(usize, Duration)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
            match body_after {
                None => s.write_all(&[&head[..], b"ok"].concat()).await.unwrap(),
                Some(signal) => {
                    s.write_all(head).await.unwrap();
                    signal.await.unwrap();
                    s.write_all(b"ok").await.unwrap();
                }
            }
            let answered = Instant::now();
            let n = s.read(&mut buf).await.unwrap();
            (n, answered.elapsed())
        });
        (port, task)
    }

    async fn get_once(pool: &Http1Pool) {
        let req = Request::get("/")
            .header("host", "upstream")
            .body(UpstreamBody::buffered(bytes::Bytes::new()))
            .unwrap();
        let (response, checkin) = pool.send(req, false).await.unwrap();
        assert!(
            checkin.is_some(),
            "a body is pending: the connection is lent to it"
        );
        let body = ResponseBody::new(response.into_body(), checkin);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
        assert_eq!(
            IDLE.with_borrow(|l| l.iter().map(|l| l.idle.len()).sum::<usize>()),
            1,
            "the read body put its connection back"
        );
    }

    /// A GET without a body, as the front door sends it.
    fn bodiless_get() -> http::request::Parts {
        let (parts, ()) = Request::get("/")
            .header("host", "upstream")
            .body(())
            .unwrap()
            .into_parts();
        parts
    }

    /// Raw connections idle on this thread, over every pool.
    fn idle_raw() -> usize {
        IDLE.with_borrow(|l| l.iter().map(|l| l.raw.len()).sum())
    }

    /// A pool for the loopback `port`: 5 s connect timeout, 90 s idle timeout.
    fn pool(port: u16) -> Http1Pool {
        Http1Pool::new(
            "127.0.0.1",
            port,
            Duration::from_secs(5),
            Duration::from_secs(90),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_the_idle_timeout() {
        let (port, upstream) = one_answer().await;
        let pool = pool(port);
        get_once(&pool).await;
        let (n, idle) = upstream.await.unwrap();
        assert_eq!(n, 0, "the proxy closed the connection");
        assert!(
            idle >= Duration::from_secs(90) && idle < Duration::from_secs(91),
            "closed after {idle:?} idle"
        );
    }

    #[tokio::test]
    async fn dropping_the_pool_closes_its_idle_connections() {
        let (port, upstream) = one_answer().await;
        let pool = pool(port);
        get_once(&pool).await;
        drop(pool);
        let (n, idle) = tokio::time::timeout(Duration::from_secs(5), upstream)
            .await
            .expect("closed at once")
            .unwrap();
        assert_eq!(n, 0);
        assert!(idle < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_raw_connection_returns_to_this_threads_stack_and_closes_with_the_pool() {
        let (port, upstream) = one_answer().await;
        let pool = pool(port);
        let response = pool.send_bodiless(&bodiless_get()).await.unwrap();
        let body = ResponseBody::raw(response.into_body());
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
        assert_eq!(idle_raw(), 1, "the read body put its connection back");
        let shared = Arc::downgrade(&pool.shared);
        drop(pool);
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), upstream)
            .await
            .expect("closed at once")
            .unwrap();
        assert_eq!(n, 0, "the proxy closed the connection");
        assert_eq!(
            shared.strong_count(),
            0,
            "the thread's stack went with its handle to the pool"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_raw_connection_that_gets_stray_bytes_is_closed_by_the_sweeper() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (go, stray) = tokio::sync::oneshot::channel::<()>();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            stray.await.unwrap();
            s.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
                .await
                .unwrap();
            let written = Instant::now();
            // Closed with the stray bytes unread: a reset, or an end of stream.
            let closed = matches!(s.read(&mut buf).await, Ok(0) | Err(_));
            (closed, written.elapsed())
        });
        let pool = pool(port);
        let response = pool.send_bodiless(&bodiless_get()).await.unwrap();
        let body = ResponseBody::raw(response.into_body());
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
        assert_eq!(idle_raw(), 1, "the read body put its connection back");
        go.send(()).unwrap();
        let (closed, after) = upstream.await.unwrap();
        assert!(closed, "the proxy closed the connection");
        // The sweep runs every quarter of the 90 s idle timeout.
        assert!(
            after < Duration::from_secs(23),
            "closed {after:?} after the stray bytes, not at the first sweep"
        );
        assert_eq!(idle_raw(), 0);
    }

    #[tokio::test]
    async fn a_body_that_ends_after_the_pool_is_dropped_closes_its_connection() {
        let (go, body_after) = tokio::sync::oneshot::channel();
        let (port, upstream) = answer_once(Some(body_after)).await;
        let pool = pool(port);
        let response = pool.send_bodiless(&bodiless_get()).await.unwrap();
        drop(pool);
        go.send(()).unwrap();
        let body = ResponseBody::raw(response.into_body());
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
        assert_eq!(idle_raw(), 0, "a dropped pool takes no connection back");
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), upstream)
            .await
            .expect("closed at once")
            .unwrap();
        assert_eq!(n, 0, "the proxy closed the connection");
    }
}
