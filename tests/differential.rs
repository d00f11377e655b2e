//! The differential test: random request heads and bodies, judged by token-proxy's HTTP/1.1
//! codec (`src/proxy/codec.rs`, what the front door and the gate apply) and read by hyper's
//! own HTTP/1.1 server. Whatever the codec lets through must be read by hyper the same way:
//! the same method, target and body, and nothing left over. Where the codec refuses what
//! hyper would take, the difference must be one of the codec's deliberate, documented
//! strictnesses (`stricter_on_purpose`); any other difference fails the test.
//!
//! Bounded for CI: `DIFF_CASES` request cases (default 10,000; a tenth as many responses) from the seed `DIFF_SEED` (default
//! fixed, so a failure reproduces). Run longer with, for example,
//! `DIFF_CASES=200000 DIFF_SEED=$RANDOM cargo test --release --test differential`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use token_proxy::proxy::codec::{self, Parsed, RequestBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What hyper made of the bytes: the request it handed its service, or the status it refused
/// them with, or nothing (incomplete).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hyper {
    Request {
        method: String,
        target: String,
        body: Vec<u8>,
    },
    Refused(u16),
    /// It read the head, then failed on the body.
    BodyFailed,
    /// No request and no answer (it waited for more).
    Nothing,
}

/// Feeds `wire` to hyper's HTTP/1.1 server and reports the first request it read.
async fn hyper_reads(wire: &[u8]) -> Hyper {
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let seen: Arc<Mutex<Option<Hyper>>> = Arc::default();
    let record = seen.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let method = req.method().to_string();
            let target = req.uri().to_string();
            let body = match req.into_body().collect().await {
                Ok(b) => Some(b.to_bytes().to_vec()),
                Err(_) => None,
            };
            let mut slot = record.lock().unwrap();
            if slot.is_none() {
                *slot = Some(match body {
                    Some(body) => Hyper::Request {
                        method,
                        target,
                        body,
                    },
                    None => Hyper::BodyFailed,
                });
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            ))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_headers(100)
        .half_close(true)
        .serve_connection(TokioIo::new(server), service);
    let serving = tokio::spawn(conn);
    client.write_all(wire).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut out)).await;
    serving.abort();
    if let Some(seen) = seen.lock().unwrap().clone() {
        return seen;
    }
    match out.get(9..12) {
        Some(code) => Hyper::Refused(std::str::from_utf8(code).unwrap().parse().unwrap()),
        None => Hyper::Nothing,
    }
}

/// What the codec makes of the same bytes, as the gate would let them through: the request
/// (method, target, decoded body), a refusal, or incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Codec {
    Request {
        method: String,
        target: String,
        body: Vec<u8>,
    },
    Refused(u16),
    Incomplete,
}

/// What the codec makes of `wire`, and the bytes the gate would hand hyper for it (the
/// target percent-encoded where the `http` crate needs it).
fn codec_reads(wire: &[u8]) -> (Codec, Vec<u8>) {
    let verdict = codec_verdict(wire);
    let mut fields = Vec::new();
    let to_hyper = match codec::parse_request(wire, 100, 64 * 1024, &mut fields, false) {
        Ok(Parsed::Head(head)) => {
            let (start, end) = head.target;
            match codec::hyper_target(&wire[start..end]) {
                Some(encoded) => [&wire[..start], &encoded[..], &wire[end..]].concat(),
                None => wire.to_vec(),
            }
        }
        _ => wire.to_vec(),
    };
    (verdict, to_hyper)
}

