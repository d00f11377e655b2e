//! An embedded OAuth token endpoint and an echo API that checks its tokens: the `demo`
//! subcommand runs them behind the proxy, and the integration tests use them as the fake
//! identity provider and the fake upstream, so both exercise the same code.
//!
//! The token endpoint issues random tokens with a short lifetime and records every request.
//! The echo API answers 401 to any request without a current token (and counts it), and
//! otherwise echoes what crossed the wire as JSON, without the token itself. A few paths do
//! more: `…/download/N` streams N bytes, `…/status/N` answers status N, `…/trailers` answers
//! with trailers, `…/hop` answers with hop-by-hop headers, `…/slow/MS` waits before
//! answering, and `…/ws` switches protocols and echoes bytes.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::server;

/// The demo's client id.
pub const DEMO_CLIENT_ID: &str = "demo-client";
/// The demo's client secret (a demo value, printed nowhere).
pub const DEMO_CLIENT_SECRET: &str = "demo-secret-not-for-production";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type DemoBody = BoxBody<Bytes, BoxError>;

/// Boxes a body that cannot fail.
fn boxed<B>(body: B) -> DemoBody
where
    B: Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    body.map_err(|never| match never {}).boxed()
}

fn full(bytes: impl Into<Bytes>) -> DemoBody {
    boxed(Full::new(bytes.into()))
}

fn json_reply(status: StatusCode, value: serde_json::Value) -> Response<DemoBody> {
    let mut r = Response::new(full(serde_json::to_vec(&value).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Tokens the endpoint issued, with their real expiry, shared with the echo API.
#[derive(Default)]
pub struct IssuedTokens(Mutex<HashMap<String, Instant>>);

impl std::fmt::Debug for IssuedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedTokens")
            .field("count", &self.0.lock().map(|m| m.len()).unwrap_or(0))
            .finish()
    }
}

impl IssuedTokens {
    /// Issues a new token, current for `lifetime` (also for fake endpoints in tests).
    pub fn issue(&self, lifetime: Duration) -> String {
        let token = format!(
            "demo-{}",
            (0..40)
                .map(|_| fastrand::alphanumeric())
                .collect::<String>()
        );
        self.0
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now() + lifetime);
        token
    }

    /// Whether `token` was issued and is not yet expired.
    pub fn is_current(&self, token: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|exp| Instant::now() < *exp)
    }

    /// Forgets every token issued so far: the echo API answers `401` to them from now on.
    pub fn revoke_all(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Every token issued so far (tests look for them in logs).
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().keys().cloned().collect()
    }
}

/// One request the token endpoint received.
#[derive(Debug, Clone)]
pub struct TokenRequestRecord {
    /// Its headers.
    pub headers: HeaderMap,
    /// Its form fields, in order.
    pub form: Vec<(String, String)>,
}

