//! The proxy service of one route: request -> upstream request -> response.
//!
//! The service is built apart from any socket (tests drive it directly). Per request it does:
//! refuse what is not origin-form; load the token (lock-free, no I/O) or, only when none is
//! valid, wait a bounded time for one; rebuild the target under the upstream's base path; fix
//! the headers; forward with pooled connections; and stream the response back. Bodies are never
//! buffered. Its own errors become JSON responses here and are logged once, here.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::uri::{Parts, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::access::Access;
use super::body::ResponseBody;
use super::codec::Field;
use super::deadline::Deadline;
use super::headers;
use super::mount;
use super::pool::{self, Checkin, Http1Pool};
use super::raw::{ClientFraming, ClientHead};
use super::upload::{BodyTooLarge, ClientBody, UpstreamBody};
use super::{ProxyBody, ProxyError};
use crate::config::{Cidr, RouteConfig, TokenStamp, Upstream};
use crate::egress;
use crate::metrics::RouteMetrics;
use crate::secret::Secret;
use crate::tls;
use crate::token::slot::TokenSlot;
use arc_swap::ArcSwap;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type UpstreamClient = Client<HttpsConnector<egress::Connector>, UpstreamBody>;

/// hyper-util's clients, built from the route's TLS files and swapped when those change.
struct Clients {
    /// `https` requests: TLS with ALPN (HTTP/2 when the upstream offers it).
    main: UpstreamClient,
    /// HTTP/1.1 `Upgrade` (WebSocket) requests, which cannot ride an HTTP/2 connection.
    upgrade: UpstreamClient,
    /// The same TLS settings for the pool's lean connections.
    lean: Arc<pool::LeanTls>,
}

impl Clients {
    fn build(route: &RouteConfig) -> Result<Clients, tls::TlsError> {
        let tls = tls::client_config(route.ca_file.as_deref(), route.client_identity.as_ref())?;
        let mut http11 = tls.clone();
        http11.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = tls.clone();
        h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Clients {
            main: upstream_client(route, tls.clone(), true),
            upgrade: upstream_client(route, tls, false),
            lean: Arc::new(pool::LeanTls {
                http11: Arc::new(http11),
                h2: Arc::new(h2),
            }),
        })
    }
}

struct Inner {
    /// The paths this route takes on its listener (`""`: every path).
    prefix: Box<str>,
    /// The prefix is cut before the path goes under the base path.
    strip: bool,
    /// Where and how the token is sent (`Authorization: Bearer <token>` by default).
    stamp: TokenStamp,
    /// The fields set on every request (`set_headers`, then `set_header_files`), values marked
    /// sensitive; swapped when a file changes. `None` when the route sets none, so the request
    /// path does not look.
    set_headers: Option<Arc<ArcSwap<SetHeaders>>>,
    metrics: &'static RouteMetrics,
    access_log: bool,
    upstream: Upstream,
    response_timeout: Duration,
    token_wait: Duration,
    max_body_bytes: Option<u64>,
    retry_on_401: bool,
    replay_max_body_bytes: u64,
    inbound_token: Option<Arc<ArcSwap<Secret>>>,
    allowed_clients: Vec<Cidr>,
    /// The upgrade protocols tunnelled (`upgrades`).
    upgrades: Vec<String>,
    /// Redirects to the upstream's own origin go back as the client's address.
    rewrite_location: bool,
    /// Forwarded requests carry our `Via`.
    via: bool,
    slot: Arc<TokenSlot>,
    /// The per-thread HTTP/1.1 pool, the fast path: every request to a plain `http`
    /// upstream; the bodiless ones to an `https` upstream (not through a forward proxy).
    pool: Option<Http1Pool>,
    /// The forward proxy to the upstream: a plain-http upstream's requests go to it in
    /// absolute form with its credentials; errors name it.
    proxy: Option<egress::ForwardProxy>,
    clients: Arc<ArcSwap<Clients>>,
    tunnels: TaskTracker,
    cancel: CancellationToken,
    /// Fired when a reload replaces this service: its connections finish and close.
    retired: CancellationToken,
}

/// A request head the front door read, as the service sees it: bytes of the read buffer.
#[derive(Debug)]
pub struct FrontRequest<'a> {
    /// `GET`, `HEAD`, `DELETE` or `OPTIONS`.
    pub method: &'a Method,
    /// The origin-form target, as sent.
    pub target: &'a [u8],
    /// What of it goes under the upstream's base path: the target, normalised and with the
    /// route's prefix cut where that applies (set once the route is picked). Kept here, not
    /// passed along: every future of the request path would hold room for it.
    pub rest: &'a [u8],
    head: &'a [u8],
    fields: &'a [Field],
    /// The client's `TE` accepts trailers.
    pub te: bool,
}

impl<'a> FrontRequest<'a> {
    /// The head `head` (method, target and fields parsed from it), as the front door read it.
    pub fn new(
        method: &'a Method,
        target: &'a [u8],
        head: &'a [u8],
        fields: &'a [Field],
        te: bool,
    ) -> FrontRequest<'a> {
        FrontRequest {
            method,
            target,
            rest: target,
            head,
            fields,
            te,
        }
    }

    /// The header fields: name and value, as sent.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|f| {
            (
                &self.head[f.name.0..f.name.1],
                &self.head[f.value.0..f.value.1],
            )
        })
    }

    /// This request with `rest` going under the base path.
    pub fn with_rest<'r>(&self, rest: &'r [u8]) -> FrontRequest<'r>
    where
        'a: 'r,
    {
        FrontRequest { rest, ..*self }
    }

    /// The first value of the field named `name` (lowercase), borrowed from the head.
    pub fn first_value(&self, name: &[u8]) -> Option<&'a [u8]> {
        let head = self.head;
        self.fields
            .iter()
            .find(|f| head[f.name.0..f.name.1].eq_ignore_ascii_case(name))
            .map(|f| &head[f.value.0..f.value.1])
    }

    /// The values of the fields named `name` (lowercase).
    pub fn values<'n>(&'n self, name: &'n [u8]) -> impl Iterator<Item = &'n [u8]> {
        self.fields()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

/// What the service answers the front door.
#[derive(Debug)]
pub enum FrontAnswer {
    /// The upstream's response: its head is in the client's buffer already, its body
    /// follows, framed so.
    Streaming {
        /// The upstream's body.
        body: ResponseBody,
        /// How it goes on the wire.
        framing: ClientFraming,
    },
    /// A response of the proxy's own (an error), written as it is. Boxed: the answer is held
    /// while the body is written, in the connection's future, and errors are rare.
    Response(Box<Response<ProxyBody>>),
    /// Nothing was sent (the upstream refused `http/1.1` by ALPN): hyper serves the request,
    /// and the route's lean path is off from now on.
    ToHyper,
}

/// One route: its upstream, credential, pools and checks. Built once per route and kept by
/// a reload that leaves the route unchanged, so its pooled connections and file watchers live
/// on; the listener's [`ProxyService`] picks it by path.
#[derive(Clone)]
pub struct RouteService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RouteService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteService")
            .field("prefix", &self.inner.prefix)
            .field("upstream", &self.inner.upstream.url.as_str())
            .field("credential", &self.inner.slot.name())
            .finish()
    }
}

/// The routes of one listener, longest `path_prefix` first, and where the listener's own
/// answers are counted (those given before a route is known).
struct Routes {
    routes: Vec<RouteService>,
    unrouted: Ledger,
    /// Fired when a reload replaces this set: its connections finish and close.
    retired: CancellationToken,
}