fn codec_verdict(wire: &[u8]) -> Codec {
    let head = match codec::parse_request(wire, 100, 64 * 1024, &mut Vec::new(), false) {
        Ok(Parsed::Head(head)) => head,
        Ok(Parsed::Partial) | Ok(Parsed::Preface) => return Codec::Incomplete,
        Err(codec::Refusal::Malformed(_)) => return Codec::Refused(400),
        Err(codec::Refusal::TooLarge(_)) => return Codec::Refused(431),
        Err(codec::Refusal::Unsupported(_)) => return Codec::Refused(501),
    };
    // The target as hyper's path forwards it: percent-encoded where the `http` crate needs
    // it, without a fragment (never sent upstream).
    let raw_target = &wire[head.target.0..head.target.1];
    let target = codec::hyper_target(raw_target).unwrap_or_else(|| raw_target.to_vec());
    let target = String::from_utf8_lossy(&target);
    let target = target.split('#').next().unwrap_or_default().to_string();
    let rest = &wire[head.len..];
    let body = match head.body {
        RequestBody::None => Vec::new(),
        RequestBody::Length(n) if (n as usize) <= rest.len() => rest[..n as usize].to_vec(),
        RequestBody::Length(_) => return Codec::Incomplete,
        RequestBody::Chunked => match dechunk(rest) {
            Ok(Some(body)) => body,
            Ok(None) => return Codec::Incomplete,
            Err(()) => return Codec::Refused(400),
        },
    };
    Codec::Request {
        method: head.method.to_string(),
        target,
        body,
    }
}

/// A chunked body decoded with the codec's line rules (as the gate checks them).
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    let mut body = Vec::new();
    loop {
        let Some((size, line)) = codec::chunk_size_line(rest).map_err(|_| ())? else {
            return Ok(None);
        };
        rest = &rest[line..];
        if size == 0 {
            return Ok(codec::trailer_section(rest, 64 * 1024)
                .map_err(|_| ())?
                .map(|_| body));
        }
        let size = size as usize;
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        codec::chunk_data_end(&rest[size..]).map_err(|_| ())?;
        rest = &rest[size + 2..];
    }
}

/// The codec's deliberate strictnesses, where hyper reads a request the codec refuses
/// (README, "Message framing"): both `Content-Length` and `Transfer-Encoding`; a coding
/// other than a single `chunked`; a list in one `Content-Length`; chunk framing or trailer
/// lines hyper tolerates (a bare LF, an odd trailer line); targets that are not one of the
/// four forms.
fn stricter_on_purpose(wire: &[u8]) -> bool {
    let text = String::from_utf8_lossy(wire).to_ascii_lowercase();
    let head_end = text
        .find("\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| text.find("\n\n").map(|i| i + 2))
        .unwrap_or(text.len());
    let (head, body) = text.split_at(head_end);
    let values = |name: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim_end() == name)
            .map(|(_, v)| v.trim().to_string())
            .collect()
    };
    let (te, cl) = (values("transfer-encoding"), values("content-length"));
    let target_ok = head.split(' ').nth(1).is_some_and(|t| {
        t.starts_with('/') || t == "*" || t.contains("://") || head.starts_with("connect ")
    });
    // A bare LF, or a CR that does not end a line, in the chunk framing or the trailers.
    let loose_lines = body.char_indices().any(|(i, c)| {
        (c == '\n' && !body[..i].ends_with('\r')) || (c == '\r' && !body[i + 1..].starts_with('\n'))
    });
    (!te.is_empty() && !cl.is_empty())
        || te.len() > 1
        || te.iter().any(|v| v != "chunked")
        || cl.iter().any(|v| v.contains(','))
        || !target_ok
        || (!te.is_empty() && loose_lines)
}

/// A small random request-head generator: the pieces the published smuggling corpora mutate
/// (methods, targets, versions, line ends, framing fields and their values, separators, odd
/// bytes), put together at random.
struct Gen(fastrand::Rng);

