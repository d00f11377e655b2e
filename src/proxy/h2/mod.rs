//! HTTP/2 (RFC 9113) as the lean path speaks it to an `https` upstream that chooses it by
//! ALPN, for the front door's bodiless requests: the thread's requests share one connection
//! to the upstream, and their frames go out together.
//!
//! Why not hyper's client, which also speaks HTTP/2: through it, a proxied GET cost 64,000
//! instructions (callgrind), against 17,000 for the lean HTTP/1.1 exchange over TLS; HTTP/2
//! lets the upstream and the proxy read and write many requests per system call and TLS
//! record, which one HTTP/1.1 connection per request in flight cannot.
//!
//! Data flows one way: [`conn`] (the thread's connections, their tasks, the request and body
//! futures) -> [`session`] (one connection's state, no I/O) -> the codec: [`frame`] (the frame
//! header, each frame type's rules, the frames a client writes) and [`hpack`] (header
//! compression, RFC 7541, over [`huffman`], its string code). Every rule lives once, here,
//! as [`super::codec`] holds HTTP/1.1's.

pub mod conn;
pub mod frame;
pub mod hpack;
pub mod huffman;
pub mod session;

/// Bytes from hex digits, spaces ignored: the RFC's examples as printed.
#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The codec against another implementation: hyper's HTTP/2 server (the `h2` crate) reads
/// the requests [`hpack::encode`] and [`frame`] write, and the responses its encoder writes,
/// dynamic table and Huffman coding included, decode here to what it was given.
#[cfg(test)]
mod tests {
    use super::frame::{self, flag, kind, Head, HEAD_LEN};
    use super::hpack::{self, encode};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Fields = Vec<(String, String)>;

    async fn serve_one(stream: tokio::net::TcpStream) {
        let service = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
            let echo = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            };
            let response = http::Response::builder()
                .status(203)
                .header("x-path", req.uri().path_and_query().unwrap().as_str())
                .header("x-authority", req.uri().authority().unwrap().as_str())
                .header("x-auth", echo("authorization"))
                .header("x-custom", echo("x-custom"))
                .header("x-big", "v".repeat(5000))
                .header("content-type", "text/plain; charset=utf-8")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"hello\n",
                )))
                .unwrap();
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    }

    /// Reads frames until stream `id` ends: its response fields and body.
    async fn response(
        conn: &mut tokio::net::TcpStream,
        buf: &mut Vec<u8>,
        decoder: &mut hpack::Decoder,
        id: u32,
    ) -> (Fields, Vec<u8>) {
        let (mut fields, mut body, mut block) = (Fields::new(), Vec::new(), Vec::new());
        loop {
            while let Some(head) = Head::parse(buf).filter(|h| buf.len() >= HEAD_LEN + h.len) {
                let payload: Vec<u8> = buf.drain(..HEAD_LEN + head.len).skip(HEAD_LEN).collect();
                match head.kind {
                    kind::SETTINGS if !head.has(flag::ACK) => {
                        frame::settings(&head, &payload).unwrap();
                        let mut ack = Vec::new();
                        frame::write_settings_ack(&mut ack);
                        conn.write_all(&ack).await.unwrap();
                    }
                    kind::HEADERS | kind::CONTINUATION if head.stream == id => {
                        if head.kind == kind::HEADERS {
                            block.extend_from_slice(frame::headers(&head, &payload).unwrap());
                        } else {
                            block.extend_from_slice(&payload);
                        }
                        if head.has(flag::END_HEADERS) {
                            decoder
                                .decode(&block, |n, v| {
                                    fields.push((
                                        String::from_utf8(n.to_vec()).unwrap(),
                                        String::from_utf8(v.to_vec()).unwrap(),
                                    ))
                                })
                                .unwrap();
                            block.clear();
                        }
                    }
                    kind::DATA if head.stream == id => {
                        body.extend_from_slice(frame::data(&head, &payload).unwrap())
                    }
                    _ => {}
                }
                if head.stream == id && head.has(flag::END_STREAM) {
                    return (fields, body);
                }
            }
            let mut chunk = [0u8; 16_384];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn hyper_reads_our_requests_and_we_read_its_responses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server =
            tokio::spawn(async move { serve_one(listener.accept().await.unwrap().0).await });
        let run = async {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut out = frame::PREFACE.to_vec();
            frame::write_settings(&mut out, &[(frame::setting::ENABLE_PUSH, 0)]);
            conn.write_all(&out).await.unwrap();
            let (mut buf, mut decoder) = (Vec::new(), hpack::Decoder::default());
            // Three requests on one connection: the later responses refer to the server's
            // dynamic table for the fields they repeat.
            for (id, path) in [(1, "/"), (3, "/v1/items?a=1&b=%2F"), (5, "/x")] {
                let mut block = Vec::new();
                encode::indexed(&mut block, 2);
                encode::indexed(&mut block, 7);
                encode::with_name(&mut block, 4, path.as_bytes(), false);
                encode::with_name(&mut block, 1, b"api.example.cn:8443", false);
                encode::with_name(&mut block, 23, b"Bearer tok-123", true);
                encode::field(&mut block, b"x-custom", "c".repeat(200).as_bytes(), false);
                let mut out = Vec::new();
                // A small frame size, so the block is cut into CONTINUATION frames.
                frame::write_headers(&mut out, id, &block, true, 64);
                conn.write_all(&out).await.unwrap();
                let (fields, body) = response(&mut conn, &mut buf, &mut decoder, id).await;
                let get = |name: &str| {
                    let all: Vec<&str> = fields
                        .iter()
                        .filter(|(n, _)| n == name)
                        .map(|(_, v)| v.as_str())
                        .collect();
                    assert_eq!(all.len(), 1, "{name} in {fields:?}");
                    all[0].to_owned()
                };
                assert_eq!(fields[0], (":status".into(), "203".into()));
                assert_eq!(get("x-path"), path);
                assert_eq!(get("x-authority"), "api.example.cn:8443");
                assert_eq!(get("x-auth"), "Bearer tok-123");
                assert_eq!(get("x-custom"), "c".repeat(200));
                assert_eq!(get("x-big"), "v".repeat(5000));
                assert_eq!(get("content-type"), "text/plain; charset=utf-8");
                assert_eq!(body, b"hello\n");
            }
            // The server's encoder did index fields: later responses referred to them.
            assert!(decoder.entries() >= 3, "{} entries", decoder.entries());
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the exchange finished in time");
        server.abort();
    }
}
