//! The request path over real sockets: what the upstream receives and what the client gets.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::*;
use token_proxy::demo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIFETIME: Duration = Duration::from_secs(60);

#[tokio::test]
async fn stamps_the_token_and_replaces_the_clients_authorization() {
    let s = Stack::start(LIFETIME, "", "").await;
    let req = Request::get(format!("http://{}/v1/things", s.addr()))
        .header("authorization", "Bearer client-supplied")
        .header("authorization", "Basic Zm9vOmJhcg==")
        .body(Full::default())
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let records = s.api.state().records();
    assert_eq!(records.len(), 1);
    let auth: Vec<_> = records[0].headers.get_all("authorization").iter().collect();
    assert_eq!(
        auth.len(),
        1,
        "exactly one Authorization reaches the upstream"
    );
    let token = auth[0].to_str().unwrap().strip_prefix("Bearer ").unwrap();
    assert!(s.idp.state().tokens.all().contains(&token.to_string()));
    assert!(records[0].token_was_current);
}

#[tokio::test]
async fn path_and_query_are_joined_under_the_base_path_byte_for_byte() {
    let s = Stack::start(LIFETIME, "", "").await;
    let target = "/v1/items%2Fslash/%7Euser;p=1?q=a%20b&q=c+d&empty=&x=%ZZ";
    let raw =
        format!("GET {target} HTTP/1.1\r\nHost: whatever.example\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let rec = &s.api.state().records()[0];
    assert_eq!(rec.target, format!("/api{target}"));
    assert_eq!(
        rec.headers["host"],
        s.api.addr().to_string(),
        "Host becomes the upstream's authority"
    );
}

/// Both request paths drop the hop-by-hop fields: the front door's own (no `Upgrade`) and
/// hyper's (an `Upgrade` the proxy does not take hands the request over).
#[tokio::test]
async fn hop_by_hop_headers_are_removed_in_both_directions() {
    let s = Stack::start(LIFETIME, "", "").await;
    for (i, upgrade) in ["", "Upgrade: h2c\r\n"].into_iter().enumerate() {
        let raw = format!(
            "GET /hop HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Foo\r\nX-Foo: secret-hop\r\n\
             Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic abc\r\n\
             TE: gzip\r\nTrailer: X-Sum\r\n{upgrade}X-End-To-End: yes\r\n\r\n"
        );
        let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_millis(1500)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let rec = &s.api.state().records()[i];
        for name in [
            "x-foo",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "te",
            "trailer",
            "upgrade",
        ] {
            assert!(
                rec.headers.get(name).is_none(),
                "{name} reached the upstream ({upgrade:?}): {:?}",
                rec.headers
            );
        }
        // The client's `Connection` is the client's hop alone: nothing of it is forwarded.
        assert!(
            rec.headers.get("connection").is_none(),
            "connection reached the upstream ({upgrade:?}): {:?}",
            rec.headers
        );
        assert_eq!(rec.headers["x-end-to-end"], "yes");
        let lower = answer.to_ascii_lowercase();
        for name in ["x-upstream-hop:", "keep-alive:", "proxy-authenticate:"] {
            assert!(!lower.contains(name), "{name} reached the client: {answer}");
        }
        assert!(lower.contains("x-end-to-end: kept"), "{answer}");
    }
}

#[tokio::test]
async fn connect_and_absolute_form_are_refused_with_json() {
    let s = Stack::start(LIFETIME, "", "").await;
    for raw in [
        "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        "GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_millis(1500)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("\"error\":\"bad_request\""), "{answer}");
    }
    assert!(s.api.state().records().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn h2c_clients_are_served_on_the_same_port() {
    let s = Stack::start(LIFETIME, "", "").await;
    let req = Request::post(format!("http://{}/h2/path?a=1", s.addr()))
        .header("authorization", "Bearer nope")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let reply = send(&h2c_client(), req).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["target"], "/api/h2/path?a=1");
    assert_eq!(body["body_bytes"], 5);
    assert_eq!(
        s.api.state().records()[0]
            .headers
            .get_all("authorization")
            .iter()
            .count(),
        1
    );
}

#[tokio::test]
async fn upstream_answers_pass_through_untouched_and_redirects_are_not_followed() {
    let s = Stack::start(LIFETIME, "", "").await;
    let reply = get(s.addr(), "/status/418").await;
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(reply.json()["status"], 418);
    let reply = get(s.addr(), "/status/302").await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(reply.headers["location"], "http://elsewhere.invalid/next");
    let reply = get(s.addr(), "/status/500").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.json(), serde_json::json!({"status": 500}));
    assert_eq!(s.api.state().records().len(), 3);
}