/// A canned answer the token endpoint gives instead of a token.
#[derive(Debug, Clone)]
pub struct CannedResponse {
    /// Status.
    pub status: StatusCode,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
    /// `Retry-After` seconds, if any.
    pub retry_after: Option<u64>,
    /// More headers (e.g. `location` for a redirect).
    pub headers: Vec<(&'static str, String)>,
    /// Send the body this slowly: one byte per interval.
    pub drip: Option<Duration>,
}

impl CannedResponse {
    /// A canned answer with `status`, a body of `content_type` and nothing else.
    pub fn new(status: StatusCode, content_type: &'static str, body: impl Into<String>) -> Self {
        CannedResponse {
            status,
            content_type,
            body: body.into(),
            retry_after: None,
            headers: Vec::new(),
            drip: None,
        }
    }
}

/// The token endpoint's state and knobs.
#[derive(Debug)]
pub struct IdpState {
    /// Tokens issued.
    pub tokens: Arc<IssuedTokens>,
    lifetime: Mutex<Duration>,
    expires_in_as_string: AtomicBool,
    canned: Mutex<Option<CannedResponse>>,
    delay: Mutex<Duration>,
    requests: Mutex<Vec<TokenRequestRecord>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    client_secrets: Mutex<Vec<String>>,
    fail_every: AtomicUsize,
}

impl IdpState {
    /// Accept `secret` as the client secret from now on, and no other.
    pub fn set_client_secret(&self, secret: &str) {
        self.set_client_secrets(&[secret]);
    }
    /// Accept any of `secrets`, as Azure does while an app has two during a rotation.
    pub fn set_client_secrets(&self, secrets: &[&str]) {
        *self.client_secrets.lock().unwrap() = secrets.iter().map(|s| s.to_string()).collect();
    }
    /// Answer every `n`-th token request with `500` (0: never).
    pub fn set_fail_every(&self, n: usize) {
        self.fail_every.store(n, Ordering::SeqCst);
    }
    /// Lifetime of tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        *self.lifetime.lock().unwrap() = lifetime;
    }
    /// Send `expires_in` as a string, as some Azure endpoints do.
    pub fn set_expires_in_as_string(&self, yes: bool) {
        self.expires_in_as_string.store(yes, Ordering::SeqCst);
    }
    /// Answer every request with `canned` (or issue tokens again with `None`).
    pub fn set_canned(&self, canned: Option<CannedResponse>) {
        *self.canned.lock().unwrap() = canned;
    }
    /// Wait this long before answering.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }
    /// Every token request so far.
    pub fn requests(&self) -> Vec<TokenRequestRecord> {
        self.requests.lock().unwrap().clone()
    }
    /// Number of token requests so far.
    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
    /// Most token requests that were ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

/// A running demo server (token endpoint or echo API); stops when dropped.
#[derive(Debug)]
pub struct DemoServer<S> {
    addr: SocketAddr,
    state: Arc<S>,
    _stop: DropGuard,
}

impl<S> DemoServer<S> {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Its state and knobs.
    pub fn state(&self) -> &Arc<S> {
        &self.state
    }
}

/// The token endpoint URL of a running demo token endpoint.
pub fn token_url(idp: &DemoServer<IdpState>) -> String {
    format!("http://{}/oauth2/v2.0/token", idp.addr())
}

async fn start_server<S, F, Fut>(
    addr: SocketAddr,
    state: Arc<S>,
    handler: F,
) -> std::io::Result<DemoServer<S>>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, TaskTracker, Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<DemoBody>> + Send + 'static,
{
    let listener = server::bind(addr).await?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let handler = Arc::new(handler);
    let st = state.clone();
    let t = tasks.clone();
    let service = hyper::service::service_fn(move |req| {
        let fut = handler(st.clone(), t.clone(), req);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let service = SyncService(Arc::new(service));
    let limits = crate::config::ClientLimits {
        header_read_timeout: Duration::from_secs(30),
        max_header_bytes: 1024 * 1024,
        max_headers: 1000,
        max_connections: 100_000,
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    tokio::spawn(server::serve(
        listener,
        move |_| crate::server::Served {
            service: service.clone(),
            retire: CancellationToken::new(),
            front: None,
        },
        limits,
        permits,
        cancel.clone(),
        tasks,
        "demo",
    ));
    Ok(DemoServer {
        addr,
        state,
        _stop: cancel.drop_guard(),
    })
}

/// Makes a `service_fn` `Clone + Sync` for [`server::serve`].
struct SyncService<T>(Arc<T>);

impl<T> Clone for SyncService<T> {
    fn clone(&self) -> Self {
        SyncService(self.0.clone())
    }
}

impl<T: hyper::service::Service<Request<Incoming>>> hyper::service::Service<Request<Incoming>>
    for SyncService<T>
{
    type Response = T::Response;
    type Error = T::Error;
    type Future = T::Future;
    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.0.call(req)
    }
}

/// Starts the demo token endpoint on `addr` issuing tokens of `lifetime`.
pub async fn start_token_endpoint(
    addr: SocketAddr,
    lifetime: Duration,
) -> std::io::Result<DemoServer<IdpState>> {
    start_token_endpoint_with(addr, lifetime, Arc::default()).await
}

/// Starts the demo token endpoint recording its tokens in `tokens` (shared with an echo API
/// started earlier).
pub async fn start_token_endpoint_with(
    addr: SocketAddr,
    lifetime: Duration,
    tokens: Arc<IssuedTokens>,
) -> std::io::Result<DemoServer<IdpState>> {
    let state = Arc::new(IdpState {
        tokens,
        lifetime: Mutex::new(lifetime),
        expires_in_as_string: AtomicBool::new(false),
        canned: Mutex::new(None),
        delay: Mutex::new(Duration::ZERO),
        requests: Mutex::default(),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        client_secrets: Mutex::new(vec![DEMO_CLIENT_SECRET.into()]),
        fail_every: AtomicUsize::new(0),
    });
    start_server(addr, state, |state, _tasks, req| async move {
        token_endpoint(&state, req).await
    })
    .await
}

async fn token_endpoint(state: &IdpState, req: Request<Incoming>) -> Response<DemoBody> {
    let now_in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state
        .max_in_flight
        .fetch_max(now_in_flight, Ordering::SeqCst);
    let response = token_answer(state, req).await;
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

async fn token_answer(state: &IdpState, req: Request<Incoming>) -> Response<DemoBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let number = {
        let mut requests = state.requests.lock().unwrap();
        requests.push(TokenRequestRecord {
            headers: parts.headers.clone(),
            form: form.clone(),
        });
        requests.len()
    };
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let every = state.fail_every.load(Ordering::SeqCst);
    if every > 0 && number % every == 0 {
        return json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "server_error", "error_description": "scripted failure"}),
        );
    }
    if let Some(c) = state.canned.lock().unwrap().clone() {
        let body = match c.drip {
            Some(interval) => boxed(DripBody {
                data: Bytes::from(c.body),
                interval,
                sleep: None,
            }),
            None => full(c.body),
        };
        let mut r = Response::new(body);
        for (name, value) in &c.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                r.headers_mut().insert(*name, v);
            }
        }
        *r.status_mut() = c.status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(c.content_type));
        if let Some(s) = c.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        return r;
    }
    if parts.method != Method::POST {
        return json_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "invalid_request", "error_description": "POST only"}),
        );
    }
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if field("grant_type") != Some("client_credentials") {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type", "error_description": "AADSTS70003: grant_type must be client_credentials", "error_codes": [70003]}),
        );
    }
    let (id, secret) = match parts.headers.get(AUTHORIZATION).and_then(basic_credentials) {
        Some(pair) => pair,
        None => (
            field("client_id").unwrap_or("").to_string(),
            field("client_secret").unwrap_or("").to_string(),
        ),
    };
    let known = state.client_secrets.lock().unwrap().contains(&secret);
    if id != DEMO_CLIENT_ID || !known {
        return json_reply(
            StatusCode::UNAUTHORIZED,
            json!({
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                "error_codes": [7000215],
                "trace_id": "00000000-demo-trace",
                "correlation_id": "00000000-demo-correlation",
            }),
        );
    }
    let lifetime = *state.lifetime.lock().unwrap();
    let token = state.tokens.issue(lifetime);
    let secs = lifetime.as_secs().max(1);
    let expires_in = if state.expires_in_as_string.load(Ordering::SeqCst) {
        json!(secs.to_string())
    } else {
        json!(secs)
    };
    json_reply(
        StatusCode::OK,
        json!({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in, "access_token": token}),
    )
}

