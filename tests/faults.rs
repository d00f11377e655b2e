//! The fault suite: what the identity provider, the upstream and clients can do wrong, and
//! the answer each fault gets. Real sockets throughout; time-driven refresher cases live next
//! to the refresher (`src/token/refresh.rs`) on tokio's paused clock.

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::*;
use token_proxy::demo::{self, CannedResponse, DEMO_CLIENT_ID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MINUTE: Duration = Duration::from_secs(60);

/// Starts a stack whose IdP answers `canned` from the start; returns the proxy's 503 message.
async fn first_answer_with(canned: CannedResponse, cred_extra: &str) -> (Stack, serde_json::Value) {
    let idp = start_token_endpoint(MINUTE).await;
    idp.state().set_canned(Some(canned));
    let api = start_upstream(&idp).await;
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n{}{}",
        credential("api", &demo::token_url(&idp), cred_extra),
        route(
            &format!("http://{}", api.addr()),
            "api",
            "token_wait_secs = 3"
        )
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    assert_eq!(body["error"], "token_unavailable");
    assert!(
        api.state().records().is_empty(),
        "nothing reached the upstream without a token"
    );
    (Stack { idp, api, proxy }, body)
}

fn message(body: &serde_json::Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

// ---- the identity provider ----

#[tokio::test]
async fn idp_refusing_connections_is_503_with_the_reason() {
    let text = format!(
        "{}{}",
        credential("api", &format!("http://{}/token", fresh_addr()), ""),
        route("http://127.0.0.1:9", "api", "")
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        message(&reply.json()).contains("could not reach the token endpoint"),
        "{}",
        reply.json()
    );
}

#[tokio::test]
async fn idp_hanging_times_out() {
    let idp = start_token_endpoint(MINUTE).await;
    idp.state().set_delay(Duration::from_secs(30));
    let text = format!(
        "{}{}",
        credential("api", &demo::token_url(&idp), "token_timeout_secs = 0.5"),
        route("http://127.0.0.1:9", "api", "")
    );
    let proxy = start_proxy(&text).await;
    let started = tokio::time::Instant::now();
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        message(&reply.json()).contains("timed out"),
        "{}",
        reply.json()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn idp_slow_dripping_a_10_mib_body_times_out() {
    let mut canned = CannedResponse::new(
        StatusCode::OK,
        "application/json",
        "x".repeat(10 * 1024 * 1024),
    );
    canned.drip = Some(Duration::from_millis(1));
    let (_s, body) = first_answer_with(canned, "token_timeout_secs = 0.5").await;
    assert!(message(&body).contains("timed out"), "{body}");
}

#[tokio::test]
async fn idp_body_over_1_mib_is_refused() {
    let big = format!("{{\"access_token\":\"{}\"}}", "a".repeat(2 * 1024 * 1024));
    let (_s, body) = first_answer_with(
        CannedResponse::new(StatusCode::OK, "application/json", big),
        "",
    )
    .await;
    assert!(
        message(&body).contains("larger than 1048576 bytes"),
        "{body}"
    );
}

/// A proxy whose token endpoint answers `body` (HTTP 200, JSON), once it has made its first
/// token request; its route goes nowhere. The endpoint and the proxy.
async fn proxy_after_one_token_answer(
    body: impl Into<String>,
) -> (demo::DemoServer<demo::IdpState>, token_proxy::app::Running) {
    let idp = start_token_endpoint(MINUTE).await;
    idp.state().set_canned(Some(CannedResponse::new(
        StatusCode::OK,
        "application/json",
        body,
    )));
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route("http://127.0.0.1:9", "api", "")
    );
    let proxy = start_proxy(&text).await;
    assert!(eventually(Duration::from_secs(5), || idp.state().request_count() == 1).await);
    (idp, proxy)
}

/// The limit is exact: a token response of 1 MiB (1048576 bytes) is taken, one byte more is
/// refused.
#[tokio::test]
async fn idp_body_limit_is_exactly_1_mib() {
    const LIMIT: usize = 1024 * 1024;
    for (size, state) in [(LIMIT, "valid"), (LIMIT + 1, "pending")] {
        let head = r#"{"access_token":"tok","expires_in":3600,"pad":""#;
        let body = format!("{head}{}\"}}", "x".repeat(size - head.len() - 2));
        assert_eq!(body.len(), size);
        let (_idp, proxy) = proxy_after_one_token_answer(body).await;
        let admin = proxy.admin_addr().unwrap();
        let settled = eventually_async(Duration::from_secs(5), || async {
            let ready = get(admin, "/readyz").await.json();
            let c = &ready["credentials"]["api"];
            c["state"] == state && (state == "valid") == c["last_error"].is_null()
        })
        .await;
        let ready = get(admin, "/readyz").await.json();
        assert!(settled, "{size} bytes: {ready}");
        if state == "pending" {
            let e = ready["credentials"]["api"]["last_error"].as_str().unwrap();
            assert!(e.contains("larger than 1048576 bytes"), "{e}");
        }
    }
}

#[tokio::test]
async fn idp_500_html_page_is_named_as_such() {
    let canned = CannedResponse::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/html",
        "<html><h1>500</h1></html>",
    );
    let (_s, body) = first_answer_with(canned, "").await;
    assert!(
        message(&body).contains("HTTP 500") && message(&body).contains("HTML page"),
        "{body}"
    );
}

#[tokio::test]
async fn idp_429_retry_after_is_reported_and_honoured() {
    let mut canned = CannedResponse::new(StatusCode::TOO_MANY_REQUESTS, "application/json", "{}");
    canned.retry_after = Some(30);
    let (s, body) = first_answer_with(canned, "").await;
    assert!(message(&body).contains("HTTP 429"), "{body}");
    // Requests keep coming; the IdP is not asked again inside the Retry-After window.
    for _ in 0..5 {
        assert_eq!(
            get(s.addr(), "/again").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(s.idp.state().request_count(), 1);
}

#[tokio::test]
async fn idp_invalid_client_with_azure_error_codes_is_explained() {
    let canned = CannedResponse::new(
        StatusCode::UNAUTHORIZED,
        "application/json",
        r#"{"error":"invalid_client","error_description":"AADSTS7000222: The provided client secret keys are expired.","error_codes":[7000222],"trace_id":"tr-9","correlation_id":"co-9"}"#,
    );
    let (s, body) = first_answer_with(canned, "").await;
    let m = message(&body);
    for part in [
        "invalid_client",
        "7000222",
        "tr-9",
        "co-9",
        "hint: check client_id and the client secret",
    ] {
        assert!(m.contains(part), "{part} missing: {m}");
    }
    // A permanent error: the next attempt waits a minute, whatever the request rate.
    for _ in 0..5 {
        get(s.addr(), "/again").await;
    }
    assert_eq!(s.idp.state().request_count(), 1);
}

#[tokio::test]
async fn idp_200_without_a_token_is_an_error() {
    let canned = CannedResponse::new(
        StatusCode::OK,
        "application/json",
        r#"{"token_type":"Bearer","expires_in":3599}"#,
    );
    let (_s, body) = first_answer_with(canned, "").await;
    assert!(message(&body).contains("no access_token"), "{body}");
}

#[tokio::test]
async fn idp_200_with_an_error_field_is_an_error() {
    let canned = CannedResponse::new(
        StatusCode::OK,
        "application/json",
        r#"{"error":"server_error","access_token":"x"}"#,
    );
    let (_s, body) = first_answer_with(canned, "").await;
    assert!(message(&body).contains("server_error"), "{body}");
}

#[tokio::test]
async fn idp_expires_in_zero_negative_and_nonsense_are_refused() {
    for bad in ["0", "-5", "\"soon\""] {
        let body = format!(r#"{{"access_token":"tok","token_type":"Bearer","expires_in":{bad}}}"#);
        let (_s, reply) = first_answer_with(
            CannedResponse::new(StatusCode::OK, "application/json", body),
            "",
        )
        .await;
        assert!(message(&reply).contains("expires_in"), "{bad}: {reply}");
    }
}

#[tokio::test]
async fn idp_expires_in_huge_is_clamped_and_missing_uses_the_default() {
    for (body, lo, hi) in [
        (
            r#"{"access_token":"tok-a","expires_in":1099511627776}"#,
            80_000,
            86_400,
        ),
        (r#"{"access_token":"tok-b"}"#, 500, 600),
        (
            r#"{"access_token":"tok-c","expires_in":"3599"}"#,
            3_000,
            3_599,
        ),
    ] {
        let (_idp, proxy) = proxy_after_one_token_answer(body).await;
        let admin = proxy.admin_addr().unwrap();
        let mut left = 0;
        for _ in 0..50 {
            let ready = get(admin, "/readyz").await;
            if ready.status == StatusCode::OK {
                left = ready.json()["credentials"]["api"]["expires_in_secs"]
                    .as_u64()
                    .unwrap();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!((lo..=hi).contains(&left), "{body}: {left}");
    }
}

#[tokio::test]
async fn idp_redirects_are_never_followed() {
    let other = start_token_endpoint(MINUTE).await;
    let mut canned = CannedResponse::new(StatusCode::TEMPORARY_REDIRECT, "text/plain", "");
    canned.headers.push(("location", demo::token_url(&other)));
    let (_s, body) = first_answer_with(canned, "").await;
    assert!(message(&body).contains("HTTP 307"), "{body}");
    assert_eq!(
        other.state().request_count(),
        0,
        "the secret went to the redirect target"
    );
}

#[tokio::test]
async fn rotated_secret_file_is_used_at_the_next_refresh() {
    let dir = temp_file("secret-1", "first-secret-value\n")
        .parent()
        .unwrap()
        .to_path_buf();
    std::fs::write(dir.join("secret-2"), "second-secret-value\n").unwrap();
    let link = dir.join("current");
    std::os::unix::fs::symlink(dir.join("secret-1"), &link).unwrap();
    let idp = start_token_endpoint(Duration::from_secs(2)).await;
    idp.state().set_client_secret("first-secret-value");
    let api = start_upstream(&idp).await;
    let text = format!(
        "[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"{DEMO_CLIENT_ID}\"\nclient_secret_file = \"{}\"\n{}",
        demo::token_url(&idp),
        link.display(),
        route(&format!("http://{}", api.addr()), "api", "")
    );
    let proxy = start_proxy(&text).await;
    assert_eq!(
        get(proxy.route_addrs()[0], "/one").await.status,
        StatusCode::OK
    );
    // Kubernetes-style swap: a new file, then the link is replaced atomically. The IdP takes
    // both secrets meanwhile, as Azure does during a rotation: a refresh that read the file
    // just before the swap must not be refused (a permanent error, retried a minute later).
    idp.state()
        .set_client_secrets(&["first-secret-value", "second-secret-value"]);
    let tmp = dir.join("current.tmp");
    std::os::unix::fs::symlink(dir.join("secret-2"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let used_second = || {
        idp.state().requests().iter().any(|r| {
            r.form
                .iter()
                .any(|(k, v)| k == "client_secret" && v == "second-secret-value")
        })
    };
    assert!(
        eventually(Duration::from_secs(5), used_second).await,
        "the new secret was never sent"
    );
    // The old secret is revoked: from here on only the file's new secret gets tokens, and
    // tokens keep coming (they last 2 s).
    idp.state().set_client_secret("second-secret-value");
    let issued = idp.state().tokens.all().len();
    assert!(
        eventually(Duration::from_secs(5), || idp.state().tokens.all().len()
            >= issued + 2)
        .await,
        "refreshes with the new secret"
    );
    assert_eq!(
        get(proxy.route_addrs()[0], "/two").await.status,
        StatusCode::OK
    );
}

// ---- the upstream ----

#[tokio::test]
async fn upstream_resetting_mid_body_truncates_the_response_without_hanging() {
    let s = Stack::start(MINUTE, "", "").await;
    let resp = client()
        .request(
            Request::get(format!("http://{}/reset/100000", s.addr()))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .unwrap();
    assert!(
        collected.is_err(),
        "the client sees the body break, not a clean end"
    );
    assert_eq!(
        get(s.addr(), "/after").await.status,
        StatusCode::OK,
        "the proxy keeps serving"
    );
}

#[tokio::test]
async fn upstream_401_once_refreshes_and_replays_the_request() {
    let s = Stack::start(MINUTE, "", "").await;
    assert_eq!(get(s.addr(), "/warm").await.status, StatusCode::OK);
    // The IdP revokes every token it issued: the upstream now answers 401 to the cached one.
    s.idp.state().tokens.revoke_all();
    let req = Request::post(format!("http://{}/replay", s.addr()))
        .body(Full::new(bytes::Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["body_bytes"], 7, "the body was replayed");
    assert_eq!(s.idp.state().request_count(), 2, "one new token");
    assert_eq!(s.api.state().rejected(), 1, "exactly one 401 upstream");
}

/// A bodiless GET takes the front door, which writes the token straight from the slot and
/// tells which one the upstream refused from the bytes it sent.
#[tokio::test]
async fn upstream_401_to_a_get_refreshes_and_replays_it() {
    let s = Stack::start(MINUTE, "", "").await;
    assert_eq!(get(s.addr(), "/warm").await.status, StatusCode::OK);
    let revoked = s.api.state().records()[0].headers["authorization"].clone();
    s.idp.state().tokens.revoke_all();
    let reply = get(s.addr(), "/replay").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(s.idp.state().request_count(), 2, "one new token");
    assert_eq!(s.api.state().rejected(), 1, "exactly one 401 upstream");
    let records = s.api.state().records();
    let last = records.last().unwrap();
    assert_eq!(last.target, "/api/replay");
    assert!(last.token_was_current, "replayed with the new token");
    assert_ne!(last.headers["authorization"], revoked);
}

#[tokio::test]
async fn upstream_401_twice_passes_the_second_one_through() {
    let s = Stack::start(MINUTE, "", "").await;
    let reply = get(s.addr(), "/status/401").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.json(),
        serde_json::json!({"status": 401}),
        "the upstream's own body"
    );
    assert_eq!(
        s.idp.state().request_count(),
        2,
        "one refresh for the first 401"
    );
    assert_eq!(s.api.state().records().len(), 2, "sent once, replayed once");
    // More 401s within the invalidation interval cause no more token requests.
    for _ in 0..3 {
        assert_eq!(
            get(s.addr(), "/status/401").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(s.idp.state().request_count(), 2);
}

#[tokio::test]
async fn upstream_401_is_passed_through_when_retry_on_401_is_off() {
    let s = Stack::start(MINUTE, "", "retry_on_401 = false").await;
    assert_eq!(
        get(s.addr(), "/status/401").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.idp.state().request_count(), 1);
    assert_eq!(s.api.state().records().len(), 1);
    // The token is kept, not retired: a retired one shows `expired` until the refresher's
    // next fetch (a second later at most), and that fetch would count a second request.
    let ready = get(s.admin(), "/readyz").await.json();
    assert_eq!(ready["credentials"]["api"]["state"], "valid", "{ready}");
    assert_eq!(get(s.addr(), "/again").await.status, StatusCode::OK);
    assert_eq!(s.idp.state().request_count(), 1, "the same token, kept");
    let sent: Vec<_> = s
        .api
        .state()
        .records()
        .iter()
        .map(|r| r.headers["authorization"].clone())
        .collect();
    assert_eq!(sent[0], sent[1]);
}

#[tokio::test]
async fn upstream_switching_protocols_unasked_is_502() {
    let s = Stack::start(MINUTE, "", "").await;
    let reply = get(s.addr(), "/bad101").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"], "upstream_unavailable");
}

// ---- clients ----

#[tokio::test]
async fn client_disconnecting_mid_upload_leaves_the_proxy_serving() {
    let s = Stack::start(MINUTE, "", "").await;
    let mut stream = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&[b'u'; 10_000]).await.unwrap();
    // The upload is under way at the upstream before the client goes.
    assert!(
        eventually(Duration::from_secs(5), || s.api.state().in_flight() == 1).await,
        "the upload reached the upstream"
    );
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || s.api.state().in_flight() == 0).await,
        "the upstream request was ended when the client went"
    );
    assert_eq!(get(s.addr(), "/after").await.status, StatusCode::OK);
}

/// A client that trickles a header line every 100 ms never finishes its head: the 0.5 s
/// timer counts from the first byte, not from the last read, so the connection is closed at
/// about 0.5 s, without an answer. A timer restarted on every read would never fire.
#[tokio::test]
async fn slowloris_headers_are_cut_off() {
    let s = Stack::start_with("header_read_timeout_secs = 0.5", MINUTE, "", "").await;
    let stream = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = tokio::time::Instant::now();
    let trickle = tokio::spawn(async move {
        if writer
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .is_err()
        {
            return;
        }
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let line = format!("X-Slow-{i}: 1\r\n");
            if writer.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let mut read = Vec::new();
    let mut buf = [0u8; 1024];
    let closed_after = loop {
        match tokio::time::timeout_at(started + Duration::from_secs(3), reader.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after 3 s of trickled headers"),
        }
    };
    trickle.abort();
    assert!(
        read.is_empty(),
        "no answer: {}",
        String::from_utf8_lossy(&read)
    );
    assert!(
        closed_after >= Duration::from_millis(450) && closed_after < Duration::from_millis(1200),
        "closed after {closed_after:?}, not at the 0.5 s timeout"
    );
    assert!(s.api.state().records().is_empty());
}

/// A kept-alive connection is kept between requests (a second request at 0.25 s is served
/// on it), and closed once it has been idle for the 0.5 s timeout.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let s = Stack::start_with("header_read_timeout_secs = 0.5", MINUTE, "", "").await;
    let mut conn = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    assert!(answer_on(&mut conn, "/one")
        .await
        .starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(answer_on(&mut conn, "/two")
        .await
        .starts_with("HTTP/1.1 200"));
    let (idle, read) = expect_closed(&mut conn, Duration::from_secs(3)).await;
    assert!(
        read.is_empty(),
        "no answer: {}",
        String::from_utf8_lossy(&read)
    );
    assert!(
        idle >= Duration::from_millis(400) && idle < Duration::from_millis(1500),
        "closed after {idle:?} idle, not at the 0.5 s timeout"
    );
    assert_eq!(s.api.state().records().len(), 2);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_closes() {
    // A raw upstream records whatever reaches it, both headers or either one.
    let upstream = ScriptedUpstream::start(names_the_target).await;
    let (_idp, proxy) = proxy_to_scripted(upstream.addr, MINUTE, "").await;
    let addr = proxy.route_addrs()[0];
    for raw in [
        "POST /clte HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /tecl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "GET /get HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        // Where such a body ends is read two ways by the servers behind proxies (the
        // desync of CL.TE and TE.CL smuggling): refused, as nginx and Envoy do, and the
        // connection closed, since where the next request would start is unknown.
        let started = tokio::time::Instant::now();
        let answer = raw_exchange(addr, raw.as_bytes(), Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("\"error\":\"bad_request\""), "{answer}");
        assert!(answer.contains("Content-Length and Transfer-Encoding"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2), "the proxy closed the connection");
    }
    assert!(
        upstream.seen().is_empty(),
        "forwarded: {:?}",
        upstream.seen()
    );
}

#[tokio::test]
async fn duplicate_content_length_is_refused_or_collapsed() {
    let s = Stack::start(MINUTE, "", "").await;
    let answer = raw_exchange(
        s.addr(),
        b"POST /dup HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"error\":\"bad_request\""), "{answer}");
    let answer = raw_exchange(
        s.addr(),
        b"POST /same HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let rec = s.api.state().records().pop().unwrap();
    assert_eq!(rec.headers.get_all("content-length").iter().count(), 1);
    assert_eq!(rec.target, "/api/same");
}

#[tokio::test]
async fn missing_or_duplicate_host_is_400_json() {
    let s = Stack::start(MINUTE, "", "").await;
    for raw in [
        "GET /nohost HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /twohosts HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(2)).await;
        assert!(
            answer.starts_with("HTTP/1.1 400") && answer.contains("\"error\":\"bad_request\""),
            "{answer}"
        );
    }
    assert!(s.api.state().records().is_empty());
}

#[tokio::test]
async fn host_pointing_elsewhere_does_not_move_the_token() {
    let s = Stack::start(MINUTE, "", "").await;
    let answer = raw_exchange(
        s.addr(),
        b"GET /h HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        s.api.state().records()[0].headers["host"],
        s.api.addr().to_string()
    );
}

/// Sends two heads in one write each, one with `headers` fields and one with a value of
/// `value_bytes`: both get 431 and nothing reaches the upstream.
async fn heads_over_the_limits_get_431(s: &Stack, headers: usize, value_bytes: usize) {
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: x\r\n");
    for i in 0..headers {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(value_bytes)
    );
    for raw in [many, big] {
        let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(2)).await;
        assert!(
            answer.starts_with("HTTP/1.1 431")
                && answer.contains("\"error\":\"headers_too_large\""),
            "{}",
            &answer[..answer.len().min(400)]
        );
    }
    assert!(s.api.state().records().is_empty());
}

#[tokio::test]
async fn two_hundred_headers_or_a_huge_header_get_431() {
    let s = Stack::start(MINUTE, "", "").await;
    heads_over_the_limits_get_431(&s, 200, 100_000).await;
}

#[tokio::test]
async fn configured_header_limits_give_431_on_the_front_door_path_too() {
    // Bodiless GETs, which the front door reads and answers itself.
    let s = Stack::start_with("max_header_bytes = 8192\nmax_headers = 10", MINUTE, "", "").await;
    heads_over_the_limits_get_431(&s, 12, 10_000).await;
}

#[tokio::test]
async fn body_over_the_route_limit_is_413() {
    let s = Stack::start(MINUTE, "", "max_body_bytes = 1000").await;
    let req = Request::post(format!("http://{}/big", s.addr()))
        .body(Full::new(vec![b'a'; 2000].into()))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["error"], "payload_too_large");
    assert!(
        s.api.state().records().is_empty(),
        "refused before forwarding"
    );
    // Chunked, so the size is only known while streaming.
    let chunk = format!("{:x}\r\n{}\r\n", 600, "c".repeat(600));
    let raw = format!("POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunk}{chunk}0\r\n\r\n");
    let answer = raw_exchange(s.addr(), raw.as_bytes(), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"error\":\"payload_too_large\""),
        "{answer}"
    );
    // The upload is cut off: the upstream never has the whole body (it may have a start).
    assert!(
        s.api.state().records().iter().all(|r| r.body_bytes <= 1000),
        "{:?}",
        s.api.state().records()
    );
    let req = Request::post(format!("http://{}/small", s.addr()))
        .body(Full::new(vec![b'a'; 900].into()))
        .unwrap();
    assert_eq!(send(&client(), req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn inbound_token_is_required_checked_and_stripped() {
    let token_file = temp_file("inbound", "0123456789abcdef0123456789abcdef\n");
    let s = Stack::start(
        MINUTE,
        "",
        &format!("inbound_token_file = \"{}\"", token_file.display()),
    )
    .await;
    let reply = get(s.addr(), "/none").await;
    assert_eq!(reply.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED);
    assert_eq!(reply.json()["error"], "proxy_authentication_required");
    assert!(reply.headers.contains_key("proxy-authenticate"));
    for value in [
        "Bearer wrong",
        "Bearer 0123456789abcdef0123456789abcdeF",
        "Basic 0123456789abcdef0123456789abcdef",
    ] {
        let req = Request::get(format!("http://{}/bad", s.addr()))
            .header("proxy-authorization", value)
            .body(Full::default())
            .unwrap();
        assert_eq!(
            send(&client(), req).await.status,
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "{value}"
        );
    }
    assert!(s.api.state().records().is_empty());
    let req = Request::get(format!("http://{}/good", s.addr()))
        .header(
            "proxy-authorization",
            "Bearer 0123456789abcdef0123456789abcdef",
        )
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, StatusCode::OK);
    assert!(
        s.api.state().records()[0]
            .headers
            .get("proxy-authorization")
            .is_none(),
        "stripped"
    );
}

#[tokio::test]
async fn allowed_clients_decide_who_may_connect() {
    let s = Stack::start(MINUTE, "", "allowed_clients = [\"10.0.0.0/8\"]").await;
    let reply = get(s.addr(), "/x").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.json()["error"], "forbidden");
    let s = Stack::start(
        MINUTE,
        "",
        "allowed_clients = [\"10.0.0.0/8\", \"127.0.0.0/8\"]",
    )
    .await;
    assert_eq!(get(s.addr(), "/x").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_request_that_comes_back_is_508() {
    let s = Stack::start(MINUTE, "", "").await;
    let via = token_proxy::proxy::headers::via_entry()
        .to_str()
        .unwrap()
        .to_string();
    let req = Request::get(format!("http://{}/loop", s.addr()))
        .header("via", format!("1.1 someone-else, {via}"))
        .body(Full::default())
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, StatusCode::LOOP_DETECTED);
    assert_eq!(reply.json()["error"], "loop_detected");
    // Requests from another token-proxy (another pseudonym) pass, and carry our Via.
    let req = Request::get(format!("http://{}/chain", s.addr()))
        .header("via", "1.1 token-proxy-00000000")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, StatusCode::OK);
    let vias: Vec<_> = s.api.state().records()[0]
        .headers
        .get_all("via")
        .iter()
        .cloned()
        .collect();
    assert_eq!(vias.len(), 2);
    assert_eq!(vias[1].to_str().unwrap(), via);
}

#[tokio::test]
async fn connections_over_the_limit_wait_for_a_free_slot() {
    let s = Stack::start_with("max_connections = 1", MINUTE, "", "").await;
    let addr = s.addr();
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    first
        .write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        within("the first answer", first.read(&mut buf))
            .await
            .unwrap()
            > 0
    );
    // The second connection is queued: no answer while the first stays open.
    let second = tokio::spawn(async move { get(addr, "/second").await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "served beyond max_connections");
    // Health probes are not starved by clients.
    assert_eq!(get(s.admin(), "/healthz").await.status, StatusCode::OK);
    drop(first);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .unwrap()
            .unwrap(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_rotated_inbound_token_file_takes_effect_without_a_restart() {
    let token_file = temp_file("inbound", "first-inbound-token-0123456789\n");
    let s = Stack::start(
        MINUTE,
        "",
        &format!("inbound_token_file = \"{}\"", token_file.display()),
    )
    .await;
    let with = |value: &'static str| {
        Request::get(format!("http://{}/rot", s.addr()))
            .header("proxy-authorization", value)
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(
        send(&client(), with("Bearer first-inbound-token-0123456789"))
            .await
            .status,
        StatusCode::OK
    );
    // Kubernetes-style swap of the mounted file.
    let dir = token_file.parent().unwrap();
    std::fs::write(dir.join("next"), "second-inbound-token-0123456789\n").unwrap();
    std::fs::rename(dir.join("next"), &token_file).unwrap();
    let mut switched = false;
    for _ in 0..50 {
        if send(&client(), with("Bearer second-inbound-token-0123456789"))
            .await
            .status
            == StatusCode::OK
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the new inbound token was never accepted");
    assert_eq!(
        send(&client(), with("Bearer first-inbound-token-0123456789"))
            .await
            .status,
        StatusCode::PROXY_AUTHENTICATION_REQUIRED
    );
}