#[tokio::test]
async fn upstream_down_is_502_json_and_slow_upstream_is_504_json() {
    let idp = start_token_endpoint(LIFETIME).await;
    let api = start_upstream(&idp).await;
    let dead = format!("http://{}", fresh_addr());
    let text = format!(
        "{}{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route(&dead, "api", ""),
        route(
            &format!("http://{}", api.addr()),
            "api",
            "response_timeout_secs = 0.3"
        )
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"], "upstream_unavailable");
    let reply = get(proxy.route_addrs()[1], "/slow/2000").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["error"], "upstream_timeout");
}

/// The front door keeps one response timer per connection and leaves it set from one request
/// to the next (see `proxy::deadline`): each request still gets the whole `response_timeout`
/// from its own start, no less and no more.
#[tokio::test]
async fn each_request_on_a_kept_alive_connection_gets_its_whole_response_timeout() {
    let s = Stack::start(LIFETIME, "", "response_timeout_secs = 0.5").await;
    let mut conn = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    // The first request sets the timer for its deadline, 0.5 s from now.
    assert!(answer_on(&mut conn, "/first")
        .await
        .starts_with("HTTP/1.1 200"));
    // Time passing is the scenario here: the next request starts 0.3 s later, and its answer
    // (after 0.35 s) comes after the first request's deadline but within its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = answer_on(&mut conn, "/slow/350").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A request that takes too long is still cut at its own deadline.
    let started = tokio::time::Instant::now();
    let answer = answer_on(&mut conn, "/slow/3000").await;
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn trailers_pass_both_ways() {
    let s = Stack::start(LIFETIME, "", "").await;
    // Response trailers over HTTP/1.1 chunked.
    let raw = "GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.to_ascii_lowercase().contains("x-checksum: abc123"),
        "{answer}"
    );
    // The message ends where its trailer section does: nothing follows (a stray last chunk
    // would be read as the start of the next response).
    let last_chunk = answer.rfind("\r\n0\r\n").expect("a last chunk");
    let trailer_section = &answer[last_chunk + 5..];
    assert!(
        trailer_section.ends_with("\r\n\r\n") && trailer_section.matches("\r\n\r\n").count() == 1,
        "{answer:?}"
    );
    // Request trailers over HTTP/1.1 chunked.
    let raw = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nConnection: close\r\n\r\n\
               5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n";
    let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.contains("\"x-sum\":\"42\""), "{answer}");
    assert!(answer.contains("\"body_bytes\":5"), "{answer}");
}

/// Opens a WebSocket through the proxy at `addr` (the demo upstream echoes its bytes).
async fn open_websocket(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let handshake = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    stream.write_all(handshake.as_bytes()).await.unwrap();
    let (head, rest) = read_answer(&mut stream, true).await;
    assert!(rest.is_empty(), "nothing after the 101 yet: {rest}");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    stream
}

#[tokio::test]
async fn websocket_upgrade_tunnels_bytes_both_ways() {
    let s = Stack::start(LIFETIME, "", "").await;
    let mut stream = open_websocket(s.addr()).await;
    for msg in [&b"ping one"[..], b"and two"] {
        stream.write_all(msg).await.unwrap();
        let mut echoed = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, msg);
    }
    let rec = &s.api.state().records()[0];
    assert_eq!(rec.headers["upgrade"], "websocket");
    assert!(rec.token_was_current);
}

#[tokio::test]
async fn two_routes_with_two_credentials_in_one_process() {
    let idp_a = start_token_endpoint(LIFETIME).await;
    let idp_b = start_token_endpoint(LIFETIME).await;
    let api_a = start_upstream(&idp_a).await;
    let api_b = start_upstream(&idp_b).await;
    let text = format!(
        "{}{}{}{}",
        credential("a", &demo::token_url(&idp_a), "scope = \"a/.default\""),
        credential("b", &demo::token_url(&idp_b), "scope = \"b/.default\""),
        route(&format!("http://{}/a", api_a.addr()), "a", ""),
        route(&format!("http://{}/b", api_b.addr()), "b", "")
    );
    let proxy = start_proxy(&text).await;
    assert_eq!(
        get(proxy.route_addrs()[0], "/x").await.json()["target"],
        "/a/x"
    );
    assert_eq!(
        get(proxy.route_addrs()[1], "/y").await.json()["target"],
        "/b/y"
    );
    // Each upstream only accepts its own IdP's tokens, so a mix-up would be a 401.
    assert_eq!(api_a.state().rejected() + api_b.state().rejected(), 0);
    assert_eq!(
        idp_a.state().requests()[0]
            .form
            .iter()
            .find(|(k, _)| k == "scope")
            .unwrap()
            .1,
        "a/.default"
    );
    assert_eq!(
        idp_b.state().requests()[0]
            .form
            .iter()
            .find(|(k, _)| k == "scope")
            .unwrap()
            .1,
        "b/.default"
    );
}