/// Forwards each request of a listener to the route its path picks, with that route's token.
/// One clone serves one client connection and knows that client's address.
#[derive(Clone)]
pub struct ProxyService {
    routes: Arc<Routes>,
    peer: Option<IpAddr>,
}

impl std::fmt::Debug for ProxyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyService")
            .field("routes", &self.routes.routes)
            .field("peer", &self.peer)
            .finish()
    }
}

/// What the front door does with a request ([`ProxyService::pick_front`]).
#[derive(Debug)]
pub enum FrontPick<'s> {
    /// The proxy's own answer (an error), before anything went upstream.
    Refused(Box<Response<ProxyBody>>),
    /// The route has no lean exchange: hyper serves the request ([`FrontAnswer::ToHyper`]).
    ToHyper,
    /// This route serves it: what follows the first `usize` bytes of the target as sent goes
    /// under the upstream's base path.
    Route(Route<'s>, usize),
    /// As `Route`, from the target normalised (dot segments removed; rare, so boxed: the
    /// connection's future holds room for what this holds).
    Normalised(Box<(Route<'s>, String, usize)>),
}

/// One request's route, borrowed from the listener's set for the request: no reference count
/// is touched on the request path.
#[derive(Clone, Copy)]
pub struct Route<'a> {
    inner: &'a Inner,
    peer: &'a Option<IpAddr>,
}

impl std::fmt::Debug for Route<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("prefix", &self.inner.prefix)
            .field("upstream", &self.inner.upstream.url.as_str())
            .finish()
    }
}

/// Where a request's target goes: normalised (when that changed it) and with the route's
/// prefix cut (`cut` bytes) when the route strips it.
#[derive(Debug, Default)]
struct Target {
    normalised: Option<String>,
    cut: usize,
}

impl Target {
    /// What goes under the upstream's base path, from the target as `sent`.
    fn rest<'a>(&'a self, sent: &'a str) -> &'a str {
        &self.normalised.as_deref().unwrap_or(sent)[self.cut..]
    }

    /// Whether the target goes as it was sent.
    fn as_sent(&self) -> bool {
        self.normalised.is_none() && self.cut == 0
    }
}

/// What records a request: the metrics of a route (or of a listener, for what it answers
/// before a route is known) and whether access lines are logged.
#[derive(Clone, Copy)]
struct Ledger {
    metrics: &'static RouteMetrics,
    access_log: bool,
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
    let http = egress::Connector::new(http, route.proxy.as_ref());
    let connector = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        .http1_max_headers(super::raw::MAX_HEADERS)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // `Host` from the URI on HTTP/1.1 only; HTTP/2 carries it as `:authority`.
        .set_host(true)
        .build(connector)
}

impl RouteService {
    /// Builds the service; `tunnels` owns upgraded connections, which end when `cancel` fires.
    pub fn new(
        route: &RouteConfig,
        slot: Arc<TokenSlot>,
        metrics: &'static RouteMetrics,
        tunnels: TaskTracker,
        cancel: CancellationToken,
    ) -> Result<RouteService, tls::TlsError> {
        let built = Clients::build(route)?;
        let upstream = &route.upstream;
        let host = upstream.authority.host();
        let lean_tls = Arc::new(ArcSwap::new(built.lean.clone()));
        let pool = if upstream.scheme == http::uri::Scheme::HTTP {
            // Through a forward proxy, the pool's connections go to the proxy, and requests
            // carry the absolute URI (and the proxy's credentials).
            let (host, port) = match &route.proxy {
                Some(p) => p.host_port(),
                None => (host, upstream.authority.port_u16().unwrap_or(80)),
            };
            Some(Http1Pool::new(
                host,
                port,
                route.connect_timeout,
                POOL_IDLE_TIMEOUT,
            ))
        } else {
            // HTTPS: lean TLS connections, unless a forward proxy's tunnel is needed.
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(bare.to_owned()).ok();
            match (&route.proxy, name) {
                (None, Some(server_name)) => Some(Http1Pool::with_tls(
                    host,
                    upstream.authority.port_u16().unwrap_or(443),
                    route.connect_timeout,
                    POOL_IDLE_TIMEOUT,
                    pool::PoolTls {
                        config: lean_tls.clone(),
                        server_name,
                    },
                )),
                _ => None,
            }
        };
        let clients = Arc::new(ArcSwap::from_pointee(built));
        let inner = Arc::new(Inner {
            prefix: route.path_prefix.clone().into_boxed_str(),
            strip: route.strip_prefix,
            stamp: route.token_stamp.clone(),
            set_headers: (!route.set_headers.is_empty() || !route.set_header_files.is_empty())
                .then(|| Arc::new(ArcSwap::from_pointee(set_header_values(route, None)))),
            metrics,
            access_log: route.access_log,
            upstream: route.upstream.clone(),
            response_timeout: route.response_timeout,
            token_wait: route.token_wait,
            max_body_bytes: route.max_body_bytes,
            retry_on_401: route.retry_on_401,
            replay_max_body_bytes: route.replay_max_body_bytes,
            inbound_token: route
                .inbound_token
                .clone()
                .map(|t| Arc::new(ArcSwap::from_pointee(t))),
            allowed_clients: route.allowed_clients.clone(),
            upgrades: route.upgrades.clone(),
            rewrite_location: route.rewrite_location,
            via: route.via,
            slot,
            pool,
            proxy: route.proxy.clone(),
            clients,
            tunnels,
            retired: cancel.child_token(),
            cancel,
        });
        let tls_files: Vec<PathBuf> = route
            .ca_file
            .iter()
            .chain(route.client_identity.iter().flat_map(|i| i.files()))
            .cloned()
            .collect();
        if !tls_files.is_empty() {
            inner.tunnels.spawn(watch_tls_files(
                tls_files,
                route.clone(),
                inner.clients.clone(),
                lean_tls,
                inner.retired.clone(),
            ));
        }
        if let (false, Some(values)) = (route.set_header_files.is_empty(), &inner.set_headers) {
            inner.tunnels.spawn(watch_header_files(
                route.clone(),
                values.clone(),
                inner.retired.clone(),
            ));
        }
        if let (Some(path), Some(slot)) = (&route.inbound_token_file, &inner.inbound_token) {
            inner.tunnels.spawn(watch_inbound_token(
                path.clone(),
                slot.clone(),
                inner.retired.clone(),
            ));
        }
        Ok(RouteService { inner })
    }

    /// Retires this route: the tasks it runs (file watchers) stop. Its listener's
    /// [`ProxyService`] is retired apart.
    pub fn retire(&self) {
        self.inner.retired.cancel();
    }

    fn borrow<'a>(&'a self, peer: &'a Option<IpAddr>) -> Route<'a> {
        Route {
            inner: &self.inner,
            peer,
        }
    }

    /// Whether this route's bodiless requests can take the lean exchange.
    fn has_lean_path(&self) -> bool {
        self.borrow(&None).has_lean_path()
    }
}

