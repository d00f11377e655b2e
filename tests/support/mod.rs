//! Test support: the fake token endpoint and upstream (the demo's own servers) on
//! `127.0.0.1:0`, the proxy started in-process or as the real binary, and small HTTP clients.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use token_proxy::app::{self, Running};
use token_proxy::config::Config;
use token_proxy::demo::{
    self, DemoServer, EchoState, IdpState, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET,
};

pub mod tls;

pub const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// The fake identity provider, issuing tokens of `lifetime`.
pub async fn start_token_endpoint(lifetime: Duration) -> DemoServer<IdpState> {
    demo::start_token_endpoint(LOOPBACK, lifetime)
        .await
        .expect("start token endpoint")
}

/// The fake upstream API, accepting the tokens `idp` issued.
pub async fn start_upstream(idp: &DemoServer<IdpState>) -> DemoServer<EchoState> {
    demo::start_echo_api(LOOPBACK, idp.state().tokens.clone())
        .await
        .expect("start upstream")
}

/// A credential table named `name` on `idp`, plus `extra` lines.
pub fn credential(name: &str, token_url: &str, extra: &str) -> String {
    format!(
        "[credentials.{name}]\ntoken_url = \"{token_url}\"\nclient_id = \"{DEMO_CLIENT_ID}\"\nclient_secret = \"{DEMO_CLIENT_SECRET}\"\n{extra}\n"
    )
}

/// A route on `127.0.0.1:0` to `upstream` with `credential`, plus `extra` lines.
pub fn route(upstream: &str, credential: &str, extra: &str) -> String {
    format!("[[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\ncredential = \"{credential}\"\n{extra}\n")
}

/// Starts the proxy in-process on the config `text`.
pub async fn start_proxy(text: &str) -> Running {
    let config = Config::parse(text, "test.toml", &|_| None).expect("valid test config");
    app::start(&config).await.expect("proxy starts")
}

/// The usual setup: IdP with `lifetime` tokens, upstream under `/api`, proxy between.
pub struct Stack {
    pub idp: DemoServer<IdpState>,
    pub api: DemoServer<EchoState>,
    pub proxy: Running,
}

impl Stack {
    pub async fn start(lifetime: Duration, cred_extra: &str, route_extra: &str) -> Stack {
        Stack::start_with("", lifetime, cred_extra, route_extra).await
    }

    /// As [`Stack::start`], with top-level config lines `top` (limits, timeouts).
    pub async fn start_with(
        top: &str,
        lifetime: Duration,
        cred_extra: &str,
        route_extra: &str,
    ) -> Stack {
        let idp = start_token_endpoint(lifetime).await;
        let api = start_upstream(&idp).await;
        let text = format!(
            "admin_listen = \"127.0.0.1:0\"\n{top}\n{}{}",
            credential("api", &demo::token_url(&idp), cred_extra),
            route(&format!("http://{}/api", api.addr()), "api", route_extra)
        );
        let proxy = start_proxy(&text).await;
        Stack { idp, api, proxy }
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.route_addrs()[0]
    }