impl Gen {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.0.usize(..items.len())]
    }

    /// Mostly one of `usual`, now and then one of `odd`.
    fn mostly<'a>(&mut self, usual: &[&'a str], odd: &[&'a str]) -> &'a str {
        if self.0.u8(..6) == 0 {
            self.pick(odd)
        } else {
            self.pick(usual)
        }
    }

    fn request(&mut self) -> Vec<u8> {
        let eol = if self.0.u8(..10) == 0 { "\n" } else { "\r\n" };
        let method = self.mostly(
            &["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"],
            &["get", "G T", "GET\t", "CONNECT", "PRI"],
        );
        let target = self.mostly(
            &[
                "/",
                "/a?b=1",
                "/a%20b",
                "/{\"a\":1}",
                "/a|b",
                "/~x",
                "//a",
                "/a?x={}",
            ],
            &[
                "*",
                "http://x/y",
                "x/y",
                "/a#f",
                "/\u{e9}",
                "/a<b",
                "/a?\"b",
                "/a`b",
                "h:80",
            ],
        );
        let version = self.mostly(
            &["HTTP/1.1", "HTTP/1.0"],
            &["HTTP/1.2", "http/1.1", "HTTP/2.0"],
        );
        let sep = self.mostly(&[" "], &["  ", "\t"]);
        let mut wire = format!("{method}{sep}{target} {version}{eol}");
        if self.0.u8(..8) != 0 {
            wire.push_str(&format!("Host: h{eol}"));
        }
        let mut body = Vec::new();
        let framing = self.0.u8(..6);
        for _ in 0..self.0.usize(0..4) {
            let name = self.mostly(
                &["X-A", "Accept", "Connection", "TE", "X_Under"],
                &["X\u{1}Bad", "Upgrade", "Expect", "X A"],
            );
            let value = self.mostly(
                &["1", "close", "keep-alive", "trailers", "a\tb", ""],
                &["a\u{0}b", "h2c", "100-continue", "\u{7f}", "caf\u{e9}"],
            );
            let colon = self.mostly(&[": ", ":", ":\t"], &[" : ", " :"]);
            wire.push_str(&format!("{name}{colon}{value}{eol}"));
        }
        match framing {
            0 | 1 => {
                let len = self.mostly(
                    &["5", "05", " 5 "],
                    &["+5", "5, 5", "5,6", "-1", "0x5", "", "6"],
                );
                wire.push_str(&format!("Content-Length: {len}{eol}"));
                body.extend_from_slice(b"hello");
            }
            2 | 3 => {
                let te = self.mostly(
                    &["chunked", "Chunked", " chunked "],
                    &["gzip, chunked", "chunked, chunked", "identity", "xchunked"],
                );
                wire.push_str(&format!("Transfer-Encoding: {te}{eol}"));
                if self.0.u8(..6) == 0 {
                    wire.push_str(&format!("Content-Length: 5{eol}"));
                }
                body.extend_from_slice(self.chunks().as_slice());
            }
            _ => {}
        }
        if self.0.u8(..12) == 0 {
            wire.push_str(&format!(" folded{eol}"));
        }
        wire.push_str(eol);
        let mut bytes = wire.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }

    fn chunks(&mut self) -> Vec<u8> {
        let mut out = String::new();
        for _ in 0..self.0.usize(0..3) {
            let size = self.mostly(
                &["5", "05", "5 ", "5;x=y", "00000000000000005"],
                &["+5", " 5", "5;x\ny", "0x5", "fffffffffffffffff", "6", "4"],
            );
            let end = self.mostly(&["\r\n"], &["\n", "\r"]);
            let data_end = self.mostly(&["\r\n"], &["\n", "XX"]);
            out.push_str(&format!("{size}{end}hello{data_end}"));
        }
        let last = self.mostly(
            &["0\r\n\r\n", "0\r\nX: y\r\n\r\n"],
            &[
                "0\r\nX: y\n\r\n",
                "0\n\n",
                "0\r\nX y\r\n\r\n",
                "0\r\n",
                "0\r\n\n",
            ],
        );
        out.push_str(last);
        out.into_bytes()
    }
}