impl ProxyService {
    /// The service of a listener that `routes` share (in any order; the longest prefix is
    /// tried first). `unrouted` names the listener in metrics for what it answers before a
    /// route is known, when it has more than one route; `retired` is fired when a reload
    /// replaces the set.
    pub fn new(
        mut routes: Vec<RouteService>,
        unrouted: impl FnOnce() -> &'static RouteMetrics,
        retired: CancellationToken,
    ) -> ProxyService {
        routes.sort_by_key(|r| std::cmp::Reverse(r.inner.prefix.len()));
        let access_log = routes.iter().any(|r| r.inner.access_log);
        // One route alone counts everything under its own name, as a listener of one route
        // always has.
        let metrics = match routes.as_slice() {
            [only] => only.inner.metrics,
            _ => unrouted(),
        };
        ProxyService {
            routes: Arc::new(Routes {
                routes,
                unrouted: Ledger {
                    metrics,
                    access_log,
                },
                retired,
            }),
            peer: None,
        }
    }

    /// The token fired when this service is retired (its listener stops, or a reload replaces
    /// it).
    pub fn retired(&self) -> CancellationToken {
        self.routes.retired.clone()
    }

    /// Retires this service: its open connections finish their requests and close.
    pub fn retire(&self) {
        self.routes.retired.cancel();
    }

    /// This service for a connection from `peer` (`None` on a Unix socket).
    pub fn for_peer(&self, peer: Option<SocketAddr>) -> ProxyService {
        ProxyService {
            routes: self.routes.clone(),
            peer: peer.map(|p| p.ip()),
        }
    }

    /// The route that takes `target` (origin-form), and what of it goes upstream: the path
    /// normalised (see `mount.rs`), matched on whole segments, longest prefix first.
    fn pick(&self, target: &[u8]) -> Result<(Route<'_>, Target), ProxyError> {
        if target.first() != Some(&b'/') {
            return Err(ProxyError::BadRequest(format!(
                "request target {:?} is not an absolute path",
                String::from_utf8_lossy(target)
            )));
        }
        let normalised =
            mount::normalise(target).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        let path = normalised.path(target);
        let Some(route) = self
            .routes
            .routes
            .iter()
            .find(|r| mount::under(path, r.inner.prefix.as_bytes()))
        else {
            return Err(ProxyError::NoRoute(format!(
                "no route on this listener takes the path {:?} (path_prefix)",
                String::from_utf8_lossy(path)
            )));
        };
        let cut = if route.inner.strip {
            route.inner.prefix.len()
        } else {
            0
        };
        let normalised = match normalised {
            mount::Normalised::AsSent { .. } => None,
            // Made of the target's bytes (UTF-8, or the front door's ASCII) split at ASCII `/`.
            mount::Normalised::Changed(t) => Some(String::from_utf8_lossy(&t).into_owned()),
        };
        Ok((route.borrow(&self.peer), Target { normalised, cut }))
    }

    /// Handles one request; never fails (errors become JSON responses).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        self.handle_body(req.map(ClientBody::Hyper)).await
    }

    /// [`handle`](Self::handle) for a request whose body came from either server.
    pub async fn handle_body(&self, req: Request<ClientBody>) -> Response<ProxyBody> {
        let sent = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        match self.pick(sent.as_bytes()) {
            Ok((route, target)) => {
                let access = route.ledger().access(req.method(), req.uri());
                let result = route.forward(req, &target).await;
                route.ledger().respond(access, result)
            }
            Err(e) => {
                let ledger = self.routes.unrouted;
                let access = ledger.access(req.method(), req.uri());
                ledger.respond(access, Err(e))
            }
        }
    }

    /// Whether the front door (`front.rs`) may take bodiless HTTP/1.1 requests on this
    /// listener: a route of it can take them through the lean exchange (a plain-`http`
    /// upstream, or an `https` one that has not refused `http/1.1`). A request whose route
    /// cannot goes to hyper ([`FrontAnswer::ToHyper`]).
    pub fn has_lean_path(&self) -> bool {
        self.routes.routes.iter().any(RouteService::has_lean_path)
    }

    /// Decides what becomes of a bodiless `GET`, `HEAD`, `DELETE` or `OPTIONS` the front door
    /// read, before anything is awaited: the route its path picks (with the redirects to that
    /// route's upstream set to come back to the client's `Host`), or the answer already (an
    /// error, or hyper for a route without the lean exchange). The caller awaits the route's
    /// [`Route::serve_front`] itself, in its own future: a future returned from here would be
    /// copied on its way out (hundreds of bytes per request, callgrind showed).
    pub fn pick_front<'s>(
        &'s self,
        req: &FrontRequest<'s>,
        client: &mut ClientHead<'s>,
    ) -> FrontPick<'s> {
        let (route, target) = match self.pick(req.target) {
            Ok(picked) => picked,
            Err(e) => {
                let ledger = self.routes.unrouted;
                let uri = ledger
                    .access_log
                    .then(|| Uri::try_from(req.target).unwrap_or_default());
                let access =
                    Access::started_at(ledger.metrics, req.method.clone(), uri, Instant::now());
                client.out.clear();
                return FrontPick::Refused(Box::new(ledger.respond(access, Err(e))));
            }
        };
        if !route.has_lean_path() {
            return FrontPick::ToHyper;
        }
        client.relocate = route.relocation(req.first_value(b"host"), &target);
        match target.normalised {
            None => FrontPick::Route(route, target.cut),
            Some(normalised) => FrontPick::Normalised(Box::new((route, normalised, target.cut))),
        }
    }

    /// The answer, as HTTP/1.1 bytes that close the connection, to a request the front door
    /// or the gate refused before it could be read as one (see `codec::Refusal`): logged and
    /// counted once, here, as every error is, under the listener's name when it has several
    /// routes (which one is not known). Its method is unknown, so the record has `-`.
    pub fn refuse(&self, e: ProxyError) -> bytes::Bytes {
        let ledger = self.routes.unrouted;
        let unknown = Method::from_bytes(b"-").expect("a token");
        let access = Access::started_at(
            ledger.metrics,
            unknown,
            ledger.access_log.then(Uri::default),
            Instant::now(),
        );
        let wire = e.to_http1_closing();
        ledger.record_error(access, &e, wire.len() as u64);
        wire
    }

    /// [`refuse`](Self::refuse) as a response, for a client whose connection goes on (an
    /// HTTP/2 stream refused on its own): logged and counted once, here.
    pub fn refusal(&self, method: &Method, e: ProxyError) -> Response<ProxyBody> {
        let ledger = self.routes.unrouted;
        let access = Access::started_at(
            ledger.metrics,
            method.clone(),
            ledger.access_log.then(Uri::default),
            Instant::now(),
        );
        ledger.respond(access, Err(e))
    }
}

impl Ledger {
    /// The record finished when the response ends (the uri clone bumps a reference count, and
    /// only when the access log is on).
    fn access(self, method: &Method, uri: &Uri) -> Access {
        let uri = self.access_log.then(|| uri.clone());
        Access::new(self.metrics, method.clone(), uri)
    }

    /// The response to send: the upstream's, or the JSON for an error (logged once, here).
    fn respond(
        self,
        access: Access,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Response<ProxyBody> {
        match result {
            Ok(mut response) => {
                let status = response.status();
                match response.body_mut() {
                    Either::Left(body) => body.finish_with(access, status),
                    Either::Right(body) => {
                        access.finish(status, body.size_hint().exact().unwrap_or(0), true)
                    }
                }
                response
            }
            Err(e) => {
                let response = e.to_response();
                let bytes = response.body().size_hint().exact().unwrap_or(0);
                self.record_error(access, &e, bytes);
                response
            }
        }
    }

    /// Logs and counts an error the proxy answers itself, and finishes its record (`bytes`
    /// of answer sent).
    fn record_error(self, access: Access, e: &ProxyError, bytes: u64) {
        warn!(route = self.metrics.name(), error = e.code(), message = %e, "request failed");
        self.metrics.error(e.code());
        access.finish(e.status(), bytes, true);
    }
}

impl<'a> Route<'a> {
    fn ledger(&self) -> Ledger {
        Ledger {
            metrics: self.inner.metrics,
            access_log: self.inner.access_log,
        }
    }