    pub fn admin(&self) -> SocketAddr {
        self.proxy.admin_addr().expect("admin configured")
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `req` with `client` and reads the whole reply.
pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("reply within 20 s")
        .expect("request succeeds");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET `path` from `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap();
    send(&client(), req).await
}

/// Writes `request` on a fresh connection and reads until the server closes or `wait` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `GET path` on a kept-alive connection and reads one whole answer (a sized body):
/// head and body, as text; nothing more may follow it.
pub async fn answer_on(conn: &mut tokio::net::TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let (answer, rest) = read_answer(conn, false).await;
    assert!(rest.is_empty(), "one answer, nothing more: {answer}{rest}");
    answer
}

/// Reads one answer from `conn`: the head and its `Content-Length` body (none after a `HEAD`,
/// `to_head`, or for 204 and 304), as text, and any bytes read after it. Panics after 5 s
/// or if the connection closes first.
pub async fn read_answer(conn: &mut tokio::net::TcpStream, to_head: bool) -> (String, String) {
    let mut wire = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = wire.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&wire[..end + 4]).to_ascii_lowercase();
            let len: usize = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            let bodiless =
                to_head || head.starts_with("http/1.1 204") || head.starts_with("http/1.1 304");
            let len = if bodiless { 0 } else { len };
            if wire.len() >= end + 4 + len {
                let (answer, rest) = wire.split_at(end + 4 + len);
                return (
                    String::from_utf8_lossy(answer).into_owned(),
                    String::from_utf8_lossy(rest).into_owned(),
                );
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&wire));
        wire.extend_from_slice(&buf[..n]);
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// Polls the async `check` every 20 ms until it holds or `limit` passes.
pub async fn eventually_async<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check().await
}

/// Awaits `fut`, failing the test (naming `what`) if it takes more than 10 s: a socket read
/// in a test must fail, never hang.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10 s"))
}

/// Reads `conn` until the peer closes it (a reset counts), failing the test after `limit`;
/// how long the close took and the bytes read before it.
pub async fn expect_closed(conn: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + limit, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), read),
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "still open after {limit:?}; read {:?}",
                String::from_utf8_lossy(&read)
            ),
        }
    }
}

/// A loopback address for a listener that must be named before it is bound (several routes
/// sharing one listener, a route kept across a reload, a child process's listener), or one
/// where nothing listens. Each call gives a different address in `127.0.0.0/8` (Linux answers
/// on all of it), on a port below the kernel's ephemeral range (32768 and up), so that neither
/// another call nor a port the kernel hands out for `bind(0)` or `connect` can take it.
/// Where the address need not be known first, bind `127.0.0.1:0` and ask the listener.
pub fn fresh_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // The process id and a counter pick the address: no two calls, in this process or in
    // another test binary running at the same time, share one.
    let n = ((std::process::id() % 2048) << 12) | (NEXT.fetch_add(1, Ordering::Relaxed) % 4096);
    let [_, a, b, c] = n.to_be_bytes();
    let ip = std::net::Ipv4Addr::new(127, 100 + a, b, c);
    let port = 20_000 + fastrand::u16(..10_000);
    SocketAddr::new(ip.into(), port)
}

/// Writes `text` to a fresh file under the system temp dir and returns its path.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "token-proxy-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The token-proxy binary under test.
pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_token-proxy"))
}

/// A running token-proxy process, killed when dropped.
pub struct Process {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Process {
    /// Starts `token-proxy run --config FILE` with `RUST_LOG` set, stderr to a file.
    pub fn run(config: &std::path::Path, rust_log: &str) -> Process {
        Process::run_with(config, rust_log, &[])
    }

    /// As [`Process::run`], with extra environment variables.
    pub fn run_with(config: &std::path::Path, rust_log: &str, envs: &[(&str, &str)]) -> Process {
        Process::run_args(config, &[], rust_log, envs)
    }

    /// As [`Process::run_with`], with global options `args` before `run`.
    pub fn run_args(
        config: &std::path::Path,
        args: &[&str],
        rust_log: &str,
        envs: &[(&str, &str)],
    ) -> Process {
        let stderr_path = config.with_extension("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = binary()
            .args(args)
            .args(["run", "--config"])
            .arg(config)
            .envs(envs.iter().copied())
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn token-proxy");
        Process { child, stderr_path }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        field_kib(&status, "VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        field_kib(&status, "VmRSS:")
    }
}

fn field_kib(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_listening(addr: SocketAddr, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} did not start listening within {limit:?}");
}

pub type Shared<T> = Arc<T>;

/// A real forward proxy on loopback (Debian's `tinyproxy`), with Basic credentials, killed
/// when dropped. Its log shows each request line it forwarded.
pub struct ForwardProxy {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

pub const PROXY_USER: &str = "tp-user";
pub const PROXY_PASSWORD: &str = "proxy-pw-never-logged";

impl ForwardProxy {
    pub async fn start() -> ForwardProxy {
        let addr = fresh_addr();
        let log = temp_file("tinyproxy.log", "");
        let conf = temp_file(
            "tinyproxy.conf",
            &format!(
                "Port {}\nListen {}\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 200\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n",
                addr.port(),
                addr.ip(),
                log.display()
            ),
        );
        let child = Command::new("tinyproxy")
            .args(["-d", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (apt-get install -y tinyproxy)");
        wait_listening(addr, Duration::from_secs(10)).await;
        ForwardProxy { child, addr, log }
    }

    /// `http://user:password@127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{}", self.addr)
    }