#[tokio::test]
async fn the_codec_and_hyper_read_requests_alike() {
    let cases: usize = std::env::var("DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seed: u64 = std::env::var("DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7e57_c0de);
    let mut gen = Gen(fastrand::Rng::with_seed(seed));
    let mut disagreements = Vec::new();
    let (mut accepted, mut refused, mut stricter) = (0, 0, 0);
    for _ in 0..cases {
        let wire = gen.request();
        let (ours, to_hyper) = codec_reads(&wire);
        let theirs = hyper_reads(&to_hyper).await;
        let agree = match (&ours, &theirs) {
            (
                Codec::Request {
                    method,
                    target,
                    body,
                },
                Hyper::Request {
                    method: m,
                    target: t,
                    body: b,
                },
            ) => {
                accepted += 1;
                method == m && target == t && body == b
            }
            (Codec::Refused(_), Hyper::Refused(_) | Hyper::BodyFailed) => {
                refused += 1;
                true
            }
            (Codec::Refused(_), _) if stricter_on_purpose(&wire) => {
                stricter += 1;
                true
            }
            // Cut short: neither has a whole request.
            (Codec::Incomplete, Hyper::Nothing | Hyper::BodyFailed) => true,
            // A cut body: hyper gave its service the head, and the body then failed.
            (Codec::Incomplete, Hyper::Request { .. }) => false,
            _ => false,
        };
        if !agree {
            disagreements.push(format!(
                "{:?}\n    codec: {ours:?}\n    hyper: {theirs:?}",
                String::from_utf8_lossy(&wire)
            ));
        }
    }
    println!(
        "{cases} cases from seed {seed:#x}: {accepted} read alike, {refused} refused by both, {stricter} refused by the codec on purpose"
    );
    assert!(
        disagreements.is_empty(),
        "{} of {cases} cases read differently (seed {seed:#x}); the first ones:\n{}",
        disagreements.len(),
        disagreements
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---- responses: the lean exchange (raw.rs, on the codec) against hyper's client ----

/// What a client of the proxy would get of a response: status, body and trailers, or that the
/// exchange failed (refused head, or a body cut off).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Whole {
        status: u16,
        body: Vec<u8>,
        trailers: Vec<(String, String)>,
    },
    Failed,
}

struct Nowhere;

impl token_proxy::proxy::raw::Reuse for Nowhere {
    fn reuse(&self, _conn: token_proxy::proxy::raw::RawConn) {}
}

/// An upstream connection that sends `wire` and then closes its side.
async fn upstream_sending(wire: Vec<u8>) -> tokio::net::TcpStream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(&wire).await;
        let _ = s.shutdown().await;
        let _ = s.read(&mut buf).await;
    });
    tokio::net::TcpStream::connect(addr).await.unwrap()
}

fn kept_trailers(map: Option<&http::HeaderMap>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = map
        .into_iter()
        .flatten()
        .filter(|(n, _)| !codec::is_forbidden_trailer(n.as_str().as_bytes()))
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

async fn lean_reads(method: &http::Method, wire: Vec<u8>) -> Answer {
    let stream = upstream_sending(wire).await;
    let conn = token_proxy::proxy::raw::RawConn::new(stream);
    let (mut parts, ()) = http::Request::builder()
        .method(method.clone())
        .uri("/")
        .body(())
        .unwrap()
        .into_parts();
    parts
        .headers
        .insert("host", http::HeaderValue::from_static("up"));
    let done: token_proxy::proxy::raw::Done = Arc::new(Nowhere);
    let Ok(Ok(response)) =
        tokio::time::timeout(Duration::from_secs(2), conn.exchange(&parts, done)).await
    else {
        return Answer::Failed;
    };
    let status = response.status().as_u16();
    match tokio::time::timeout(Duration::from_secs(2), response.into_body().collect()).await {
        Ok(Ok(collected)) => Answer::Whole {
            status,
            trailers: kept_trailers(collected.trailers()),
            body: collected.to_bytes().to_vec(),
        },
        _ => Answer::Failed,
    }
}

async fn hyper_client_reads(method: &http::Method, wire: Vec<u8>) -> Answer {
    let stream = upstream_sending(wire).await;
    let Ok((mut sender, conn)) = hyper::client::conn::http1::Builder::new()
        .max_headers(512)
        .handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(stream))
        .await
    else {
        return Answer::Failed;
    };
    let driving = tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method.clone())
        .uri("/")
        .header("host", "up")
        .body(http_body_util::Empty::new())
        .unwrap();
    let answer = match tokio::time::timeout(Duration::from_secs(2), sender.send_request(request))
        .await
    {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            match tokio::time::timeout(Duration::from_secs(2), response.into_body().collect()).await
            {
                Ok(Ok(collected)) => Answer::Whole {
                    status,
                    trailers: kept_trailers(collected.trailers()),
                    body: collected.to_bytes().to_vec(),
                },
                _ => Answer::Failed,
            }
        }
        _ => Answer::Failed,
    };
    driving.abort();
    answer
}