    fn has_lean_path(&self) -> bool {
        self.inner
            .pool
            .as_ref()
            .is_some_and(Http1Pool::serves_front)
    }

    /// Serves a request the front door read on this route ([`ProxyService::pick_front`]),
    /// from bytes to bytes: the upstream's request head is written into `up`, and the response
    /// head for the client into `client.out`. what goes under the base path is `req.rest`. Never fails (errors become JSON responses).
    pub async fn serve_front(
        self,
        req: &FrontRequest<'_>,
        up: &mut Vec<u8>,
        client: &mut ClientHead<'_>,
        timer: &mut Deadline,
    ) -> FrontAnswer {
        let inner = self.inner;
        // The target is only parsed for the access log.
        let uri = inner
            .access_log
            .then(|| Uri::try_from(req.target).unwrap_or_default());
        // One reading of the clock for the record, the token's validity and the deadline.
        let now = Instant::now();
        let access = Access::started_at(inner.metrics, req.method.clone(), uri, now);
        match self.forward_front(req, up, client, timer, now).await {
            Ok((status, body, framing)) => {
                let mut body = ResponseBody::lean(body);
                body.finish_with(access, status);
                FrontAnswer::Streaming { body, framing }
            }
            Err(Bodiless::Http11Refused) => FrontAnswer::ToHyper,
            Err(Bodiless::Failed(e)) => {
                client.out.clear();
                FrontAnswer::Response(Box::new(self.ledger().respond(access, Err(e))))
            }
        }
    }

    /// Refuses what the route does not accept, before anything else is looked at.
    fn admit(&self, head: Head<'_>, size: Option<u64>) -> Result<(), ProxyError> {
        let sent = head.headers.get(http::header::PROXY_AUTHORIZATION);
        self.admit_client(sent.map(http::HeaderValue::as_bytes))?;
        if *head.method == Method::CONNECT {
            return Err(ProxyError::BadRequest(
                "CONNECT is not supported: token-proxy is a reverse proxy for one upstream, not a forward proxy".into(),
            ));
        }
        if head.version < Version::HTTP_2
            && (head.uri.scheme().is_some() || head.uri.authority().is_some())
        {
            return Err(ProxyError::BadRequest(
                "absolute-form request targets are refused: send origin-form (`GET /path`), token-proxy chooses the upstream".into(),
            ));
        }
        let hosts = head.headers.get_all(HOST).iter().count();
        admit_head(
            hosts,
            head.version == Version::HTTP_11,
            headers::is_loop(head.headers),
        )?;
        if let (Some(limit), Some(len)) = (self.inner.max_body_bytes, size) {
            if len > limit {
                return Err(ProxyError::PayloadTooLarge(format!(
                    "request body of {len} bytes is over this route's limit of {limit} bytes"
                )));
            }
        }
        Ok(())
    }

    /// The client's address must be allowed, and its `Proxy-Authorization` (`sent`) must carry
    /// the inbound token where the route has one.
    fn admit_client(&self, sent: Option<&[u8]>) -> Result<(), ProxyError> {
        let inner = self.inner;
        if !inner.allowed_clients.is_empty() {
            let allowed = self
                .peer
                .is_some_and(|ip| inner.allowed_clients.iter().any(|c| c.contains(ip)));
            if !allowed {
                return Err(ProxyError::Forbidden(
                    "this client address may not use this route (allowed_clients)".into(),
                ));
            }
        }
        if let Some(expected) = &inner.inbound_token {
            if !headers::bearer_bytes_match(sent, expected.load().expose().as_bytes()) {
                return Err(ProxyError::ProxyAuthenticationRequired(
                    "send `Proxy-Authorization: Bearer <inbound token>`: this route requires its inbound token".into(),
                ));
            }
        }
        Ok(())
    }