    /// The request lines the proxy logged.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("]: Request (file descriptor ").map(|(_, r)| r))
            .filter_map(|r| r.split_once("): ").map(|(_, line)| line.to_string()))
            .collect()
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a [`ScriptedUpstream`] does in answer to one request, step by step.
#[derive(Clone)]
pub enum Step {
    /// Writes these bytes (each step is its own `write`).
    Write(Vec<u8>),
    /// Waits until the test notifies this.
    Wait(Arc<tokio::sync::Notify>),
    /// Tells the test this point was reached.
    Signal(Arc<tokio::sync::Notify>),
    /// Reads until the proxy closes the connection (or 5 s pass), then tells the test.
    UntilClosed(Arc<tokio::sync::Notify>),
    /// Closes the connection.
    Close,
}

/// A request as a [`ScriptedUpstream`] read it off the wire.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which accepted connection it came on (0, 1, ...).
    pub conn: usize,
    /// Which request of that connection it is (0, 1, ...).
    pub nth: usize,
    pub method: String,
    pub target: String,
    /// The head as sent, lines and all.
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Seen {
    /// The values of the header `name` (case-insensitive), in order.
    pub fn header(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }
}

/// `HTTP/1.1 200 OK` with a body naming the request's target (`path=/x`).
pub fn names_the_target(seen: &Seen) -> Vec<Step> {
    let body = format!("path={}", seen.target);
    vec![Step::Write(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )]
}

/// A raw HTTP/1.1 upstream on `127.0.0.1:0` for wire tests: it reads each request (the head,
/// then a body framed by `Content-Length` or chunked), records it, and answers with the steps
/// its script gives for it. It runs until dropped.
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

type Script = dyn Fn(&Seen) -> Vec<Step> + Send + Sync;

impl ScriptedUpstream {
    pub async fn start(script: impl Fn(&Seen) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            for n in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve_scripted(stream, n, script.clone(), record.clone()));
            }
        });
        ScriptedUpstream { addr, seen, task }
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_scripted(
    mut stream: TcpStream,
    conn: usize,
    script: Arc<Script>,
    record: Arc<std::sync::Mutex<Vec<Seen>>>,
) {
    let mut buf = Vec::new();
    for nth in 0.. {
        let Some(mut seen) = read_request(&mut stream, &mut buf, conn).await else {
            return;
        };
        seen.nth = nth;
        record.lock().unwrap().push(seen.clone());
        for step in script(&seen) {
            match step {
                Step::Write(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Step::Wait(n) => n.notified().await,
                Step::Signal(n) => n.notify_one(),
                Step::UntilClosed(n) => {
                    let mut sink = [0u8; 1024];
                    let closed = tokio::time::timeout(Duration::from_secs(5), async {
                        while matches!(stream.read(&mut sink).await, Ok(k) if k > 0) {}
                    });
                    if closed.await.is_ok() {
                        n.notify_one();
                    }
                    return;
                }
                Step::Close => return,
            }
        }
    }
}

/// Reads one request from `stream` (`buf` holds bytes read ahead); `None` at the end.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>, conn: usize) -> Option<Seen> {
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        fill(stream, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut line = head.split(' ');
    let method = line.next().unwrap_or_default().to_string();
    let target = line.next().unwrap_or_default().to_string();
    let mut seen = Seen {
        conn,
        nth: 0,
        method,
        target,
        head,
        body: Vec::new(),
    };
    let chunked = seen
        .header("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(stream, buf).await?;
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers (ignored) up to the empty line.
                loop {
                    if buf.starts_with(b"\r\n") {
                        buf.drain(..2);
                        return Some(seen);
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        return Some(seen);
                    }
                    fill(stream, buf).await?;
                }
            }
            while buf.len() < size + 2 {
                fill(stream, buf).await?;
            }
            seen.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let length: usize = seen
        .header("content-length")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < length {
        fill(stream, buf).await?;
    }
    seen.body = buf.drain(..length).collect();
    Some(seen)
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

/// A proxy with one route to `upstream` (under `/base`), on a fake token endpoint issuing
/// tokens of `lifetime`; `route_extra` adds route keys.
pub async fn proxy_to_scripted(
    upstream: SocketAddr,
    lifetime: Duration,
    route_extra: &str,
) -> (DemoServer<IdpState>, Running) {
    let idp = start_token_endpoint(lifetime).await;
    let text = format!(
        "{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route(&format!("http://{upstream}/base"), "api", route_extra)
    );
    let proxy = start_proxy(&text).await;
    (idp, proxy)
}

/// A fake Azure managed identity endpoint on loopback that keeps the real rules: IMDS
/// (`Metadata: true` required, `X-Forwarded-For` refused, `api-version=2018-02-01`, `expires_in`
/// as a string) or App Service (`X-IDENTITY-HEADER` required, `api-version=2019-08-01`, only
/// `expires_on`). An unknown user-assigned identity gets `400`. Its tokens are current for the
/// echo API built on [`FakeIdentity::tokens`].
pub struct FakeIdentity {
    pub addr: SocketAddr,
    pub tokens: Arc<demo::IssuedTokens>,
    state: Arc<std::sync::Mutex<IdentityState>>,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`FakeIdentity`] was asked, and how it answers.
#[derive(Default)]
pub struct IdentityState {
    /// Each request's query string and headers, in order.
    pub requests: Vec<(String, HeaderMap)>,
    /// Statuses to answer first, one per request (`410` while IMDS starts, `429`, `500`).
    pub fail_first: std::collections::VecDeque<u16>,
    /// The user-assigned identities known (`client_id`, `object_id` or `msi_res_id` values).
    pub known: Vec<String>,
    /// App Service mode: the `X-IDENTITY-HEADER` value required.
    pub app_service_header: Option<String>,
}

impl FakeIdentity {
    pub async fn start(app_service_header: Option<&str>, known: &[&str]) -> FakeIdentity {
        let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tokens = Arc::new(demo::IssuedTokens::default());
        let state = Arc::new(std::sync::Mutex::new(IdentityState {
            known: known.iter().map(|s| s.to_string()).collect(),
            app_service_header: app_service_header.map(str::to_owned),
            ..Default::default()
        }));
        let (t, s) = (tokens.clone(), state.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (t, s) = (t.clone(), s.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let answer = identity_answer(&req, &t, &s);
                        async move { Ok::<_, std::convert::Infallible>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeIdentity {
            addr,
            tokens,
            state,
            task,
        }
    }

    /// The IMDS path on this endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/metadata/identity/oauth2/token", self.addr)
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, IdentityState> {
        self.state.lock().unwrap()
    }
}

impl Drop for FakeIdentity {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn identity_answer(
    req: &Request<hyper::body::Incoming>,
    tokens: &demo::IssuedTokens,
    state: &std::sync::Mutex<IdentityState>,
) -> http::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let refuse = |status: u16, description: &str| {
        reply(
            status,
            format!("{{\"error\":\"invalid_request\",\"error_description\":\"{description}\"}}"),
        )
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let mut state = state.lock().unwrap();
    state.requests.push((query.clone(), req.headers().clone()));
    let params: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
    let app_service = state.app_service_header.clone();
    if req.method() != http::Method::GET {
        return refuse(405, "GET only");
    }
    match &app_service {
        None => {
            if req.headers().get("metadata").map(|v| v.as_bytes()) != Some(b"true") {
                return refuse(400, "Required metadata header not specified");
            }
            if req.headers().contains_key("x-forwarded-for") {
                return refuse(400, "Request contains X-Forwarded-For header");
            }
            if params.get("api-version").map(String::as_str) != Some("2018-02-01") {
                return refuse(400, "Missing or unsupported api-version");
            }
        }
        Some(secret) => {
            let sent = req.headers().get("x-identity-header").map(|v| v.as_bytes());
            if sent != Some(secret.as_bytes()) {
                return refuse(401, "X-IDENTITY-HEADER missing or wrong");
            }
            if params.get("api-version").map(String::as_str) != Some("2019-08-01") {
                return refuse(400, "Missing or unsupported api-version");
            }
        }
    }
    let Some(resource) = params.get("resource") else {
        return refuse(400, "Required audience parameter not specified");
    };
    let named = [
        "client_id",
        "object_id",
        "msi_res_id",
        "principal_id",
        "mi_res_id",
    ]
    .iter()
    .find_map(|p| params.get(*p));
    if let Some(id) = named {
        if !state.known.contains(id) {
            return refuse(400, "Identity not found");
        }
    }
    if let Some(status) = state.fail_first.pop_front() {
        return refuse(status, "try again");
    }
    // App Service's tokens here last 30 minutes, IMDS's an hour: a lifetime read from the
    // wrong field shows.
    let lifetime = if app_service.is_some() { 1800 } else { 3600 };
    let token = tokens.issue(Duration::from_secs(lifetime));
    let expires_on = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + lifetime;
    let body = match app_service {
        None => format!(
            "{{\"access_token\":\"{token}\",\"expires_in\":\"3599\",\"expires_on\":\"{expires_on}\",\"resource\":\"{resource}\",\"token_type\":\"Bearer\"}}"
        ),
        Some(_) => format!(
            "{{\"access_token\":\"{token}\",\"expires_on\":\"{expires_on}\",\"resource\":\"{resource}\",\"token_type\":\"Bearer\"}}"
        ),
    };
    reply(200, body)
}