#[tokio::test]
async fn other_methods_and_bodies_are_forwarded() {
    let s = Stack::start(LIFETIME, "", "").await;
    for method in [Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS] {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}/m", s.addr()))
            .body(Full::new(Bytes::from_static(b"{\"k\":1}")))
            .unwrap();
        let reply = send(&client(), req).await;
        assert_eq!(reply.status, StatusCode::OK, "{method}");
        assert_eq!(reply.json()["method"], method.as_str());
        assert_eq!(reply.json()["body_bytes"], 7);
    }
}

#[tokio::test]
async fn upstream_connect_timeout_is_504_json() {
    let idp = start_token_endpoint(LIFETIME).await;
    // A listener that never accepts, with its backlog filled: further SYNs go unanswered.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(LOOPBACK).unwrap();
    let listener = socket.listen(0).unwrap();
    let black_hole = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(100),
            tokio::net::TcpStream::connect(black_hole),
        )
        .await
        {
            held.push(s);
        }
    }
    let text = format!(
        "{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route(
            &format!("http://{black_hole}"),
            "api",
            "connect_timeout_secs = 0.3"
        )
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["error"], "upstream_timeout");
    drop((listener, held));
}

#[tokio::test]
async fn unix_socket_listener_serves_with_its_file_mode() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let idp = start_token_endpoint(LIFETIME).await;
    let api = start_upstream(&idp).await;
    let dir = temp_file("placeholder", "").parent().unwrap().to_path_buf();
    let sock = dir.join("api.sock");
    std::fs::write(&sock, "").unwrap();
    std::fs::remove_file(&sock).unwrap();
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let text = format!(
        "{}[[routes]]\nlisten = \"unix:{}\"\nsocket_mode = \"0600\"\nupstream = \"http://{}/api\"\ncredential = \"api\"\n",
        credential("api", &demo::token_url(&idp), ""),
        sock.display(),
        api.addr()
    );
    let proxy = start_proxy(&text).await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    stream
        .write_all(b"GET /over/unix?q=1 HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    within(
        "the answer over the unix socket",
        stream.read_to_string(&mut answer),
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("\"target\":\"/api/over/unix?q=1\""),
        "{answer}"
    );
    proxy.shutdown().await;
    assert!(!sock.exists(), "the socket file is removed at shutdown");
}

/// An upstream that answers the first `answer` requests of each connection with `200 ok`
/// (keep-alive) and closes the connection on the next request without answering: a
/// kept-alive connection the upstream dropped as a request went out.
async fn flaky_keep_alive(answer: usize) -> ScriptedUpstream {
    ScriptedUpstream::start(move |seen| {
        if seen.nth == answer {
            vec![Step::Close]
        } else {
            vec![Step::Write(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            )]
        }
    })
    .await
}