    async fn forward(
        &self,
        mut req: Request<ClientBody>,
        target: &Target,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let inner = self.inner;
        let size = req.body().size_hint().exact();
        self.admit(
            Head {
                method: req.method(),
                version: req.version(),
                uri: req.uri(),
                headers: req.headers(),
            },
            size,
        )?;
        let authorization = self.authorization(Instant::now()).await?;

        // Only the protocols the route allows are offered; an upgrade to any other (h2c, as
        // Java's HttpClient asks on every request) goes as a plain request.
        let upgrade = req.version() == Version::HTTP_11
            && headers::is_upgrade_request(req.headers())
            && headers::offer_allowed_upgrades(req.headers_mut(), &inner.upgrades);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // The authority the client addressed, for redirects to the upstream's own origin.
        let client_host = inner
            .rewrite_location
            .then(|| client_authority(req.version(), req.uri(), req.headers()))
            .flatten();
        let streamed = size.is_none();
        // A request can be replayed after a 401 if its whole body is small enough to keep.
        let replayable = inner.retry_on_401
            && !upgrade
            && size.is_some_and(|n| n <= inner.replay_max_body_bytes);

        let (mut parts, body) = req.into_parts();
        // The commonest request, bodiless and idempotent, takes the lean exchange (raw.rs)
        // where the route has it. Its head stays here, so a 401 replay needs no copy.
        let bodiless_idempotent = size == Some(0) && is_bodiless_method(&parts.method);
        let lean = (!upgrade && bodiless_idempotent)
            .then_some(inner.pool.as_ref())
            .flatten()
            .filter(|p| p.takes_bodiless());
        // The pool speaks to one upstream and sends the origin-form target; hyper-util's
        // client takes the absolute URI and does the same on the wire.
        let pooled = lean.is_some() || (!upgrade && self.hyper_pool().is_some());
        self.prepare(
            &mut parts,
            authorization.clone(),
            pooled,
            upgrade,
            streamed,
            target,
        )?;

        if let Some(pool) = lean {
            match self
                .exchange_bodiless(pool, &mut parts, &authorization)
                .await
            {
                Err(Bodiless::Http11Refused) => {
                    // Nothing was sent: the request goes through hyper-util's client, which
                    // takes the absolute URI (an `https` pool has no forward proxy).
                    parts.uri = http::Uri::builder()
                        .scheme(inner.upstream.scheme.clone())
                        .authority(inner.upstream.authority.clone())
                        .path_and_query(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
                        .build()
                        .map_err(|e| ProxyError::BadRequest(format!("target: {e}")))?;
                    parts.headers.remove(http::header::HOST);
                }
                Err(Bodiless::Failed(e)) => return Err(e),
                Ok(mut response) => {
                    self.relocate(response.headers_mut(), client_host.as_ref(), target);
                    return Ok(response);
                }
            }
        }

        let (body, replay) = if replayable {
            let bytes = if size == Some(0) {
                bytes::Bytes::new()
            } else {
                body.collect()
                    .await
                    .map_err(|e| {
                        ProxyError::BadRequest(format!("could not read the request body: {e}"))
                    })?
                    .to_bytes()
            };
            let replay = Replay {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                body: bytes.clone(),
            };
            (UpstreamBody::buffered(bytes), Some(replay))
        } else {
            (UpstreamBody::streamed(body, inner.max_body_bytes), None)
        };

        let sent = self
            .send(upgrade, Request::from_parts(parts, body), false)
            .await;
        let (mut response, mut checkin) = match (sent, &replay) {
            // A kept-alive connection the upstream had closed as the request went out: send
            // an idempotent request again on a new connection, as nginx does.
            (Err(failed), Some(replay)) if failed.stale && replay.method.is_idempotent() => {
                debug!("pooled upstream connection closed under the request: sending it again");
                self.send(upgrade, replay.request(None), true)
                    .await
                    .map_err(|f| f.error)?
            }
            (sent, _) => sent.map_err(|f| f.error)?,
        };

        if response.status() == StatusCode::UNAUTHORIZED && inner.retry_on_401 {
            match replay {
                Some(replay) => {
                    if let Some(fresh) = self.token_after_401(authorization.as_bytes()).await {
                        debug!("upstream answered 401: replaying once with a new token");
                        inner.metrics.replay_401();
                        (response, checkin) = self
                            .send(upgrade, replay.request(Some(self.stamped(&fresh))), false)
                            .await
                            .map_err(|f| f.error)?;
                    }
                }
                // A streamed body cannot be sent again, but the token it carried is refused
                // all the same: retire it (rate limited) so the next request has a new one.
                None => {
                    if inner.slot.invalidate(authorization.as_bytes()) {
                        debug!("upstream answered 401 to a request that cannot be replayed: token retired");
                    }
                }
            }
        }

        // hyper checks its limit on a head only while the head is incomplete, so one that
        // arrives whole in a large read can be over it: the lean path's limit, once more.
        if head_size(response.headers()) > super::raw::MAX_HEAD {
            return Err(ProxyError::UpstreamUnavailable(format!(
                "upstream {} sent a response head too large: over {} bytes",
                inner.upstream.url,
                super::raw::MAX_HEAD
            )));
        }
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::UpstreamUnavailable(
                    "upstream answered 101 Switching Protocols to a request that asked for no upgrade".into(),
                ));
            };
            let chosen = response
                .headers()
                .get_all(http::header::UPGRADE)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .all(|p| headers::is_allowed_upgrade(p.trim_ascii(), &inner.upgrades));
            if !chosen || !response.headers().contains_key(http::header::UPGRADE) {
                return Err(ProxyError::UpstreamUnavailable(
                    "upstream switched to a protocol this route does not allow (upgrades)".into(),
                ));
            }
            self.tunnel(client_upgrade, hyper::upgrade::on(&mut response));
        }
        let streamed = response.body().size_hint().exact().is_none();
        headers::prepare_response(response.headers_mut(), switching, streamed);
        self.relocate(response.headers_mut(), client_host.as_ref(), target);
        Ok(response.map(|body| Either::Left(ResponseBody::new(body, checkin))))
    }

    /// [`forward`](Self::forward) for a request the front door read.
    async fn forward_front(
        &self,
        req: &FrontRequest<'_>,
        up: &mut Vec<u8>,
        client: &mut ClientHead<'_>,
        timer: &mut Deadline,
        now: Instant,
    ) -> Result<(StatusCode, pool::LeanBody, ClientFraming), Bodiless> {
        let inner = self.inner;
        self.admit_client(req.values(b"proxy-authorization").next())?;
        let hosts = req.values(b"host").count();
        admit_head(hosts, true, req.values(b"via").any(headers::names_us))?;
        let Some(pool) = &inner.pool else {
            // The front door only serves routes with a pool (`has_lean_path`).
            return Err(ProxyError::BadRequest(
                "this route takes no requests through the front door".into(),
            )
            .into());
        };
        // The token is written from the slot without a clone; only when none is valid does
        // the request wait for one (and own it).
        let sent_token = match inner
            .slot
            .with_header_at(now, |token| self.write_upstream_head(req, token, up))
        {
            Some(range) => range,
            None => {
                let token = self.authorization(now).await?;
                self.write_upstream_head(req, token.as_bytes(), up)
            }
        };
        let answer = self
            .send_for_client(pool, up, req.method, client, timer, now)
            .await?;
        if answer.0 == StatusCode::UNAUTHORIZED && inner.retry_on_401 {
            if let Some(fresh) = self.token_after_401(&up[sent_token]).await {
                debug!("upstream answered 401: replaying once with a new token");
                inner.metrics.replay_401();
                drop(answer);
                client.out.clear();
                client.trailers.clear();
                up.clear();
                self.write_upstream_head(req, fresh.as_bytes(), up);
                return self
                    .send_for_client(pool, up, req.method, client, timer, Instant::now())
                    .await;
            }
        }
        Ok(answer)
    }

    /// The upstream's head for a request the front door read, as [`prepare`](Self::prepare)
    /// makes it: the target under the upstream's base path (absolute through a forward
    /// proxy), hop-by-hop fields (and those `Connection` names) left out, the client's
    /// `Authorization` and `Host` replaced, `TE: trailers` kept, our `Via` added. Returns
    /// where in `up` the token went, to tell after a `401` which token the upstream refused.
    fn write_upstream_head(
        &self,
        req: &FrontRequest<'_>,
        token: &[u8],
        up: &mut Vec<u8>,
    ) -> std::ops::Range<usize> {
        let inner = self.inner;
        let upstream = &inner.upstream;
        up.extend_from_slice(req.method.as_str().as_bytes());
        up.push(b' ');
        if inner.proxy.is_some() {
            up.extend_from_slice(upstream.scheme.as_str().as_bytes());
            up.extend_from_slice(b"://");
            up.extend_from_slice(upstream.authority.as_str().as_bytes());
        }
        up.extend_from_slice(upstream.base_path.as_bytes());
        // A target that was only the route's prefix leaves nothing, or a query alone.
        if upstream.base_path.is_empty() && !req.rest.starts_with(b"/") {
            up.push(b'/');
        }
        up.extend_from_slice(req.rest);
        up.extend_from_slice(b" HTTP/1.1\r\n");
        // Fields a `Connection` header names besides its options (rare).
        let named: Vec<&[u8]> = req
            .values(b"connection")
            .flat_map(|v| headers::connection_named(v, false))
            .collect();
        let mut sized = false;
        let stamp = &inner.stamp;
        let set = inner.set_headers.as_ref().map(|s| s.load());
        for (name, value) in req.fields() {
            if headers::is_hop_by_hop(name)
                || name.eq_ignore_ascii_case(b"host")
                || name.eq_ignore_ascii_case(stamp.header.as_str().as_bytes())
                || headers::is_http2_settings(name)
                || named.iter().any(|n| n.eq_ignore_ascii_case(name))
                || set.as_ref().is_some_and(|set| {
                    set.iter()
                        .any(|(n, _)| n.as_str().as_bytes().eq_ignore_ascii_case(name))
                })
            {
                continue;
            }
            // `Content-Length: 0` goes on once, however the client repeated it.
            if name.eq_ignore_ascii_case(b"content-length") {
                sized = true;
                continue;
            }
            super::codec::write_field(up, name, value);
        }
        if sized {
            up.extend_from_slice(b"content-length: 0\r\n");
        }
        if req.te {
            up.extend_from_slice(b"te: trailers\r\n");
        }
        // The token's own bytes are where `sent_token` says, whatever its format.
        up.extend_from_slice(stamp.header.as_str().as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(stamp.prefix.as_bytes());
        let start = up.len();
        up.extend_from_slice(headers::bare_token(token));
        let sent_token = start..up.len();
        up.extend_from_slice(stamp.suffix.as_bytes());
        if let Some(set) = &set {
            for (name, value) in set.iter() {
                up.extend_from_slice(b"\r\n");
                up.extend_from_slice(name.as_str().as_bytes());
                up.extend_from_slice(b": ");
                up.extend_from_slice(value.as_bytes());
            }
        }
        up.extend_from_slice(b"\r\nhost: ");
        up.extend_from_slice(upstream.host_header.as_bytes());
        if let Some(auth) = inner.proxy.as_ref().and_then(|p| p.authorization()) {
            up.extend_from_slice(b"\r\nproxy-authorization: ");
            up.extend_from_slice(auth.as_bytes());
        }
        if inner.via {
            up.extend_from_slice(b"\r\nvia: ");
            up.extend_from_slice(headers::via_entry().as_bytes());
        }
        up.extend_from_slice(b"\r\n\r\n");
        sent_token
    }

    /// Sends a request head the front door's request became, bounded by the response timeout
    /// from `now` (the connection's `timer`, see [`Deadline`]).
    async fn send_for_client(
        &self,
        pool: &Http1Pool,
        head: &[u8],
        method: &Method,
        client: &mut ClientHead<'_>,
        timer: &mut Deadline,
        now: Instant,
    ) -> Result<(StatusCode, pool::LeanBody, ClientFraming), Bodiless> {
        let inner = self.inner;
        let sent = pin!(pool.send_for_client(head, method, client));
        match timer.bound_for(now, inner.response_timeout, sent).await {
            Some(Err(pool::SendError::Http11Refused)) => Err(Bodiless::Http11Refused),
            Some(r) => r.map_err(|e| Bodiless::Failed(pool_error(inner, &e))),
            None => Err(Bodiless::Failed(self.response_timed_out())),
        }
    }

    /// The field and value the token goes upstream in, from the slot's `Bearer <token>`:
    /// that value itself for the default `Authorization: Bearer <token>` (a reference count
    /// bumped, no copy), else the route's `token_format` around the token.
    fn stamped(&self, slot_value: &http::HeaderValue) -> (http::HeaderName, http::HeaderValue) {
        let stamp = &self.inner.stamp;
        if stamp.is_default() {
            return (http::header::AUTHORIZATION, slot_value.clone());
        }
        let bare = headers::bare_token(slot_value.as_bytes());
        let value = [stamp.prefix.as_bytes(), bare, stamp.suffix.as_bytes()].concat();
        let mut value = http::HeaderValue::from_bytes(&value)
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        value.set_sensitive(true);
        (stamp.header.clone(), value)
    }

    /// The `Authorization` value to send: the token valid at `now`, lock-free and without
    /// I/O, or, only when none is, the next one within the route's `token_wait`.
    async fn authorization(&self, now: Instant) -> Result<http::HeaderValue, ProxyError> {
        let slot = &self.inner.slot;
        match slot.header_at(now) {
            Some(h) => Ok(h),
            None => slot
                .wait_for_header(self.inner.token_wait)
                .await
                .map_err(|e| ProxyError::TokenUnavailable(e.to_string())),
        }
    }

    /// Turns the client's request head into the upstream's: the target under the upstream's
    /// base path (absolute when hyper-util's client or a forward proxy takes it), the headers
    /// readied, the forward proxy's credentials added where the request goes to it.
    fn prepare(
        &self,
        parts: &mut http::request::Parts,
        authorization: http::HeaderValue,
        pooled: bool,
        upgrade: bool,
        streamed: bool,
        target: &Target,
    ) -> Result<(), ProxyError> {
        let inner = self.inner;
        let via_proxy = pooled && inner.proxy.is_some();
        parts.uri = upstream_uri(
            &inner.upstream,
            parts.uri.path_and_query(),
            target,
            !pooled || via_proxy,
        )?;
        parts.version = Version::HTTP_11;
        headers::prepare_request(
            &mut parts.headers,
            self.stamped(&authorization),
            pooled.then_some(&inner.upstream.host_header),
            upgrade,
            streamed,
            inner.via,
        );
        if let Some(set) = &inner.set_headers {
            for (name, value) in set.load().iter() {
                parts.headers.insert(name.clone(), value.clone());
            }
        }
        // hyper's client sends no body with a `GET` or `HEAD` of unknown length unless told
        // to; a body the client sent is never dropped.
        if streamed && matches!(parts.method, Method::GET | Method::HEAD) {
            parts.headers.insert(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }
        let proxy_auth = inner.proxy.as_ref().and_then(|p| p.authorization());
        if let (true, Some(auth)) = (via_proxy, proxy_auth) {
            parts
                .headers
                .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
        Ok(())
    }

    /// Where redirects to the upstream's own origin go for a client that addressed
    /// `client_host`, if the route rewrites them: under the prefix the client's path had, when
    /// the route cut it for `target`.
    fn relocation<'h>(
        &self,
        client_host: Option<&'h [u8]>,
        target: &Target,
    ) -> Option<headers::Relocation<'h>>
    where
        'a: 'h,
    {
        let inner: &'a Inner = self.inner;
        inner.rewrite_location.then_some(headers::Relocation {
            upstream: &inner.upstream,
            client_host,
            client_prefix: if target.cut > 0 { &inner.prefix } else { "" },
        })
    }

    /// Rewrites redirects to the upstream's own origin (`rewrite_location`) as the client's
    /// address, `client_host`.
    fn relocate(
        &self,
        headers: &mut http::HeaderMap,
        client_host: Option<&http::HeaderValue>,
        target: &Target,
    ) {
        if let Some(relocation) =
            self.relocation(client_host.map(http::HeaderValue::as_bytes), target)
        {
            relocation.apply(headers);
        }
    }

    /// The lean exchange of a prepared bodiless request, replayed once with a new token after
    /// a `401`.
    async fn exchange_bodiless(
        &self,
        pool: &Http1Pool,
        parts: &mut http::request::Parts,
        authorization: &http::HeaderValue,
    ) -> Result<Response<ProxyBody>, Bodiless> {
        let inner = self.inner;
        let mut response = self.send_bodiless(pool, parts).await?;
        if response.status() == StatusCode::UNAUTHORIZED && inner.retry_on_401 {
            if let Some(fresh) = self.token_after_401(authorization.as_bytes()).await {
                debug!("upstream answered 401: replaying once with a new token");
                inner.metrics.replay_401();
                let (name, value) = self.stamped(&fresh);
                parts.headers.insert(name, value);
                response = self.send_bodiless(pool, parts).await?;
            }
        }
        // Its hop-by-hop fields are already out (see raw.rs).
        Ok(response.map(|body| Either::Left(ResponseBody::raw(body))))
    }

    /// After a 401 to `used`: retire that token (rate limited) and wait for the next one.
    async fn token_after_401(&self, used: &[u8]) -> Option<http::HeaderValue> {
        let slot = &self.inner.slot;
        if !slot.invalidate(used) {
            debug!("upstream answered 401 again within the invalidation interval: passing it on");
            return None;
        }
        match slot.wait_for_header(self.inner.token_wait).await {
            Ok(fresh) if headers::bare_token(fresh.as_bytes()) != headers::bare_token(used) => {
                Some(fresh)
            }
            Ok(_) => None,
            Err(e) => {
                debug!(error = %e, "no new token after a 401: passing it on");
                None
            }
        }
    }

    /// Sends a bodiless request with the pool's lean exchange, bounded by the response timeout.
    async fn send_bodiless(
        &self,
        pool: &Http1Pool,
        parts: &http::request::Parts,
    ) -> Result<Response<super::raw::RawBody>, Bodiless> {
        let inner = self.inner;
        match tokio::time::timeout(inner.response_timeout, pool.send_bodiless(parts)).await {
            Ok(Err(pool::SendError::Http11Refused)) => Err(Bodiless::Http11Refused),
            Ok(r) => r.map_err(|e| Bodiless::Failed(pool_error(inner, &e))),
            Err(_) => Err(Bodiless::Failed(self.response_timed_out())),
        }
    }

    /// The pool that takes this route's requests through hyper's HTTP/1.1 connections: a
    /// plain-`http` upstream's (an `https` pool holds lean connections only).
    fn hyper_pool(&self) -> Option<&Http1Pool> {
        self.inner.pool.as_ref().filter(|p| !p.is_tls())
    }

    /// The answer when the upstream sent no response head in time.
    fn response_timed_out(&self) -> ProxyError {
        let inner = self.inner;
        ProxyError::UpstreamTimeout(format!(
            "upstream {} sent no response within {:.1} s",
            inner.upstream.url,
            inner.response_timeout.as_secs_f64()
        ))
    }

    /// Sends one request upstream (on a new connection if `fresh`), bounded by the response
    /// timeout. The response comes with its pooled connection, to go back when the body has
    /// been read.
    async fn send(
        &self,
        upgrade: bool,
        req: Request<UpstreamBody>,
        fresh: bool,
    ) -> Result<(Response<Incoming>, Option<Checkin>), SendFailed> {
        let inner = self.inner;
        let failed = |error| SendFailed {
            error,
            stale: false,
        };
        let sent = async {
            match self.hyper_pool() {
                Some(pool) if !upgrade => pool.send(req, fresh).await.map_err(|e| SendFailed {
                    stale: matches!(e, pool::SendError::Stale(_)),
                    error: pool_error(inner, &e),
                }),
                _ => {
                    let clients = inner.clients.load_full();
                    let client = if upgrade {
                        &clients.upgrade
                    } else {
                        &clients.main
                    };
                    client
                        .request(req)
                        .await
                        .map(|r| (r, None))
                        .map_err(|e| failed(client_error(inner, &e)))
                }
            }
        };
        match tokio::time::timeout(inner.response_timeout, sent).await {
            Ok(r) => r,
            Err(_) => Err(failed(self.response_timed_out())),
        }
    }

    /// Joins the client's and the upstream's upgraded connections, owned by the tunnel tracker.
    fn tunnel(&self, client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
        let cancel = self.inner.cancel.clone();
        self.inner.tunnels.spawn(
            async move {
                let (client_io, upstream_io) = match tokio::try_join!(client, upstream) {
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
}

/// Why the lean exchange of a bodiless request gave no response.
enum Bodiless {
    /// The upstream refused `http/1.1` by ALPN before anything was sent: hyper's client
    /// takes the request instead.
    Http11Refused,
    /// The answer to the client.
    Failed(ProxyError),
}

impl From<ProxyError> for Bodiless {
    fn from(e: ProxyError) -> Bodiless {
        Bodiless::Failed(e)
    }
}

/// A failed send; `stale` when a kept-alive connection turned out closed after the request
/// went out on it, so that an idempotent request may be sent again.
struct SendFailed {
    error: ProxyError,
    stale: bool,
}

/// A small request kept whole, to send again after a `401` or on a stale connection.
struct Replay {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

impl Replay {
    /// The request again, with a new token field if given.
    fn request(
        &self,
        authorization: Option<(http::HeaderName, http::HeaderValue)>,
    ) -> Request<UpstreamBody> {
        let mut req = Request::new(UpstreamBody::buffered(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        if let Some((name, value)) = authorization {
            req.headers_mut().insert(name, value);
        }
        req
    }
}

/// The fields a route sets on every request, with their values.
type SetHeaders = Vec<(http::HeaderName, http::HeaderValue)>;

/// The values of the route's `set_headers`, then of its `set_header_files` (from `read` where
/// given, else as the config read them), marked sensitive.
fn set_header_values(route: &RouteConfig, read: Option<&[Secret]>) -> SetHeaders {
    let inline = route.set_headers.iter().map(|(n, v)| (n, v));
    let files = route
        .set_header_files
        .iter()
        .enumerate()
        .map(|(i, (n, _, v))| (n, read.and_then(|r| r.get(i)).unwrap_or(v)));
    inline
        .chain(files)
        .filter_map(|(name, value)| {
            let mut value = http::HeaderValue::from_str(value.expose()).ok()?;
            value.set_sensitive(true);
            Some((name.clone(), value))
        })
        .collect()
}

/// How often a route's `set_header_files` are read again.
const HEADER_FILES_POLL: Duration = Duration::from_secs(2);

/// Reads the route's `set_header_files` every [`HEADER_FILES_POLL`] until `stop` fires, and
/// swaps in the new values when one changed. A file that cannot be read, or no longer holds
/// a valid value, keeps the value in use and logs a warning (naming the file, never a value).
async fn watch_header_files(
    route: RouteConfig,
    values: Arc<ArcSwap<SetHeaders>>,
    stop: CancellationToken,
) {
    let mut current: Vec<Secret> = route
        .set_header_files
        .iter()
        .map(|(_, _, v)| v.clone())
        .collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEADER_FILES_POLL) => {}
        }
        let paths: Vec<PathBuf> = route
            .set_header_files
            .iter()
            .map(|(_, p, _)| p.clone())
            .collect();
        let read = tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|p| crate::config::read_header_file(p))
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(read) = read else { continue };
        let mut changed = false;
        for (i, r) in read.into_iter().enumerate() {
            match r {
                Ok(v) if v != current[i] => {
                    current[i] = v;
                    changed = true;
                }
                Ok(_) => {}
                Err(problem) => {
                    warn!(route = route.name.as_str(), %problem, "set_header_files: keeping the value in use")
                }
            }
        }
        if changed {
            values.store(Arc::new(set_header_values(&route, Some(&current))));
            debug!(
                route = route.name.as_str(),
                "set_header_files: a value changed"
            );
        }
    }
}

/// How often the route's TLS files (`ca_file`, client certificate and key) are checked for a
/// change.
const TLS_FILES_POLL: Duration = Duration::from_secs(2);

/// Rebuilds the route's upstream clients when one of its TLS `files` changes (its modification
/// time, size or inode: a rewritten file, or Kubernetes' symlink swap of a mounted Secret), until
/// `stop` fires. Requests in flight finish on the clients they started with; new ones use the
/// new settings. An unusable new file keeps the current settings and is logged once.
async fn watch_tls_files(
    files: Vec<PathBuf>,
    route: RouteConfig,
    clients: Arc<ArcSwap<Clients>>,
    lean: Arc<ArcSwap<pool::LeanTls>>,
    stop: CancellationToken,
) {
    let stamp = || files.iter().map(|f| tls::file_stamp(f)).collect::<Vec<_>>();
    let mut seen = stamp();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TLS_FILES_POLL) => {}
        }
        let now = stamp();
        if now == seen {
            continue;
        }
        let route = route.clone();
        match tokio::task::spawn_blocking(move || Clients::build(&route)).await {
            Ok(Ok(new)) => {
                seen = now;
                failing = false;
                lean.store(new.lean.clone());
                clients.store(Arc::new(new));
                tracing::info!("upstream TLS files changed: new connections use them");
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                warn!(error = %e, "upstream TLS files changed but are unusable: keeping the current ones");
            }
            _ => {}
        }
    }
}

/// How often an inbound token file is re-read.
const INBOUND_TOKEN_POLL: Duration = Duration::from_secs(2);

/// Re-reads `path` every [`INBOUND_TOKEN_POLL`] until `stop` fires, so a rotated inbound
/// token (including Kubernetes' symlink swap of a mounted Secret) takes effect without a
/// restart. An unreadable or too short file keeps the current token and is logged once.
async fn watch_inbound_token(
    path: std::path::PathBuf,
    slot: Arc<ArcSwap<Secret>>,
    stop: CancellationToken,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(INBOUND_TOKEN_POLL) => {}
        }
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || crate::config::read_inbound_token(&path)).await
        };
        match read {
            Ok(Ok(token)) => {
                failing = false;
                if **slot.load() != token {
                    slot.store(Arc::new(token));
                    tracing::info!(file = %path.display(), "inbound token file changed: the new token is in use");
                }
            }
            Ok(Err(problem)) if !failing => {
                failing = true;
                warn!(%problem, "inbound token file unusable: keeping the current token");
            }
            _ => {}
        }
    }
}

