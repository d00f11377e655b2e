//! The fields a route sets beside the token (`set_headers`, `set_header_files`), and the token
//! in another field or format (`token_header`, `token_format`): what crosses the wire on every
//! path (the front door, hyper's, h2c), the 401 recovery wherever the token goes, files
//! re-read when they change, and the values kept out of `Debug`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::*;
use token_proxy::demo::{self, DemoServer, IdpState};

const APIM_KEY: &str = "apim-key-never-logged-0123";
const FILE_KEY: &str = "file-key-never-logged-4567";

/// A scripted upstream answering `200` (or what `status` says for request n), and a proxy to
/// it with `route_extra`.
async fn stack(
    route_extra: &str,
    status: impl Fn(usize) -> u16 + Send + Sync + 'static,
) -> (
    ScriptedUpstream,
    DemoServer<IdpState>,
    token_proxy::app::Running,
) {
    let n = AtomicUsize::new(0);
    let upstream = ScriptedUpstream::start(move |_: &Seen| {
        let code = status(n.fetch_add(1, Ordering::SeqCst));
        vec![Step::Write(
            format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok").into_bytes(),
        )]
    })
    .await;
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let text = format!(
        "{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route(
            &format!("http://{}/base", upstream.addr),
            "api",
            route_extra
        )
    );
    let proxy = start_proxy(&text).await;
    (upstream, idp, proxy)
}

fn request(
    method: http::Method,
    addr: std::net::SocketAddr,
    body: &'static [u8],
) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}/x"))
        .header("ocp-apim-subscription-key", "the-clients-own")
        .header("x-api-key", "the-clients-own-too")
        .header("authorization", "Basic Y2xpZW50OnB3")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