/// How many of `upstream`'s connections carried a request.
fn connections(upstream: &ScriptedUpstream) -> usize {
    let seen = upstream.seen();
    let mut conns: Vec<usize> = seen.iter().map(|s| s.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    conns.len()
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = flaky_keep_alive(usize::MAX).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    for i in 0..20 {
        // A new client connection each time: reuse is the proxy's, not the client's.
        let reply = get(addr, &format!("/r{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(&reply.body[..], b"ok");
    }
    assert_eq!(upstream.seen().len(), 20);
    assert_eq!(
        connections(&upstream),
        1,
        "sequential requests share one upstream connection"
    );
}

#[tokio::test]
async fn an_idempotent_request_on_a_connection_the_upstream_dropped_is_sent_again() {
    // Each upstream connection answers one request and drops the second one unanswered.
    let upstream = flaky_keep_alive(1).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    // Bodiless GETs take the lean exchange, PUTs with a body hyper's client: in each, the
    // first request opens a connection, and each later one goes out on the kept-alive
    // connection, is dropped, and is sent again on a new connection.
    for i in 0..3 {
        let reply = get(addr, &format!("/r{i}")).await;
        assert_eq!(reply.status, StatusCode::OK, "GET {i}: {:?}", reply.body);
    }
    assert_eq!(connections(&upstream), 3);
    assert_eq!(upstream.seen().len(), 5);
    for i in 0..3 {
        let req = Request::put(format!("http://{addr}/p{i}"))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let reply = send(&client(), req).await;
        assert_eq!(reply.status, StatusCode::OK, "PUT {i}: {:?}", reply.body);
    }
    assert_eq!(connections(&upstream), 6);
    assert_eq!(upstream.seen().len(), 10);

    // A POST is not sent twice: the client hears that the connection was lost.
    let req = Request::post(format!("http://{addr}/submit"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"], "upstream_unavailable");
    assert_eq!(
        upstream.seen().len(),
        11,
        "the POST reached the upstream once"
    );
}

/// Splits what came back on one connection into responses: (head, body) pairs, bodies
/// de-chunked. Enough HTTP/1.1 for the answers of the echo API.
fn split_responses(mut wire: &[u8], heads_only_for: &[usize]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !wire.is_empty() {
        let end = wire
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head")
            + 4;
        let head = String::from_utf8_lossy(&wire[..end]).to_string();
        wire = &wire[end..];
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        if heads_only_for.contains(&out.len()) {
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let line = wire.windows(2).position(|w| w == b"\r\n").unwrap();
                let size =
                    usize::from_str_radix(std::str::from_utf8(&wire[..line]).unwrap(), 16).unwrap();
                wire = &wire[line + 2..];
                if size == 0 {
                    wire = &wire[2..];
                    break;
                }
                body.extend_from_slice(&wire[..size]);
                wire = &wire[size + 2..];
            }
        } else if let Some(at) = lower.find("content-length: ") {
            let len: usize = lower[at + 16..]
                .split("\r\n")
                .next()
                .unwrap()
                .parse()
                .unwrap();
            body.extend_from_slice(&wire[..len]);
            wire = &wire[len..];
        }
        out.push((head, body));
    }
    out
}

#[tokio::test]
async fn one_connection_mixes_lean_requests_with_ones_hyper_serves() {
    // Bodiless GET/HEAD/DELETE take the front door; the POST in between goes to hyper, with the
    // bytes already read put back; pipelined, in one write, answered in order.
    let s = Stack::start(LIFETIME, "", "").await;
    let raw = "GET /one?x=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer client\r\n\r\n\
               HEAD /two HTTP/1.1\r\nHost: x\r\n\r\n\
               DELETE /three HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n\
               POST /four HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
               GET /five HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut wire))
        .await
        .expect("the connection closes after `Connection: close`")
        .unwrap();
    let answers = split_responses(&wire, &[1]);
    assert_eq!(answers.len(), 5, "{}", String::from_utf8_lossy(&wire));
    for (head, _) in &answers {
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("\r\ndate: "), "{head}");
    }
    let json = |i: usize| serde_json::from_slice::<serde_json::Value>(&answers[i].1).unwrap();
    assert_eq!(json(0)["target"], "/api/one?x=1");
    assert_eq!(json(2)["method"], "DELETE");
    assert_eq!(json(3)["body_bytes"], 5);
    assert_eq!(json(4)["target"], "/api/five");
    assert!(answers[1]
        .0
        .to_ascii_lowercase()
        .contains("content-length: "));
    assert!(answers[4]
        .0
        .to_ascii_lowercase()
        .contains("connection: close\r\n"));
    let records = s.api.state().records();
    let seen: Vec<_> = records
        .iter()
        .map(|r| (r.method.as_str(), r.target.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("GET", "/api/one?x=1"),
            ("HEAD", "/api/two"),
            ("DELETE", "/api/three"),
            ("POST", "/api/four"),
            ("GET", "/api/five")
        ]
    );
    for r in &records {
        let auth: Vec<_> = r.headers.get_all("authorization").iter().collect();
        assert_eq!(auth.len(), 1);
        assert_ne!(auth[0], "Bearer client");
        assert_eq!(r.headers.get_all("host").iter().count(), 1);
    }
}

#[tokio::test]
async fn heads_the_front_door_does_not_take_get_hyper_answers() {
    let s = Stack::start(LIFETIME, "", "").await;
    for (raw, status) in [
        // HTTP/1.0, absolute form, a header name hyper refuses, a bad target.
        ("GET /ten HTTP/1.0\r\nHost: x\r\n\r\n", "200"),
        (
            "GET http://elsewhere/ HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n",
            "400",
        ),
        ("GET / HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", "400"),
        ("GET /a\x7fb HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ] {
        let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(2)).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.{} {status}", &answer[7..8])),
            "{raw:?} -> {answer}"
        );
    }
    assert_eq!(
        s.api.state().records().len(),
        1,
        "only the HTTP/1.0 GET went on"
    );
}