/// The upstream URI: the route's scheme and authority (when `absolute`), its base path, then
/// what of the client's target goes under it (`target`: normalised, its prefix cut), byte for
/// byte. The client's own authority is never used.
fn upstream_uri(
    upstream: &Upstream,
    sent: Option<&PathAndQuery>,
    target: &Target,
    absolute: bool,
) -> Result<Uri, ProxyError> {
    let sent_str = sent.map_or("/", PathAndQuery::as_str);
    if !sent_str.starts_with('/') {
        return Err(ProxyError::BadRequest(format!(
            "request target {sent_str:?} is not an absolute path"
        )));
    }
    let path_and_query = if upstream.base_path.is_empty() && target.as_sent() {
        sent.cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        let rest = target.rest(sent_str);
        let mut joined = String::with_capacity(upstream.base_path.len() + rest.len() + 1);
        joined.push_str(&upstream.base_path);
        if joined.is_empty() && !rest.starts_with('/') {
            joined.push('/');
        }
        joined.push_str(rest);
        PathAndQuery::try_from(joined)
            .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))?
    };
    if !absolute {
        return Ok(Uri::from(path_and_query));
    }
    let mut parts = Parts::default();
    parts.scheme = Some(upstream.scheme.clone());
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts)
        .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))
}

fn client_error(inner: &Inner, e: &hyper_util::client::legacy::Error) -> ProxyError {
    upstream_error(inner, e, e.is_connect())
}