#[tokio::test]
async fn set_headers_replace_the_clients_on_every_path_and_files_are_read_again() {
    let file = temp_file("api-key", &format!("{FILE_KEY}\n"));
    let extra = format!(
        "set_headers = {{ \"Ocp-Apim-Subscription-Key\" = \"{APIM_KEY}\" }}\nset_header_files = {{ \"X-Api-Key\" = \"{}\" }}",
        file.display()
    );
    let (upstream, idp, proxy) = stack(&extra, |_| 200).await;
    let addr = proxy.route_addrs()[0];
    let sends = [
        (client(), http::Method::GET, &b""[..]),
        (client(), http::Method::POST, &b"{}"[..]),
        (h2c_client(), http::Method::GET, &b""[..]),
        (h2c_client(), http::Method::PUT, &b"x"[..]),
    ];
    for (i, (client, method, body)) in sends.into_iter().enumerate() {
        let reply = send(&client, request(method.clone(), addr, body)).await;
        assert_eq!(reply.status, StatusCode::OK, "{method}");
        let seen = &upstream.seen()[i];
        assert_eq!(
            seen.header("ocp-apim-subscription-key"),
            vec![APIM_KEY],
            "{method}"
        );
        assert_eq!(seen.header("x-api-key"), vec![FILE_KEY], "{method}");
        // The token still goes in Authorization, replacing the client's.
        let auth = seen.header("authorization");
        assert_eq!(auth.len(), 1, "{method}: {auth:?}");
        let token = auth[0].strip_prefix("Bearer ").expect("a bearer token");
        assert!(idp.state().tokens.is_current(token), "{method}");
    }
    // A rotated file is picked up while the route runs.
    std::fs::write(&file, "file-key-rotated-89").unwrap();
    let mut rotated = false;
    for _ in 0..100 {
        send(&client(), request(http::Method::GET, addr, b"")).await;
        if upstream.seen().last().unwrap().header("x-api-key") == vec!["file-key-rotated-89"] {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rotated,
        "the new file value reached the upstream within 5 s"
    );
    // An unreadable file keeps the value in use.
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    send(&client(), request(http::Method::GET, addr, b"")).await;
    assert_eq!(
        upstream.seen().last().unwrap().header("x-api-key"),
        vec!["file-key-rotated-89"]
    );
    let shown = format!("{proxy:?}");
    for secret in [APIM_KEY, FILE_KEY, "file-key-rotated-89"] {
        assert!(!shown.contains(secret), "{secret} in Debug output");
    }
}

#[tokio::test]
async fn the_token_in_another_field_and_format_leaves_the_clients_authorization_alone() {
    let extra = "token_header = \"api-key\"\ntoken_format = \"{token}\"";
    let (upstream, idp, proxy) = stack(extra, |_| 200).await;
    let addr = proxy.route_addrs()[0];
    for (i, (client, method, body)) in [
        (client(), http::Method::GET, &b""[..]),
        (client(), http::Method::POST, &b"{}"[..]),
        (h2c_client(), http::Method::GET, &b""[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = request(method.clone(), addr, body);
        req.headers_mut().insert(
            "api-key",
            http::HeaderValue::from_static("the-clients-guess"),
        );
        assert_eq!(send(&client, req).await.status, StatusCode::OK);
        let seen = &upstream.seen()[i];
        let sent = seen.header("api-key");
        assert_eq!(sent.len(), 1, "{method}: {sent:?}");
        assert!(
            idp.state().tokens.is_current(&sent[0]),
            "{method}: the bare token"
        );
        assert_eq!(
            seen.header("authorization"),
            vec!["Basic Y2xpZW50OnB3"],
            "{method}: the client's own Authorization passes"
        );
    }
}

#[tokio::test]
async fn a_401_retires_the_token_wherever_it_is_sent_and_the_request_is_replayed() {
    let extra = "token_header = \"X-Token\"\ntoken_format = \"Token {token};v=1\"";
    let token_of = |seen: &Seen| -> String {
        let v = seen.header("x-token");
        assert_eq!(v.len(), 1, "{v:?}");
        v[0].strip_prefix("Token ")
            .and_then(|t| t.strip_suffix(";v=1"))
            .expect("the route's format")
            .to_owned()
    };
    // The front door (GET) and hyper's path (POST), each on its own credential: a token is
    // retired at most once per 5 s.
    for method in [http::Method::GET, http::Method::POST] {
        // The first request is refused: its replay must carry a new token.
        let (upstream, idp, proxy) = stack(extra, |n| if n == 0 { 401 } else { 200 }).await;
        let addr = proxy.route_addrs()[0];
        let reply = send(&client(), request(method.clone(), addr, b"")).await;
        assert_eq!(reply.status, StatusCode::OK, "{method}: replayed");
        let seen = upstream.seen();
        assert_eq!(seen.len(), 2, "{method}");
        let (refused, replayed) = (token_of(&seen[0]), token_of(&seen[1]));
        assert_ne!(refused, replayed, "{method}: a new token after the 401");
        assert!(idp.state().tokens.is_current(&replayed), "{method}");
    }
}

#[tokio::test]
async fn fields_that_cannot_be_set_are_config_errors_that_never_show_a_value() {
    let base = |extra: &str| {
        format!(
            "[credentials.api]\ntoken_url = \"https://login.example.com/t/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n\
             [[routes]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.example.com\"\ncredential = \"api\"\n{extra}\n"
        )
    };
    for (extra, key) in [
        (
            "set_headers = { Host = \"h\" }",
            "routes[0].set_headers.Host",
        ),
        (
            "set_headers = { \"Content-Length\" = \"1\" }",
            "routes[0].set_headers.Content-Length",
        ),
        (
            "set_headers = { Connection = \"close\" }",
            "routes[0].set_headers.Connection",
        ),
        (
            "set_headers = { \"Transfer-Encoding\" = \"chunked\" }",
            "routes[0].set_headers.Transfer-Encoding",
        ),
        (
            "set_headers = { \"bad name\" = \"v\" }",
            "routes[0].set_headers.bad name",
        ),
        (
            "set_headers = { Authorization = \"x\" }",
            "routes[0].set_headers.Authorization",
        ),
        ("token_header = \"Host\"", "routes[0].token_header"),
        ("token_format = \"Bearer\"", "routes[0].token_format"),
        (
            "token_format = \"{token}{token}\"",
            "routes[0].token_format",
        ),
        (
            "set_headers = { \"X-Key\" = \"secret-value-1\\nx: y\" }",
            "routes[0].set_headers.X-Key",
        ),
        (
            "set_header_files = { \"X-Key\" = \"/nonexistent/key\" }",
            "routes[0].set_header_files.X-Key",
        ),
    ] {
        let e =
            token_proxy::config::Config::parse(&base(extra), "t.toml", &|_| None).expect_err(extra);
        let text = e.to_string();
        assert!(text.contains(key), "{extra}: {text}");
        assert!(text.contains("fix:"), "{extra}: {text}");
        assert!(!text.contains("secret-value-1"), "{text}");
    }
}