/// Checks one raw answer of the proxy's own: its status, JSON with `code`, and
/// `Cache-Control: no-store` (an error must not be served from a cache in front).
fn assert_own_answer(answer: &str, status: u16, code: &str) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {answer}"));
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.starts_with(&format!("http/1.1 {status} ")),
        "{status} {code}: {answer}"
    );
    assert!(lower.contains("\r\ncache-control: no-store"), "{answer}");
    assert!(
        lower.contains("\r\ncontent-type: application/json"),
        "{answer}"
    );
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(json["error"], code, "{answer}");
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// Every answer the proxy makes itself, from the front door's codec, hyper's path and the
/// lean path alike, is JSON with `Cache-Control: no-store`; the upstream's pass unchanged.
#[tokio::test]
async fn the_proxys_own_answers_are_json_and_never_cached() {
    let s = Stack::start_with("max_headers = 20", LIFETIME, "", "max_body_bytes = 10").await;
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    for (raw, status, code) in [
        (
            "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nConnection: close\r\n\r\n"
                .to_string(),
            400,
            "bad_request",
        ),
        (
            "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n".into(),
            400,
            "bad_request",
        ),
        (
            "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".into(),
            501,
            "not_implemented",
        ),
        (
            format!("GET /x HTTP/1.1\r\nHost: x\r\n{many}\r\n"),
            431,
            "headers_too_large",
        ),
        (
            "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world"
                .into(),
            413,
            "payload_too_large",
        ),
    ] {
        let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(3)).await;
        assert_own_answer(&answer, status, code);
    }
    assert!(s.api.state().records().is_empty(), "nothing was forwarded");

    // The upstream's own answer gets no `Cache-Control` added.
    let reply = get(s.addr(), "/x").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.get("cache-control").is_none());

    // No token to be had: 503 on the lean path (a bodiless GET) and on hyper's (a body).
    let api = start_upstream(&s.idp).await;
    let text = format!(
        "{}{}",
        credential("api", "http://127.0.0.1:1/token", "token_timeout_secs = 1"),
        route(
            &format!("http://{}", api.addr()),
            "api",
            "token_wait_secs = 1"
        )
    );
    let proxy = start_proxy(&text).await;
    let addr = proxy.route_addrs()[0];
    for raw in [
        "GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    ] {
        let answer = raw_exchange(addr, raw.as_bytes(), Duration::from_secs(5)).await;
        assert_own_answer(&answer, 503, "token_unavailable");
    }
    assert!(api.state().records().is_empty());
}

/// The admin listener's other paths and methods get JSON errors, not a hang or an empty 200.
#[tokio::test]
async fn admin_answers_404_and_405_with_json() {
    let s = Stack::start(LIFETIME, "", "").await;
    for (raw, status, code) in [
        (
            "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            404,
            "not_found",
        ),
        (
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            405,
            "method_not_allowed",
        ),
        (
            "DELETE /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            405,
            "method_not_allowed",
        ),
    ] {
        let answer = raw_exchange(s.admin(), raw.as_bytes(), Duration::from_secs(3)).await;
        assert_own_answer(&answer, status, code);
    }
    let reply = get(s.admin(), "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "ok");
}

/// At shutdown a request in flight may finish within `shutdown_grace_secs`, and the wait ends
/// there; an upgraded connection (a WebSocket has no end of its own) is closed at once.
#[tokio::test]
async fn shutdown_waits_its_grace_at_most_and_closes_websockets() {
    let Stack {
        idp: _idp,
        api,
        proxy,
    } = Stack::start_with("shutdown_grace_secs = 0.5", LIFETIME, "", "").await;
    let addr = proxy.route_addrs()[0];
    let mut ws = open_websocket(addr).await;
    let quick = tokio::spawn(async move { get(addr, "/slow/300").await });
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /slow/5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || api.state().in_flight() == 2).await,
        "both requests reached the upstream"
    );
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown());
    let (closed_after, read) = expect_closed(&mut ws, Duration::from_secs(3)).await;
    assert!(
        closed_after < Duration::from_millis(400),
        "the WebSocket closed after {closed_after:?}, not at once"
    );
    assert!(read.is_empty(), "{}", String::from_utf8_lossy(&read));
    let drained = within("shutdown", shutdown).await.unwrap();
    let took = started.elapsed();
    assert!(!drained, "the 5 s request outlasted the grace");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2000),
        "shutdown took {took:?}, not the 0.5 s grace"
    );
    let quick = within("the quick request", quick).await.unwrap();
    assert_eq!(quick.status, StatusCode::OK, "finished within the grace");
    assert_eq!(quick.json()["slept_ms"], "300");
}
