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
    read_answer(conn, request.starts_with("HEAD ")).await
}

/// Reads one answer (head and `Content-Length` body, none if `to_head`) from `conn`.
async fn read_answer(conn: &mut TcpStream, to_head: bool) -> String {
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
                return String::from_utf8_lossy(&wire[..end + 4 + len]).into_owned();
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
