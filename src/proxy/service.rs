//! The proxy service of one route: request -> upstream request -> response.
//!
//! The service is built apart from any socket (tests drive it directly). Per request it does:
//! refuse what is not origin-form; load the token (lock-free, no I/O) or, only when none is
//! valid, wait a bounded time for one; rebuild the target under the upstream's base path; fix
//! the headers; forward with pooled connections; and stream the response back. Bodies are never
//! buffered. Its own errors become JSON responses here and are logged once, here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Parts, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::headers;
use super::{ProxyBody, ProxyError};
use crate::config::{RouteConfig, Upstream};
use crate::tls;
use crate::token::slot::TokenSlot;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type UpstreamClient = Client<HttpsConnector<HttpConnector>, Incoming>;

struct Inner {
    upstream: Upstream,
    response_timeout: Duration,
    token_wait: Duration,
    slot: Arc<TokenSlot>,
    client: UpstreamClient,
    upgrade_client: UpstreamClient,
    tunnels: TaskTracker,
    cancel: CancellationToken,
}

/// Forwards requests of one route to its upstream with its credential's token.
#[derive(Clone)]
pub struct ProxyService(Arc<Inner>);

impl std::fmt::Debug for ProxyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyService")
            .field("upstream", &self.0.upstream.url.as_str())
            .field("credential", &self.0.slot.name())
            .finish()
    }
}

/// A pooled upstream client; `http2` lets ALPN pick HTTP/2 on `https` upstreams.
fn upstream_client(route: &RouteConfig, tls: rustls::ClientConfig, http2: bool) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(route.connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let connector = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .set_host(false)
        .build(connector)
}

impl ProxyService {
    /// Builds the service; `tunnels` owns upgraded connections, which end when `cancel` fires.
    pub fn new(
        route: &RouteConfig,
        slot: Arc<TokenSlot>,
        tunnels: TaskTracker,
        cancel: CancellationToken,
    ) -> Result<ProxyService, tls::TlsError> {
        let tls = tls::client_config(route.ca_file.as_deref())?;
        let client = upstream_client(route, tls.clone(), true);
        // HTTP/1.1 `Upgrade` cannot ride an HTTP/2 connection: upgrades get their own pool.
        let upgrade_client = upstream_client(route, tls, false);
        Ok(ProxyService(Arc::new(Inner {
            upstream: route.upstream.clone(),
            response_timeout: route.response_timeout,
            token_wait: route.token_wait,
            slot,
            client,
            upgrade_client,
            tunnels,
            cancel,
        })))
    }

    /// Handles one request; never fails (errors become JSON responses).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        // Cheap clones (reference counts), kept for the log line.
        let method = req.method().clone();
        let uri = req.uri().clone();
        let started = Instant::now();
        match self.forward(req).await {
            Ok(response) => {
                debug!(%method, path = uri.path(), status = response.status().as_u16(), elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "proxied");
                response
            }
            Err(e) => {
                warn!(%method, path = uri.path(), error = e.code(), message = %e, "request failed");
                e.to_response()
            }
        }
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = &*self.0;
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: token-proxy is a reverse proxy for one upstream, not a forward proxy".into(),
            ));
        }
        if req.version() < Version::HTTP_2
            && (req.uri().scheme().is_some() || req.uri().authority().is_some())
        {
            return Err(ProxyError::BadRequest(
                "absolute-form request targets are refused: send origin-form (`GET /path`), token-proxy chooses the upstream".into(),
            ));
        }

        let authorization = match inner.slot.header_at(Instant::now()) {
            Some(h) => h,
            None => inner
                .slot
                .wait_for_header(inner.token_wait)
                .await
                .map_err(|e| ProxyError::TokenUnavailable(e.to_string()))?,
        };

        let upgrade =
            req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let streamed = req.body().size_hint().exact().is_none();

        let (mut parts, body) = req.into_parts();
        parts.uri = upstream_uri(&inner.upstream, parts.uri.path_and_query())?;
        parts.version = Version::HTTP_11;
        headers::prepare_request(
            &mut parts.headers,
            authorization,
            &inner.upstream.host_header,
            upgrade,
            streamed,
        );
        let upstream_req = Request::from_parts(parts, body);

        let client = if upgrade {
            &inner.upgrade_client
        } else {
            &inner.client
        };
        let mut response = match tokio::time::timeout(
            inner.response_timeout,
            client.request(upstream_req),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(upstream_error(&inner.upstream, &e)),
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout(format!(
                    "upstream {} sent no response within {:.1} s",
                    inner.upstream.url,
                    inner.response_timeout.as_secs_f64()
                )))
            }
        };

        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::UpstreamUnavailable(
                    "upstream answered 101 Switching Protocols to a request that asked for no upgrade".into(),
                ));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let cancel = inner.cancel.clone();
            inner.tunnels.spawn(
                async move {
                    let (client_io, upstream_io) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok(pair) => pair,
                        Err(e) => return debug!(error = %e, "upgrade did not complete"),
                    };
                    let mut client_io = TokioIo::new(client_io);
                    let mut upstream_io = TokioIo::new(upstream_io);
                    tokio::select! {
                        r = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io) => match r {
                            Ok((up, down)) => debug!(bytes_up = up, bytes_down = down, "tunnel closed"),
                            Err(e) => debug!(error = %e, "tunnel ended with an error"),
                        },
                        _ = cancel.cancelled() => debug!("tunnel closed by shutdown"),
                    }
                }
                .in_current_span(),
            );
        }
        let streamed = response.body().size_hint().exact().is_none();
        headers::prepare_response(response.headers_mut(), switching, streamed);
        Ok(response.map(Either::Left))
    }
}