/// Random response streams: status lines, framing fields and their values, chunk syntax and
/// trailers, the pieces that smuggling and desync research mutates on the response side.
fn response(gen: &mut Gen) -> (http::Method, Vec<u8>) {
    let method = if gen.0.u8(..6) == 0 {
        http::Method::HEAD
    } else {
        http::Method::GET
    };
    let status = gen.mostly(
        &["200 OK", "200 OK", "404 Not Found"],
        &[
            "204 No Content",
            "304 Not Modified",
            "100 Continue",
            "2000 X",
            "20 OK",
        ],
    );
    let eol = gen.mostly(&["\r\n"], &["\n"]);
    let mut wire = format!("HTTP/1.1 {status}{eol}X-A: 1{eol}");
    let mut body = String::new();
    match gen.0.u8(..4) {
        0 => {
            let len = gen.mostly(&["5", "05"], &["5, 5", "+5", "-1", "6", "4", "5,6", ""]);
            wire.push_str(&format!("Content-Length: {len}{eol}"));
            if gen.0.u8(..8) == 0 {
                wire.push_str(&format!("Content-Length: 5{eol}"));
            }
            body.push_str("hello");
        }
        1 | 2 => {
            let te = gen.mostly(
                &["chunked", "Chunked"],
                &["gzip, chunked", "gzip", "chunked, gzip"],
            );
            wire.push_str(&format!("Transfer-Encoding: {te}{eol}"));
            if gen.0.u8(..6) == 0 {
                wire.push_str(&format!("Content-Length: 3{eol}"));
            }
            body.push_str(&String::from_utf8(gen.chunks()).unwrap());
        }
        _ => body.push_str("until the end"),
    }
    wire.push_str(eol);
    wire.push_str(&body);
    (method, wire.into_bytes())
}

/// The lean exchange's deliberate strictnesses on responses (README, "Message framing"): it
/// cuts a chunked body at a bare LF or a lone CR in the chunk framing or the trailers, where
/// hyper's client reads on.
fn lean_stricter_on_purpose(wire: &[u8]) -> bool {
    let text = String::from_utf8_lossy(wire);
    let Some(head_end) = text
        .find("\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| text.find("\n\n").map(|i| i + 2))
    else {
        return false;
    };
    let body = &text[head_end..];
    text[..head_end].to_ascii_lowercase().contains("chunked")
        && body.char_indices().any(|(i, c)| {
            (c == '\n' && !body[..i].ends_with('\r'))
                || (c == '\r' && !body[i + 1..].starts_with('\n'))
        })
}

#[tokio::test]
async fn the_lean_exchange_and_hyper_read_responses_alike() {
    let cases: usize = std::env::var("DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(1_000, |n: usize| n / 10);
    let seed: u64 = std::env::var("DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7e57_c0de);
    let mut gen = Gen(fastrand::Rng::with_seed(seed ^ 0x5e5));
    let mut disagreements = Vec::new();
    let (mut alike, mut stricter) = (0, 0);
    for _ in 0..cases {
        let (method, wire) = response(&mut gen);
        let ours = lean_reads(&method, wire.clone()).await;
        let theirs = hyper_client_reads(&method, wire.clone()).await;
        if ours == theirs {
            alike += 1;
        } else if ours == Answer::Failed && lean_stricter_on_purpose(&wire) {
            stricter += 1;
        } else {
            disagreements.push(format!(
                "{method} -> {:?}\n    lean:  {ours:?}\n    hyper: {theirs:?}",
                String::from_utf8_lossy(&wire)
            ));
        }
    }
    println!("{cases} responses from seed {seed:#x}: {alike} read alike, {stricter} cut by the lean exchange on purpose");
    assert!(
        disagreements.is_empty(),
        "{} of {cases} responses read differently (seed {seed:#x}); the first ones:\n{}",
        disagreements.len(),
        disagreements
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