fn pool_error(inner: &Inner, e: &pool::SendError) -> ProxyError {
    let connect = matches!(
        e,
        pool::SendError::Connect(_)
            | pool::SendError::ConnectTimeout(_)
            | pool::SendError::Tls(_)
            | pool::SendError::Http11Refused
    );
    upstream_error(inner, e, connect)
}

/// The proxy's answer to a failed exchange with the upstream; `connect` says whether the
/// connection could not be made at all. Names the forward proxy (never its credentials).
fn upstream_error(
    inner: &Inner,
    e: &(dyn std::error::Error + 'static),
    connect: bool,
) -> ProxyError {
    let url = &inner.upstream.url;
    let via = inner
        .proxy
        .as_ref()
        .map(|p| format!(" through forward proxy {}", p.uri()))
        .unwrap_or_default();
    use crate::errors::{cause_text, causes};
    if let Some(too_large) = causes(e).find_map(|c| c.downcast_ref::<BodyTooLarge>()) {
        return ProxyError::PayloadTooLarge(too_large.to_string());
    }
    let timed_out = std::iter::once(e).chain(causes(e)).any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || matches!(
                c.downcast_ref::<pool::SendError>(),
                Some(pool::SendError::ConnectTimeout(_))
            )
    });
    let cause = cause_text(e);
    let too_large = std::iter::once(e).chain(causes(e)).any(|c| {
        c.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
    });
    if too_large {
        return ProxyError::UpstreamUnavailable(format!(
            "upstream {url}{via} sent a response head too large: over {} bytes or {} fields",
            super::raw::MAX_HEAD,
            super::raw::MAX_HEADERS
        ));
    }
    if timed_out {
        return ProxyError::UpstreamTimeout(format!(
            "connecting to upstream {url}{via} timed out: {cause}"
        ));
    }
    let what = if connect {
        "could not connect to"
    } else {
        "lost the connection to"
    };
    ProxyError::UpstreamUnavailable(format!("{what} upstream {url}{via}: {cause}"))
}

