//! What is recorded when a request ends: its route's metrics and, unless switched off, one
//! access log line with the route, method, path (never the query, which can carry secrets),
//! status, duration and response body bytes. Written when the response has been sent (or
//! abandoned), so the duration covers the whole exchange.

use http::{Method, StatusCode, Uri};
use tokio::time::Instant;
use tracing::info;

use crate::metrics::RouteMetrics;

/// One request's record, finished when its response ends.
#[derive(Debug)]
pub struct Access {
    route: &'static RouteMetrics,
    method: Method,
    /// The target, kept only when the access log is written. Boxed: the record rides in every
    /// response body and in each connection's future, where 88 bytes more would count.
    uri: Option<Box<Uri>>,
    started: Instant,
}

impl Access {
    /// A record for a request on `route`, started now; with the request's `uri`, the access log
    /// line is written (without it, only the metrics are kept).
    pub fn new(route: &'static RouteMetrics, method: Method, uri: Option<Uri>) -> Access {
        Access::started_at(route, method, uri, Instant::now())
    }

    /// A record as [`new`](Self::new), started at `now` (a reading the caller shares).
    pub fn started_at(
        route: &'static RouteMetrics,
        method: Method,
        uri: Option<Uri>,
        now: Instant,
    ) -> Access {
        Access {
            route,
            method,
            uri: uri.map(Box::new),
            started: now,
        }
    }

    /// Records the end: `bytes` of response body sent, `complete` unless the response was
    /// abandoned before its end (the client went away, or the upstream broke off).
    pub fn finish(&self, status: StatusCode, bytes: u64, complete: bool) {
        let elapsed = self.started.elapsed();
        self.route.record(&self.method, status, elapsed);
        if let Some(uri) = &self.uri {
            info!(
                target: "token_proxy::access",
                route = self.route.name(),
                method = %self.method,
                path = uri.path(),
                status = status.as_u16(),
                duration_ms = elapsed.as_micros() as f64 / 1e3,
                bytes,
                complete,
                "request"
            );
        }
    }
}