/// `(id, secret)` from `Basic base64(urlencode(id):urlencode(secret))`.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let b64 = value.to_str().ok()?.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((decode(id)?, decode(secret)?))
}

/// One request the echo API received (after the proxy).
#[derive(Debug, Clone)]
pub struct EchoRecord {
    /// Method.
    pub method: Method,
    /// HTTP version it arrived with.
    pub version: http::Version,
    /// Path and query, exactly as received.
    pub target: String,
    /// The authority the request named: HTTP/2's `:authority`, else `Host`.
    pub authority: String,
    /// Headers, as received (the `authorization` value included: tests compare it).
    pub headers: HeaderMap,
    /// Body bytes received.
    pub body_bytes: u64,
    /// Whether the token was current when the request arrived.
    pub token_was_current: bool,
}

/// The echo API's state.
#[derive(Debug)]
pub struct EchoState {
    tokens: Arc<IssuedTokens>,
    records: Mutex<Vec<EchoRecord>>,
    keep_records: AtomicBool,
    served: AtomicUsize,
    rejected: AtomicUsize,
    in_flight: AtomicUsize,
}

impl EchoState {
    /// Keep a record of every request (the default), or only count them (long load tests).
    pub fn set_keep_records(&self, keep: bool) {
        self.keep_records.store(keep, Ordering::SeqCst);
    }
    /// Requests answered with a current token.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
    fn record(&self, record: EchoRecord) {
        if self.keep_records.load(Ordering::SeqCst) {
            self.records.lock().unwrap().push(record);
        }
    }
    /// Every request received.
    pub fn records(&self) -> Vec<EchoRecord> {
        self.records.lock().unwrap().clone()
    }
    /// Requests refused for a missing, unknown or expired token.
    pub fn rejected(&self) -> usize {
        self.rejected.load(Ordering::SeqCst)
    }
    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// Starts the echo API on `addr`, accepting the tokens in `tokens`.
pub async fn start_echo_api(
    addr: SocketAddr,
    tokens: Arc<IssuedTokens>,
) -> std::io::Result<DemoServer<EchoState>> {
    let state = Arc::new(EchoState {
        tokens,
        records: Mutex::default(),
        keep_records: AtomicBool::new(true),
        served: AtomicUsize::new(0),
        rejected: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
    });
    start_server(addr, state, |state, tasks, req| async move {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        let r = echo(&state, &tasks, req).await;
        state.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    })
    .await
}

async fn echo(
    state: &EchoState,
    tasks: &TaskTracker,
    mut req: Request<Incoming>,
) -> Response<DemoBody> {
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let current = state.tokens.is_current(token);
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let mut record = EchoRecord {
        method: req.method().clone(),
        version: req.version(),
        target: target.clone(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        headers: req.headers().clone(),
        body_bytes: 0,
        token_was_current: current,
    };
    if !current {
        state.rejected.fetch_add(1, Ordering::SeqCst);
        state.record(record);
        return json_reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_token", "message": "missing, unknown or expired bearer token"}),
        );
    }
    state.served.fetch_add(1, Ordering::SeqCst);
    let mut segments = path.rsplit('/');
    let last = segments.next().unwrap_or("");
    let before = segments.next().unwrap_or("");

    if last == "ws" && req.headers().contains_key(UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tasks.spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        state.record(record);
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        return r;
    }

    // Consume the body frame by frame: large uploads stay out of memory.
    let mut body = req.into_body();
    let mut trailers = serde_json::Map::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        match frame.into_data() {
            Ok(data) => record.body_bytes += data.len() as u64,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    for (k, v) in &t {
                        trailers.insert(k.to_string(), json!(v.to_str().unwrap_or("")));
                    }
                }
            }
        }
    }
    let body_bytes = record.body_bytes;
    let headers: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|(k, v)| {
            let shown = if k == AUTHORIZATION {
                "Bearer <a current token>"
            } else {
                v.to_str().unwrap_or("<binary>")
            };
            (k.to_string(), json!(shown))
        })
        .collect();
    let method = record.method.to_string();
    state.record(record);

    match (before, last) {
        ("download", n) if n.parse::<u64>().is_ok() => {
            let mut r = Response::new(boxed(RepeatBody::new(n.parse().unwrap_or(0))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        ("status", n) if n.parse::<u16>().is_ok() => {
            let status = StatusCode::from_u16(n.parse().unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = json_reply(status, json!({"status": status.as_u16()}));
            if status.is_redirection() {
                r.headers_mut().insert(
                    "location",
                    HeaderValue::from_static("http://elsewhere.invalid/next"),
                );
            }
            r
        }
        ("slow", ms) if ms.parse::<u64>().is_ok() => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            json_reply(StatusCode::OK, json!({"slept_ms": ms}))
        }
        ("reset", n) if n.parse::<u64>().is_ok() => {
            let n: u64 = n.parse().unwrap_or(0);
            let body = BrokenBody {
                remaining: n,
                advertised: n * 2,
                pause: None,
            }
            .map_err(|e| Box::new(e) as BoxError)
            .boxed();
            Response::new(body)
        }
        (_, "bad101") => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert(UPGRADE, HeaderValue::from_static("websocket"));
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            r
        }
        (_, "hop") => {
            // Hop-by-hop headers the proxy must not pass on to its client.
            let mut r = json_reply(StatusCode::OK, json!({"hop": true}));
            let h = r.headers_mut();
            h.insert(CONNECTION, HeaderValue::from_static("x-upstream-hop"));
            h.insert("x-upstream-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(
                "proxy-authenticate",
                HeaderValue::from_static("Basic realm=x"),
            );
            h.insert("x-end-to-end", HeaderValue::from_static("kept"));
            r
        }
        (_, "trailers") => {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", HeaderValue::from_static("abc123"));
            let frames = VecDeque::from([
                Frame::data(Bytes::from_static(b"body with trailers")),
                Frame::trailers(t),
            ]);
            let mut r = Response::new(boxed(FramesBody(frames)));
            r.headers_mut()
                .insert("trailer", HeaderValue::from_static("x-checksum"));
            r
        }
        _ => json_reply(
            StatusCode::OK,
            json!({"method": method, "target": target, "headers": headers, "body_bytes": body_bytes, "trailers": trailers}),
        ),
    }
}

/// A body of `remaining` bytes in 64 KiB chunks, produced as it is read (no buffering).
#[derive(Debug)]
pub struct RepeatBody {
    remaining: u64,
    chunk: Bytes,
}

impl RepeatBody {
    /// A body of `len` bytes of `x`.
    pub fn new(len: u64) -> Self {
        RepeatBody {
            remaining: len,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A body sent one byte per `interval` (a slow-drip server).
struct DripBody {
    data: Bytes,
    interval: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for DripBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.data.is_empty() {
            return Poll::Ready(None);
        }
        let interval = self.interval;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        let byte = self.data.split_to(1);
        Poll::Ready(Some(Ok(Frame::data(byte))))
    }
}

/// A body that sends `remaining` bytes, pauses (so they reach the client) and then fails:
/// the server resets mid-body.
struct BrokenBody {
    remaining: u64,
    advertised: u64,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for BrokenBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.remaining == 0 {
            let pause = self
                .pause
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(200))));
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(Some(Err(std::io::Error::other("scripted reset"))));
        }
        let n = self.remaining.min(16 * 1024);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'r'; n as usize])))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.advertised)
    }
}

/// A body made of the given frames (data, then trailers).
struct FramesBody(VecDeque<Frame<Bytes>>);

impl Body for FramesBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// The demo's config: one credential on the embedded endpoint, one route to the echo API.
/// A non-loopback `listen` is allowed: the demo's tokens guard nothing.
pub fn demo_config(
    token_url: &str,
    upstream: SocketAddr,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> String {
    let remote = if listen.ip().is_loopback() {
        ""
    } else {
        "allow_remote = true"
    };
    let admin_remote = if admin_listen.ip().is_loopback() {
        ""
    } else {
        "admin_allow_remote = true"
    };
    format!(
        r#"
admin_listen = "{admin_listen}"
{admin_remote}

[credentials.demo]
token_url = "{token_url}"
client_id = "{DEMO_CLIENT_ID}"
client_secret = "{DEMO_CLIENT_SECRET}"
scope = "api://demo/.default"
extra_params = {{ Type = "oauth2" }}

[[routes]]
name = "demo"
listen = "{listen}"
upstream = "http://{upstream}/api"
credential = "demo"
{remote}
"#
    )
}
