//! HTTP/1.1 on the wire, both paths (the front door with the lean exchange, and hyper): what
//! reaches the upstream and what comes back when a client or an upstream sends something
//! unusual or hostile. Each test here pins a rule of the README's "Proxying behaviour".

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const LIFETIME: Duration = Duration::from_secs(3600);

/// Sends `request` on `conn` and reads one whole answer with a sized body; panics after 5 s.
async fn exchange(conn: &mut TcpStream, request: &str) -> String {
    conn.write_all(request.as_bytes()).await.unwrap();
    read_answer(conn, request.starts_with("HEAD ")).await.0
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The upstream's first answer is framed one way and followed, once the client has it, by
/// bytes no request asked for: `head` goes first, `stray` when the test says so.
struct Stray {
    name: &'static str,
    /// The first client's request.
    request: &'static str,
    head: &'static [u8],
    stray: &'static [u8],
    /// The upstream closes the connection after the stray bytes.
    close: bool,
}

const STRAYS: &[Stray] = &[
    Stray {
        name: "a body after a HEAD answer's head",
        request: "HEAD /alice HTTP/1.1\r\nHost: x\r\n\r\n",
        head: b"HTTP/1.1 200 OK\r\ncontent-length: 25\r\n\r\n",
        stray: b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nattacker-page",
        close: false,
    },
    Stray {
        name: "a body after a 204",
        request: "GET /alice HTTP/1.1\r\nHost: x\r\n\r\n",
        head: b"HTTP/1.1 204 No Content\r\n\r\n",
        stray: b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nattacker-page",
        close: false,
    },
    Stray {
        name: "more than the Content-Length",
        request: "GET /alice HTTP/1.1\r\nHost: x\r\n\r\n",
        head: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        stray: b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nattacker-page",
        close: false,
    },
    Stray {
        name: "bytes after the last chunk",
        request: "GET /alice HTTP/1.1\r\nHost: x\r\n\r\n",
        head: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        stray: b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nattacker-page",
        close: false,
    },
    Stray {
        name: "a 408 on the idle connection, then close",
        request: "GET /alice HTTP/1.1\r\nHost: x\r\n\r\n",
        head: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        stray:
            b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 7\r\nconnection: close\r\n\r\ntimeout",
        close: true,
    },
    Stray {
        name: "a body after a HEAD answer's head, on hyper's path",
        request: "POST /alice HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na",
        head: b"HTTP/1.1 204 No Content\r\n\r\n",
        stray: b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nattacker-page",
        close: false,
    },
];

/// The finding of issue 13: bytes an upstream writes past a response's framed end must never
/// become the next client's answer. alice's request gets an answer followed by stray bytes;
/// bob and carol, each on a connection of their own, must get the answers to their own
/// requests.
#[tokio::test]
async fn bytes_after_a_responses_end_never_reach_the_next_client() {
    let mut wrong = Vec::new();
    for case in STRAYS {
        let go = Arc::new(Notify::new());
        let written = Arc::new(Notify::new());
        let (g, w) = (go.clone(), written.clone());
        let upstream = ScriptedUpstream::start(move |seen| {
            if !seen.target.ends_with("/alice") {
                return names_the_target(seen);
            }
            let mut steps = vec![
                Step::Write(case.head.to_vec()),
                Step::Wait(g.clone()),
                Step::Write(case.stray.to_vec()),
                Step::Signal(w.clone()),
            ];
            if case.close {
                steps.push(Step::Close);
            }
            steps
        })
        .await;
        let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
        let addr = proxy.route_addrs()[0];

        let mut alice = TcpStream::connect(addr).await.unwrap();
        let first = exchange(&mut alice, case.request).await;
        assert!(first.starts_with("HTTP/1.1 2"), "{}: {first}", case.name);
        go.notify_one();
        written.notified().await;

        for (who, method) in [("bob", "GET"), ("carol", "GET"), ("dave", "POST")] {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let extra = if method == "POST" {
                "Content-Length: 0\r\n"
            } else {
                ""
            };
            let answer = exchange(
                &mut conn,
                &format!("{method} /{who} HTTP/1.1\r\nHost: x\r\n{extra}\r\n"),
            )
            .await;
            if body(&answer) != format!("path=/base/{who}") {
                wrong.push(format!("{}: {who} got {answer:?}", case.name));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Sends `raw` on a fresh connection; returns what came back until the proxy closed it (or 3 s
/// passed) and how long that took.
async fn until_closed(addr: std::net::SocketAddr, raw: &[u8]) -> (String, Duration) {
    let started = tokio::time::Instant::now();
    let answer = raw_exchange(addr, raw, Duration::from_secs(3)).await;
    (answer, started.elapsed())
}

#[tokio::test]
async fn transfer_codings_the_proxy_cannot_forward_are_501_and_close() {
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    for coding in [
        "gzip, chunked",
        "chunked, chunked",
        ",chunked",
        "identity",
        "xchunked",
    ] {
        for method in ["POST", "GET"] {
            let raw = format!(
                "{method} /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            );
            let (answer, took) = until_closed(addr, raw.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 501"), "{coding}: {answer}");
            assert!(answer.contains("\"error\":\"not_implemented\""), "{answer}");
            assert!(took < Duration::from_secs(2), "{coding}: not closed");
        }
    }
    let raw = "POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let (answer, _) = until_closed(addr, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(upstream.seen().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn malformed_heads_get_a_json_400_and_close() {
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    for raw in [
        "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let (answer, took) = until_closed(addr, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{raw:?}: {answer}");
        assert!(answer.contains("\"error\":\"bad_request\""), "{answer}");
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        assert!(took < Duration::from_secs(2), "{raw:?}: not closed");
    }
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn an_http2_preface_after_an_http1_request_is_400() {
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let first = exchange(&mut conn, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(body(&first), "path=/base/one");
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(3), conn.read_to_string(&mut rest))
        .await
        .expect("closed")
        .unwrap();
    assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
    assert!(rest.contains("HTTP/2 connection preface"), "{rest}");
    // In one write with the request before it, too.
    let (answer, _) = until_closed(
        addr,
        b"GET /two HTTP/1.1\r\nHost: x\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    )
    .await;
    assert!(answer.contains("path=/base/two"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    // A connection that starts with the preface is HTTP/2 with prior knowledge, as before.
    let reply = send(
        &h2c_client(),
        http::Request::get(format!("http://{addr}/h2"))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.body, "path=/base/h2");
}

#[tokio::test]
async fn targets_clients_send_unencoded_are_forwarded_as_sent() {
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    let mut conn = TcpStream::connect(addr).await.unwrap();
    for target in [r#"/items?where={"a":1}"#, "/a<b>|c^`d\\e{f}", r#"/q?x="y""#] {
        let answer = exchange(
            &mut conn,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
        assert_eq!(body(&answer), format!("path=/base{target}"));
    }
}

#[tokio::test]
async fn an_h2c_upgrade_is_forwarded_as_a_plain_request() {
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // What Java's HttpClient sends on every http:// request, and curl --http2 on the first.
    for (method, body_fields) in [("GET", ""), ("POST", "Content-Length: 2\r\n\r\nhi")] {
        let raw = format!(
            "{method} /j HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAEAAEAAAAIAAAAAAAMAAAAAZAAEAAEAAAAFAAEAAA\r\n\
             Authorization: Bearer the-clients-own\r\n{}",
            if body_fields.is_empty() {
                "\r\n"
            } else {
                body_fields
            }
        );
        let answer = exchange(&mut conn, &raw).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{method}: {answer}");
        assert!(!answer.to_ascii_lowercase().contains("upgrade"), "{answer}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in seen {
        assert!(s.header("upgrade").is_empty(), "{}", s.head);
        assert!(s.header("http2-settings").is_empty(), "{}", s.head);
        assert!(
            !s.header("connection")
                .iter()
                .any(|v| v.to_ascii_lowercase().contains("upgrade")),
            "{}",
            s.head
        );
        let auth = s.header("authorization");
        assert_eq!(auth.len(), 1, "{}", s.head);
        assert!(auth[0].starts_with("Bearer ") && auth[0] != "Bearer the-clients-own");
    }
}

#[tokio::test]
async fn upgrades_decides_which_protocols_are_tunnelled() {
    let upstream = ScriptedUpstream::start(|seen: &Seen| {
        if seen.header("upgrade").is_empty() {
            return names_the_target(seen);
        }
        if seen.target.ends_with("/h2c-switch") {
            return vec![Step::Write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
                    .to_vec(),
            )];
        }
        vec![Step::Write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                .to_vec(),
        )]
    })
    .await;
    let ws = "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    // Allowed by default.
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
    let answer = exchange(&mut conn, ws).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert_eq!(upstream.seen()[0].header("upgrade"), ["websocket"]);
    // A 101 to a protocol the route does not allow is refused.
    let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
    let answer = exchange(&mut conn, &ws.replace("/ws", "/h2c-switch")).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("does not allow"), "{answer}");
    // Not with `upgrades = []`: a plain request.
    let (_idp2, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "upgrades = []").await;
    let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
    let answer = exchange(&mut conn, ws).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(upstream.seen().last().unwrap().header("upgrade").is_empty());
}

#[tokio::test]
async fn redirects_to_the_upstreams_own_origin_come_back_to_the_proxy() {
    let upstream = ScriptedUpstream::start(|seen: &Seen| {
        let origin = seen.header("host")[0].clone();
        let (location, content_location) = match seen.target.as_str() {
            "/base/out" => (
                "https://elsewhere.example/base/x".to_string(),
                String::new(),
            ),
            "/base/sibling" => (format!("http://{origin}/base2/x"), String::new()),
            // Shorter than any scheme: relative, left as it is.
            "/base/relative" => ("x".to_string(), String::new()),
            _ => (
                format!("http://{origin}/base/next?x=1"),
                format!("HTTP://{}/base", origin.to_ascii_uppercase()),
            ),
        };
        // Only `Location` and `Content-Location` are rewritten, not other fields naming a URL.
        let mut head = format!(
            "HTTP/1.1 302 Found\r\nLocation: {location}\r\nX-Resource: http://{origin}/base/l\r\n"
        );
        if !content_location.is_empty() {
            head.push_str(&format!("Content-Location: {content_location}\r\n"));
        }
        head.push_str("Content-Length: 0\r\n\r\n");
        vec![Step::Write(head.into_bytes())]
    })
    .await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let lower = |a: String| a.to_ascii_lowercase();
    for request in [
        "GET /go HTTP/1.1\r\nHost: proxy.local:8080\r\n\r\n",
        "POST /go HTTP/1.1\r\nHost: proxy.local:8080\r\nContent-Length: 0\r\n\r\n",
        "PUT /go HTTP/1.1\r\nHost: proxy.local:8080\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let answer = lower(exchange(&mut conn, request).await);
        assert!(
            answer.contains("\r\nlocation: http://proxy.local:8080/next?x=1\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("\r\ncontent-location: http://proxy.local:8080/\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains(&format!(
                "\r\nx-resource: http://{}/base/l\r\n",
                upstream.addr
            )),
            "{answer}"
        );
    }
    for (target, kept) in [
        ("/out", "https://elsewhere.example/base/x"),
        ("/sibling", "/base2/x"),
        ("/relative", "\r\nlocation: x\r\n"),
    ] {
        let answer = exchange(
            &mut conn,
            &format!("GET {target} HTTP/1.1\r\nHost: p\r\n\r\n"),
        )
        .await;
        assert!(
            answer.contains(kept) && !answer.contains("http://p/"),
            "{answer}"
        );
    }
    // Off with `rewrite_location = false`.
    let (_idp2, proxy) =
        proxy_to_scripted(upstream.addr, LIFETIME, "rewrite_location = false").await;
    let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
    let answer = exchange(&mut conn, "GET /go HTTP/1.1\r\nHost: p\r\n\r\n").await;
    assert!(
        answer.contains(&format!("http://{}/base/next?x=1", upstream.addr)),
        "{answer}"
    );
}

#[tokio::test]
async fn via_is_added_unless_the_route_says_not_to() {
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let requests = [
        "GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nb",
    ];
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
    for r in requests {
        exchange(&mut conn, r).await;
    }
    let (_idp2, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "via = false").await;
    let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
    for r in requests {
        exchange(&mut conn, r).await;
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen[..2] {
        let via = s.header("via");
        assert!(
            via.len() == 1 && via[0].starts_with("1.1 token-proxy-"),
            "{}",
            s.head
        );
    }
    for s in &seen[2..] {
        assert!(s.header("via").is_empty(), "{}", s.head);
    }
}

#[tokio::test]
async fn a_get_with_a_chunked_body_keeps_its_body() {
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
    let answer = exchange(
        &mut conn,
        "GET /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nquery\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = upstream.seen();
    assert_eq!(seen[0].body, b"query", "{}", seen[0].head);
}

/// A `401` to a request that cannot be replayed (here a chunked upload) still retires the
/// token it carried, so the next request gets a new one; with `retry_on_401 = false` nothing
/// is retired.
#[tokio::test]
async fn a_401_to_a_streamed_request_retires_its_token() {
    for (extra, retired) in [("", true), ("retry_on_401 = false", false)] {
        let s = Stack::start(LIFETIME, "", extra).await;
        let mut conn = TcpStream::connect(s.addr()).await.unwrap();
        let warm = exchange(&mut conn, "GET /warm HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(warm.starts_with("HTTP/1.1 200"), "{warm}");
        let first = s.api.state().records()[0].headers["authorization"].clone();
        s.idp.state().tokens.revoke_all();
        let refused = exchange(
            &mut conn,
            "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        )
        .await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        let _ = exchange(&mut conn, "GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let records = s.api.state().records();
        let after: Vec<_> = records
            .iter()
            .filter(|r| r.target == "/api/after")
            .collect();
        if retired {
            // The GET went out once, with a new token: it was not refused first and replayed.
            assert_eq!(
                after.len(),
                1,
                "{extra:?}: /after was sent {} times",
                after.len()
            );
            assert_ne!(after[0].headers["authorization"], first);
            assert_eq!(s.api.state().rejected(), 1, "only the upload met a 401");
        } else {
            assert_eq!(
                after[0].headers["authorization"], first,
                "{extra:?}: token kept"
            );
        }
    }
}

/// The upstream's answer to each target of the response-framing tests.
fn bad_answers(seen: &Seen) -> Vec<Step> {
    let target = seen.target.trim_start_matches("/base");
    let chunked = |size_line: &str| {
        format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size_line}ok\r\n0\r\n\r\n")
    };
    let answer = match target {
        "/clte" => "HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_string(),
        "/dupcl" => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok".to_string(),
        "/listcl" => "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok".to_string(),
        "/cl204" => "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n".to_string(),
        "/conflictcl" => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".to_string(),
        "/plus" => chunked("+2\r\n"),
        "/spaced" => chunked(" 2 \r\n"),
        "/hex" => chunked("0x2\r\n"),
        "/extlf" => chunked("2;a\nb\r\n"),
        "/lastlf" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\n\n".to_string(),
        "/trailers" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
            Trailer: X-Checksum, Set-Cookie, Content-Length, Authorization, Host\r\n\r\n\
            2\r\nok\r\n0\r\nX-Checksum: 9\r\nSet-Cookie: session=evil\r\nContent-Length: 5\r\n\
            Authorization: Bearer x\r\nHost: evil\r\n\r\n"
            .to_string(),
        "/many" => {
            let mut head = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..300 {
                head.push_str(&format!("X-Field-{i}: {i}\r\n"));
            }
            head + "Content-Length: 2\r\n\r\nok"
        }
        "/huge" => format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
            "b".repeat(70 * 1024)
        ),
        _ => return names_the_target(seen),
    };
    let mut steps = vec![Step::Write(answer.into_bytes())];
    if matches!(target, "/plus" | "/spaced" | "/hex" | "/extlf" | "/lastlf") {
        // The upstream keeps the connection open: an end must come from the framing alone.
        steps.push(Step::Wait(Arc::new(Notify::new())));
    }
    steps
}

/// Both paths' requests for `target`: a bodiless GET (the front door and the lean exchange)
/// and a POST with a body (hyper on both sides).
fn both_paths(target: &str) -> [String; 2] {
    [
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: TE\r\n\r\n"),
        format!("POST {target} HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: TE\r\nContent-Length: 1\r\n\r\n."),
    ]
}

#[tokio::test]
async fn response_lengths_reach_the_client_once_and_true() {
    let upstream = ScriptedUpstream::start(bad_answers).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    for target in ["/clte", "/dupcl", "/listcl"] {
        for request in both_paths(target) {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(request.as_bytes()).await.unwrap();
            let answer = read_whole(&mut conn).await;
            let lower = answer.to_ascii_lowercase();
            let lengths: Vec<&str> = lower
                .split("\r\n")
                .filter_map(|l| l.strip_prefix("content-length: "))
                .collect();
            assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
            assert!(
                lengths.len() <= 1 && lengths.iter().all(|l| *l == "2"),
                "{target}: {answer}"
            );
            assert!(
                answer.ends_with("ok") || answer.ends_with("2\r\nok\r\n0\r\n\r\n"),
                "{target}: {answer:?}"
            );
        }
    }
    // A 204 has no length to pass on; a HEAD's tells the length of the body not sent.
    for request in both_paths("/cl204") {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let answer = read_whole(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("content-length"),
            "{answer}"
        );
    }
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = exchange(&mut conn, "HEAD /dupcl HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let lengths = head
        .to_ascii_lowercase()
        .matches("content-length: 2\r\n")
        .count();
    assert_eq!(lengths, 1, "{head}");
    for request in both_paths("/conflictcl") {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let answer = read_whole(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    }
}

/// Reads one answer whole (sized or chunked), or what came until the connection closed.
async fn read_whole(conn: &mut TcpStream) -> String {
    let mut wire = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&wire).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            if lower.starts_with("http/1.1 204") || lower.starts_with("http/1.1 304") {
                return text;
            }
            if let Some(n) = lower
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|n| n.parse::<usize>().ok())
            {
                if body.len() >= n {
                    return text;
                }
            } else if lower.contains("transfer-encoding: chunked")
                && (body.ends_with("0\r\n\r\n")
                    || body.contains("\r\n0\r\n") && body.ends_with("\r\n\r\n"))
            {
                return text;
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return text,
            Ok(Ok(n)) => wire.extend_from_slice(&buf[..n]),
            Err(_) => panic!("neither a whole answer nor a close within 5 s: {text:?}"),
        }
    }
}

#[tokio::test]
async fn a_chunked_response_with_bad_framing_is_cut_off_at_once() {
    let upstream = ScriptedUpstream::start(bad_answers).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    let addr = proxy.route_addrs()[0];
    for target in ["/plus", "/spaced", "/hex", "/extlf", "/lastlf"] {
        for request in both_paths(target) {
            let started = tokio::time::Instant::now();
            let mut conn = TcpStream::connect(addr).await.unwrap();
            conn.write_all(request.as_bytes()).await.unwrap();
            let answer = read_whole(&mut conn).await;
            // Either the proxy refused the answer outright, or its body ends without the last
            // chunk: never a complete response, and never a wait for the upstream to close.
            let complete = answer.starts_with("HTTP/1.1 200") && answer.ends_with("0\r\n\r\n");
            assert!(!complete, "{target}: {answer:?}");
            assert!(started.elapsed() < Duration::from_secs(2), "{target}: hung");
        }
    }
}

#[tokio::test]
async fn fields_that_must_not_be_trailers_never_reach_the_client() {
    let upstream = ScriptedUpstream::start(bad_answers).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    for request in both_paths("/trailers") {
        let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let answer = read_whole(&mut conn).await;
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            body.contains("x-checksum: 9") || body.contains("X-Checksum: 9"),
            "{answer:?}"
        );
        let lower = body.to_ascii_lowercase();
        for forbidden in ["set-cookie", "content-length", "authorization", "host"] {
            assert!(!lower.contains(forbidden), "{forbidden} passed: {answer:?}");
        }
    }
}

#[tokio::test]
async fn response_heads_up_to_64_kib_pass_and_larger_ones_are_named() {
    let upstream = ScriptedUpstream::start(bad_answers).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, LIFETIME, "").await;
    for request in both_paths("/many") {
        let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let answer = read_whole(&mut conn).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{}",
            &answer[..200.min(answer.len())]
        );
        assert!(answer.contains("X-Field-299: 299") || answer.contains("x-field-299: 299"));
    }
    for request in both_paths("/huge") {
        let mut conn = TcpStream::connect(proxy.route_addrs()[0]).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let answer = read_whole(&mut conn).await;
        assert!(
            answer.starts_with("HTTP/1.1 502"),
            "{}",
            &answer[..200.min(answer.len())]
        );
        assert!(answer.contains("response head too large"), "{answer}");
    }
}