/// An HTTP/1.1 request needs exactly one `Host` (`hosts` of them came), and must not have
/// come through this process before (`looped`).
fn admit_head(hosts: usize, http11: bool, looped: bool) -> Result<(), ProxyError> {
    if hosts > 1 || (hosts == 0 && http11) {
        return Err(ProxyError::BadRequest(format!(
            "an HTTP/1.1 request needs exactly one Host header, this one has {hosts}"
        )));
    }
    if looped {
        return Err(ProxyError::LoopDetected(
            "this request already passed through this token-proxy: the route's upstream leads back to it".into(),
        ));
    }
    Ok(())
}

/// About how many bytes `headers` took on the wire (`name: value` and CRLF each).
fn head_size(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

/// The authority a request addressed: `:authority` over HTTP/2, `Host` over HTTP/1.1.
fn client_authority(
    version: Version,
    uri: &Uri,
    headers: &http::HeaderMap,
) -> Option<http::HeaderValue> {
    if version == Version::HTTP_2 {
        if let Some(authority) = uri.authority() {
            return http::HeaderValue::from_str(authority.as_str()).ok();
        }
    }
    headers.get(HOST).cloned()
}

/// What [`ProxyService::admit`] looks at of a request head.
#[derive(Clone, Copy)]
struct Head<'a> {
    method: &'a Method,
    version: Version,
    uri: &'a Uri,
    headers: &'a http::HeaderMap,
}

/// Methods whose bodiless requests take the lean exchange: idempotent, so a request the
/// upstream's closing keep-alive connection lost may be sent again.
pub fn is_bodiless_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    )
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
        let sent = Target::default();
        let uri = upstream_uri(&up, Some(&pq), &sent, true).unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.cn/base/v1/items%2Fx?a=1&b=%20c&a=2"
        );
        let plain = upstream("http://127.0.0.1:9000");
        assert_eq!(
            upstream_uri(&plain, Some(&pq), &sent, true)
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9000/v1/items%2Fx?a=1&b=%20c&a=2"
        );
        assert_eq!(upstream_uri(&plain, None, &sent, true).unwrap().path(), "/");
        let star = PathAndQuery::from_static("*");
        assert!(upstream_uri(&plain, Some(&star), &sent, true).is_err());
        // A prefix cut: what is left goes under the base path, a bare query after a `/`.
        let graph = PathAndQuery::from_static("/graph?x=1");
        let cut = Target {
            normalised: None,
            cut: "/graph".len(),
        };
        assert_eq!(
            upstream_uri(&plain, Some(&graph), &cut, false).unwrap(),
            "/?x=1"
        );
        assert_eq!(
            upstream_uri(&up, Some(&graph), &cut, false).unwrap(),
            "/base?x=1"
        );
    }
}
