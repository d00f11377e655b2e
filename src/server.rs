//! Listeners: the accept loop, one span per connection, and graceful drain.
//!
//! Each accepted connection is served by hyper-util's auto builder (HTTP/1.1 and h2c on the same
//! port, upgrades allowed) in a task owned by a [`TaskTracker`]. When `cancel` fires the loop
//! stops accepting and every connection is told to finish its requests in flight and close;
//! the caller waits on the tracker, bounded by the grace period.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::config::ClientLimits;

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await
}

/// Accepts connections on `listener` and serves each with the service `make` builds for the
/// peer, until `cancel` fires. `permits` bounds the open connections over all listeners: when
/// none is left, new connections wait in the kernel's accept queue.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S, B, F>(
    listener: TcpListener,
    make: F,
    limits: ClientLimits,
    permits: Arc<Semaphore>,
    cancel: CancellationToken,
    connections: TaskTracker,
    name: &'static str,
) where
    F: Fn(SocketAddr) -> S + Send + 'static,
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
    let local = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), make(peer))
            .into_owned();
        let cancel = cancel.clone();
        let span = tracing::debug_span!("conn", listener = name, local = ?local, peer = %peer);
        connections.spawn(
            async move {
                let _permit = permit;
                tokio::pin!(conn);
                let result = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = cancel.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    debug!(listener = name, "stopped accepting");
}
