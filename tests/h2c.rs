//! Clients speaking HTTP/2 in the clear (h2c, prior knowledge) to a route: the front door's
//! own HTTP/2 side serves them (`proxy::front_h2`), its lean path for bodiless requests and
//! the general path for the rest. The same rules hold as over HTTP/1.1 (`tests/proxy.rs`):
//! what reaches the upstream, what reaches the client, the errors, and the end of a stream
//! the client gives up on.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use token_proxy::demo;

const LIFETIME: Duration = Duration::from_secs(60);

/// One HTTP/2 connection to `addr`: every request sent on it shares it.
async fn connect(addr: std::net::SocketAddr) -> SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl Answer {
    /// The head has a `content-length` that is the body's, and a `date`.
    fn has_length_and_date(&self) {
        let length = self
            .headers
            .get("content-length")
            .map(|v| v.to_str().unwrap());
        assert_eq!(
            length,
            Some(self.body.len().to_string().as_str()),
            "{:?}",
            self.headers
        );
        assert!(self.headers.contains_key("date"), "{:?}", self.headers);
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

async fn exchange(send: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Answer {
    let response = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("an answer within 10 s")
        .expect("the request is answered");
    let (parts, body) = response.into_parts();
    let collected = within("the whole body", body.collect())
        .await
        .expect("the whole body");
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

fn get(s: &Stack, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{}{path}", s.addr()))
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_get_reaches_the_upstream_as_over_http11() {
    let s = Stack::start(LIFETIME, "", "").await;
    let mut send = connect(s.addr()).await;
    let req = Request::get(format!(
        "http://{}/v1/items%2Fx;p=1?q=a%20b&x=%ZZ",
        s.addr()
    ))
    .header("authorization", "Bearer client-supplied")
    .header("x-end-to-end", "yes")
    .header("te", "trailers")
    .header("cookie", "a=1")
    .header("cookie", "b=2")
    .body(Full::default())
    .unwrap();
    let answer = exchange(&mut send, req).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let records = s.api.state().records();
    assert_eq!(records.len(), 1);
    let rec = &records[0];
    assert_eq!(rec.method, "GET");
    assert_eq!(rec.target, "/api/v1/items%2Fx;p=1?q=a%20b&x=%ZZ");
    let auth: Vec<_> = rec.headers.get_all("authorization").iter().collect();
    assert_eq!(
        auth.len(),
        1,
        "exactly one Authorization reaches the upstream"
    );
    let token = auth[0].to_str().unwrap().strip_prefix("Bearer ").unwrap();
    assert!(s.idp.state().tokens.all().contains(&token.to_string()));
    assert_eq!(rec.headers["host"], s.api.addr().to_string());
    assert_eq!(rec.headers["x-end-to-end"], "yes");
    // Cookie crumbs go to an HTTP/1.1 upstream as one field (RFC 9113 §8.2.3).
    assert_eq!(rec.headers.get_all("cookie").iter().count(), 1);
    assert_eq!(rec.headers["cookie"], "a=1; b=2");
    // The client's answer is framed by its stream: a length, a date, no HTTP/1.1 framing.
    answer.has_length_and_date();
    assert!(!answer.headers.contains_key("transfer-encoding"));
    assert_eq!(
        answer.json()["target"],
        "/api/v1/items%2Fx;p=1?q=a%20b&x=%ZZ"
    );
}

#[tokio::test]
async fn hop_by_hop_fields_of_the_upstream_do_not_reach_the_client() {
    let s = Stack::start(LIFETIME, "", "").await;
    let mut send = connect(s.addr()).await;
    let answer = exchange(&mut send, get(&s, "/hop")).await;
    assert_eq!(answer.status, StatusCode::OK);
    for name in [
        "connection",
        "x-upstream-hop",
        "keep-alive",
        "proxy-authenticate",
    ] {
        assert!(
            !answer.headers.contains_key(name),
            "{name} reached the client: {:?}",
            answer.headers
        );
    }
    assert_eq!(answer.headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn head_answers_the_length_without_a_body_and_trailers_pass() {
    let s = Stack::start(LIFETIME, "", "").await;
    let mut send = connect(s.addr()).await;
    let req = Request::head(format!("http://{}/download/1000", s.addr()))
        .body(Full::default())
        .unwrap();
    let answer = exchange(&mut send, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-length"], "1000");
    assert!(answer.body.is_empty());
    // Trailers pass, for a client that takes them (the upstream here sends them only then).
    let req = Request::get(format!("http://{}/trailers", s.addr()))
        .header("te", "trailers")
        .body(Full::default())
        .unwrap();
    let answer = exchange(&mut send, req).await;
    assert_eq!(answer.body, "body with trailers");
    let trailers = answer.trailers.expect("trailers");
    assert_eq!(trailers["x-checksum"], "abc123");
    // A large body, through the client's windows.
    let answer = exchange(&mut send, get(&s, "/download/300000")).await;
    assert_eq!(answer.body.len(), 300_000);
}

#[tokio::test]
async fn bodies_and_other_methods_take_the_general_path_on_the_same_connection() {
    let s = Stack::start(LIFETIME, "", "").await;
    let mut send = connect(s.addr()).await;
    let body = vec![b'u'; 200_000];
    let req = Request::put(format!("http://{}/upload", s.addr()))
        .header("authorization", "Bearer nope")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let answer = exchange(&mut send, req).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let json = answer.json();
    assert_eq!(
        (json["method"].as_str(), json["body_bytes"].as_u64()),
        (Some("PUT"), Some(200_000))
    );
    let answer = exchange(&mut send, get(&s, "/after")).await;
    assert_eq!(answer.json()["target"], "/api/after");
    let records = s.api.state().records();
    assert_eq!(records.len(), 2);
    for rec in &records {
        assert_eq!(rec.headers.get_all("authorization").iter().count(), 1);
        assert_eq!(rec.headers["host"], s.api.addr().to_string());
    }
}

/// A `GET` with a body is not a bodiless request: its body reaches the upstream (the lean
/// path, which takes bodiless streams only, would leave it behind).
#[tokio::test]
async fn a_get_with_a_body_keeps_its_body() {
    let s = Stack::start(LIFETIME, "", "").await;
    let mut send = connect(s.addr()).await;
    let req = Request::get(format!("http://{}/query", s.addr()))
        .body(Full::new(Bytes::from_static(b"{\"q\":1}")))
        .unwrap();
    let answer = exchange(&mut send, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    assert_eq!(
        (json["method"].as_str(), json["body_bytes"].as_u64()),
        (Some("GET"), Some(7))
    );
}

#[tokio::test]
async fn concurrent_streams_each_get_their_own_answer() {
    let s = Stack::start(LIFETIME, "", "").await;
    let send = connect(s.addr()).await;
    let addr = s.addr();
    let mut all = Vec::new();
    for i in 0..60 {
        let mut send = send.clone();
        all.push(tokio::spawn(async move {
            let req = if i % 3 == 0 {
                Request::post(format!("http://{addr}/post/{i}"))
                    .body(Full::new(Bytes::from(vec![b'p'; i * 100])))
                    .unwrap()
            } else {
                Request::get(format!("http://{addr}/get/{i}"))
                    .body(Full::default())
                    .unwrap()
            };
            let answer = exchange(&mut send, req).await;
            assert_eq!(answer.status, StatusCode::OK);
            let json = answer.json();
            if i % 3 == 0 {
                assert_eq!(json["target"], format!("/api/post/{i}"));
                assert_eq!(json["body_bytes"], i * 100);
            } else {
                assert_eq!(json["target"], format!("/api/get/{i}"));
            }
        }));
    }
    for t in all {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn errors_are_json_on_their_stream_and_the_connection_serves_on() {
    let idp = start_token_endpoint(LIFETIME).await;
    let api = start_upstream(&idp).await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let text = format!(
        "max_header_bytes = 8192\n{}{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route(&format!("http://{dead_addr}"), "api", ""),
        route(
            &format!("http://{}", api.addr()),
            "api",
            "response_timeout_secs = 0.3"
        )
    );
    let proxy = start_proxy(&text).await;
    let [down, up] = [proxy.route_addrs()[0], proxy.route_addrs()[1]];

    let mut send = connect(down).await;
    let answer = exchange(
        &mut send,
        Request::get(format!("http://{down}/x"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json()["error"], "upstream_unavailable");
    assert_eq!(answer.headers["content-type"], "application/json");
    // As hyper's server sent the proxy's own answers: a length and a date.
    answer.has_length_and_date();

    let mut send = connect(up).await;
    let slow = Request::get(format!("http://{up}/slow/2000"))
        .body(Full::default())
        .unwrap();
    let answer = exchange(&mut send, slow).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["error"], "upstream_timeout");

    // A header list over `max_header_bytes`: 431 on its stream, not the connection's end.
    let big = Request::get(format!("http://{up}/big"))
        .header("x-big", "b".repeat(10_000))
        .body(Full::default())
        .unwrap();
    let answer = exchange(&mut send, big).await;
    assert_eq!(answer.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(answer.json()["error"], "headers_too_large");

    // CONNECT is refused as over HTTP/1.1.
    let connect_req = Request::builder()
        .method(Method::CONNECT)
        .uri("evil.example:443")
        .body(Full::default())
        .unwrap();
    let answer = exchange(&mut send, connect_req).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "bad_request");

    let ok = Request::get(format!("http://{up}/after"))
        .body(Full::default())
        .unwrap();
    let answer = exchange(&mut send, ok).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(api.state().records().len(), 2, "/slow and /after only");
}

/// A client that gives up on a stream (hyper resets it when the response is dropped) ends
/// the work for it: the upstream exchange is dropped, its connection closed, as hyper's
/// server did, rather than left waiting for an answer no one reads.
#[tokio::test]
async fn a_stream_the_client_resets_ends_its_upstream_exchange() {
    for method in [Method::GET, Method::POST] {
        let held = Arc::new(tokio::sync::Notify::new());
        let closed = Arc::new(tokio::sync::Notify::new());
        let (h, c) = (held.clone(), closed.clone());
        let upstream = ScriptedUpstream::start(move |_| {
            vec![Step::Signal(h.clone()), Step::UntilClosed(c.clone())]
        })
        .await;
        let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
        let addr = proxy.route_addrs()[0];
        // A second handle keeps the connection open: only the stream ends.
        let kept = connect(addr).await;
        let mut send = kept.clone();
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}/held"))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let pending = tokio::spawn(async move { send.send_request(req).await.map(|_| ()) });
        tokio::time::timeout(Duration::from_secs(5), held.notified())
            .await
            .expect("the request reached the upstream");
        pending.abort();
        tokio::time::timeout(Duration::from_secs(5), closed.notified())
            .await
            .unwrap_or_else(|_| panic!("{method}: the upstream connection was not closed"));
        assert!(!kept.is_closed(), "the client's connection stays open");
    }
}

/// When the route's listener stops, a stream in flight finishes and the connection closes
/// after it (a `GOAWAY` first).
#[tokio::test]
async fn shutdown_lets_the_streams_in_flight_finish() {
    let s = Stack::start(LIFETIME, "", "").await;
    let addr = s.addr();
    let mut send = connect(addr).await;
    let slow = Request::get(format!("http://{addr}/slow/400"))
        .body(Full::default())
        .unwrap();
    let pending = tokio::spawn(async move { exchange(&mut send, slow).await });
    assert!(
        eventually(Duration::from_secs(5), || s.api.state().records().len()
            == 1)
        .await,
        "the request reached the upstream"
    );
    let Stack {
        proxy,
        idp: _idp,
        api: _api,
    } = s;
    let stopped = tokio::spawn(proxy.shutdown());
    let answer = pending.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["slept_ms"], "400");
    assert!(tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .is_ok());
}

/// A library user's multi-thread runtime moves tasks between threads, which the front door's
/// HTTP/2 side (its sessions kept per thread) cannot follow: there hyper serves h2c, and every
/// stream is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_is_served_on_a_multi_thread_runtime_too() {
    let s = Stack::start(LIFETIME, "", "").await;
    let send = connect(s.addr()).await;
    let addr = s.addr();
    let mut all = Vec::new();
    for i in 0..200 {
        let mut send = send.clone();
        all.push(tokio::spawn(async move {
            let req = Request::get(format!("http://{addr}/m/{i}"))
                .body(Full::default())
                .unwrap();
            let answer = exchange(&mut send, req).await;
            assert_eq!(answer.json()["target"], format!("/api/m/{i}"));
        }));
    }
    for t in all {
        t.await.unwrap();
    }
}

/// The same requests sent over HTTP/1.1 and over h2c reach the upstream alike: the same
/// method, target and fields (the HTTP/2 side's lean path and general path, against the
/// HTTP/1.1 front door and hyper's path).
#[tokio::test]
async fn what_reaches_the_upstream_is_the_same_over_http11_and_h2c() {
    let s = Stack::start(LIFETIME, "", "").await;
    let addr = s.addr();
    let cases: Vec<(Method, &str, &[u8])> = vec![
        (Method::GET, "/a/b?c=d%20e", b""),
        (Method::HEAD, "/head", b""),
        (Method::DELETE, "/things/1", b""),
        (Method::OPTIONS, "/opt", b""),
        (Method::POST, "/post?x=1", b"form=1"),
        (Method::GET, "/caf\u{e9}", b""),
    ];
    let build = |method: &Method, path: &str, body: &[u8]| {
        Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}{path}"))
            .header("authorization", "Basic Zm9vOmJhcg==")
            .header("accept", "application/json")
            .header("x-custom", "one")
            .header("x-custom", "two")
            .header("cookie", "a=1; b=2")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .unwrap()
    };
    let mut h2 = connect(addr).await;
    for (method, path, body) in &cases {
        let over_h1 = send(&client(), build(method, path, body)).await;
        let answer = exchange(&mut h2, build(method, path, body)).await;
        assert_eq!(over_h1.status, answer.status, "{method} {path}");
        let records = s.api.state().records();
        let (a, b) = (&records[records.len() - 2], &records[records.len() - 1]);
        assert_eq!(
            (&a.method, &a.target),
            (&b.method, &b.target),
            "{method} {path}"
        );
        let fields = |r: &demo::EchoRecord| {
            let mut all: Vec<(String, String)> = r
                .headers
                .iter()
                // The token differs by nothing but its value; both were checked current. And
                // hyper's HTTP/2 client sends `content-length: 0` for an empty OPTIONS where its
                // HTTP/1.1 client sends none: the clients differ there, not the proxy.
                .filter(|(n, v)| *n != "authorization" && !(*n == "content-length" && *v == "0"))
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
                .collect();
            all.sort();
            all
        };
        assert_eq!(fields(a), fields(b), "{method} {path}");
        assert!(a.token_was_current && b.token_was_current);
    }
}