/// The upstream URI: the route's scheme and authority, its base path, then the client's path
/// and query byte for byte. The client's own authority is never used.
fn upstream_uri(upstream: &Upstream, target: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
    let target_str = target.map_or("/", PathAndQuery::as_str);
    if !target_str.starts_with('/') {
        return Err(ProxyError::BadRequest(format!(
            "request target {target_str:?} is not an absolute path"
        )));
    }
    let path_and_query = if upstream.base_path.is_empty() {
        target
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        let mut joined = String::with_capacity(upstream.base_path.len() + target_str.len());
        joined.push_str(&upstream.base_path);
        joined.push_str(target_str);
        PathAndQuery::try_from(joined)
            .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))?
    };
    let mut parts = Parts::default();
    parts.scheme = Some(upstream.scheme.clone());
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts)
        .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))
}

fn upstream_error(upstream: &Upstream, e: &hyper_util::client::legacy::Error) -> ProxyError {
    use std::error::Error as _;
    let mut cause = String::new();
    let mut timed_out = false;
    let mut current = e.source();
    while let Some(c) = current {
        if !cause.is_empty() {
            cause.push_str(": ");
        }
        cause.push_str(&c.to_string());
        timed_out |= c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        current = c.source();
    }
    if timed_out {
        return ProxyError::UpstreamTimeout(format!(
            "connecting to upstream {} timed out: {cause}",
            upstream.url
        ));
    }
    let what = if e.is_connect() {
        "could not connect to"
    } else {
        "lost the connection to"
    };
    ProxyError::UpstreamUnavailable(format!("{what} upstream {}: {cause}", upstream.url))
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) }.in_current_span())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let cfg = crate::config::Config::parse(
            &format!(
                "[credentials.c]\ntoken_url=\"https://t/\"\nclient_id=\"i\"\nclient_secret=\"s\"\n[[routes]]\nlisten=\"127.0.0.1:1\"\nupstream=\"{url}\"\ncredential=\"c\"\n"
            ),
            "t.toml",
            &|_| None,
        )
        .unwrap();
        cfg.routes[0].upstream.clone()
    }

    #[test]
    fn target_is_joined_under_the_base_path_byte_for_byte() {
        let up = upstream("https://api.example.cn/base/");
        let pq = PathAndQuery::from_static("/v1/items%2Fx?a=1&b=%20c&a=2");
        let uri = upstream_uri(&up, Some(&pq)).unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.cn/base/v1/items%2Fx?a=1&b=%20c&a=2"
        );
        let plain = upstream("http://127.0.0.1:9000");
        assert_eq!(
            upstream_uri(&plain, Some(&pq)).unwrap().to_string(),
            "http://127.0.0.1:9000/v1/items%2Fx?a=1&b=%20c&a=2"
        );
        assert_eq!(upstream_uri(&plain, None).unwrap().path(), "/");
        assert!(upstream_uri(&plain, Some(&PathAndQuery::from_static("*"))).is_err());
    }
}
