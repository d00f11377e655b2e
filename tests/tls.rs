//! TLS to the token endpoint and the upstream: verification is on, a private CA works through
//! `ca_file`, and the upstream gets HTTP/2 when it offers it through ALPN. And the way out
//! through a real forward proxy (`tinyproxy`): `CONNECT` tunnels for HTTPS, absolute-form
//! requests for plain http, proxy credentials sent and never shown.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::{StatusCode, Version};
use support::tls::*;
use support::*;
use tokio_util::sync::DropGuard;

/// A credential on `idp` (plain http) and a route to the `https` upstream at `api_tls` (base
/// path `/base`) that trusts `ca_file`.
fn https_route_config(
    idp: &token_proxy::demo::DemoServer<token_proxy::demo::IdpState>,
    api_tls: SocketAddr,
    ca_file: &std::path::Path,
) -> String {
    format!(
        "{}{}",
        credential("api", &token_proxy::demo::token_url(idp), ""),
        route(
            &format!("https://localhost:{}/base", api_tls.port()),
            "api",
            &format!("ca_file = \"{}\"", ca_file.display())
        )
    )
}

/// The fake IdP and upstream, each also behind TLS with a certificate from a private CA.
struct TlsStack {
    ca_file: std::path::PathBuf,
    idp: token_proxy::demo::DemoServer<token_proxy::demo::IdpState>,
    api: token_proxy::demo::DemoServer<token_proxy::demo::EchoState>,
    idp_tls: SocketAddr,
    api_tls: SocketAddr,
    _fronts: (DropGuard, DropGuard),
}

impl TlsStack {
    async fn start() -> TlsStack {
        let pki = private_pki();
        let ca_file = temp_file("ca.pem", &pki.ca_pem);
        let idp = start_token_endpoint(Duration::from_secs(60)).await;
        let api = start_upstream(&idp).await;
        let (idp_tls, g1) = tls_front(&pki, idp.addr()).await;
        let (api_tls, g2) = tls_front(&pki, api.addr()).await;
        TlsStack {
            ca_file,
            idp,
            api,
            idp_tls,
            api_tls,
            _fronts: (g1, g2),
        }
    }
}

#[tokio::test]
async fn https_token_endpoint_and_upstream_with_a_private_ca_and_h2() {
    let TlsStack {
        ca_file,
        idp,
        api,
        idp_tls,
        api_tls,
        _fronts,
    } = TlsStack::start().await;
    let ca = ca_file.display();
    let text = format!(
        "{}{}",
        credential(
            "api",
            &format!("https://localhost:{}/oauth2/v2.0/token", idp_tls.port()),
            &format!("ca_file = \"{ca}\"")
        ),
        route(
            &format!("https://localhost:{}/base", api_tls.port()),
            "api",
            &format!("ca_file = \"{ca}\"")
        )
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x?y=1").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["target"], "/base/x?y=1");
    let rec = &api.state().records()[0];
    // A bodiless GET takes the lean exchange, and the upstream offers h2: HTTP/2 over TLS,
    // the authority as `:authority` alone.
    assert_eq!(rec.version, Version::HTTP_2, "the lean exchange over h2");
    assert!(rec.headers.get("host").is_none(), "{:?}", rec.headers);
    assert_eq!(rec.authority, format!("localhost:{}", api_tls.port()));
    assert!(rec.token_was_current);
    assert_eq!(idp.state().request_count(), 1);

    // A request with a body goes through hyper's client, and ALPN picks h2. The upstream's
    // authority goes as `:authority` alone: nginx before 1.29 refuses a `Host` beside it.
    let post = http::Request::post(format!("http://{}/base/y", proxy.route_addrs()[0]))
        .header("host", "client.example")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"data",
        )))
        .unwrap();
    let reply = send(&client(), post).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let rec = api.state().records().pop().unwrap();
    assert_eq!(rec.version, Version::HTTP_2, "ALPN chose h2");
    assert!(rec.headers.get("host").is_none(), "{:?}", rec.headers);
    assert_eq!(rec.body_bytes, 4);

    // A WebSocket upgrade to the same h2-capable upstream goes over HTTP/1.1.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy.route_addrs()[0])
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let (head, rest) = read_answer(&mut stream, true).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(rest.is_empty(), "nothing after the 101 yet: {rest}");
    stream.write_all(b"over tls").await.unwrap();
    let mut echoed = [0u8; 8];
    within("the echo over the upgrade", stream.read_exact(&mut echoed))
        .await
        .unwrap();
    assert_eq!(&echoed, b"over tls");
    assert_eq!(api.state().records()[2].version, Version::HTTP_11);
}

#[tokio::test]
async fn certificates_are_verified_without_the_private_ca() {
    let TlsStack {
        ca_file,
        idp,
        api,
        idp_tls,
        api_tls,
        _fronts,
    } = TlsStack::start().await;

    // Token endpoint without the CA: the token request fails verification, nothing is sent.
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n{}{}",
        credential(
            "api",
            &format!("https://localhost:{}/token", idp_tls.port()),
            "token_timeout_secs = 2"
        ),
        route(
            &format!("http://{}", api.addr()),
            "api",
            "token_wait_secs = 3"
        )
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"], "token_unavailable");
    assert_eq!(
        idp.state().request_count(),
        0,
        "no token request passed an unverified TLS handshake"
    );
    let ready = get(proxy.admin_addr().expect("admin listener"), "/readyz")
        .await
        .json();
    let last_error = ready["credentials"]["api"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        last_error.contains("certificate"),
        "/readyz names the cause: {ready}"
    );

    // Upstream without the CA: 502, the token never leaves.
    let text = format!(
        "{}{}",
        credential("api", &token_proxy::demo::token_url(&idp), ""),
        route(&format!("https://localhost:{}", api_tls.port()), "api", "")
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["error"], "upstream_unavailable");
    let message = reply.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("invalid peer certificate"),
        "the answer names the cause: {message}"
    );
    assert!(api.state().records().is_empty());
    drop(ca_file);
}

#[tokio::test]
async fn https_token_endpoint_and_upstream_through_a_forward_proxys_connect_tunnel() {
    let stack = TlsStack::start().await;
    let forward = ForwardProxy::start().await;
    let ca = stack.ca_file.display();
    let via = format!("ca_file = \"{ca}\"\nproxy = \"{}\"", forward.url());
    let text = format!(
        "{}{}",
        credential(
            "api",
            &format!(
                "https://localhost:{}/oauth2/v2.0/token",
                stack.idp_tls.port()
            ),
            &via
        ),
        route(
            &format!("https://localhost:{}/base", stack.api_tls.port()),
            "api",
            &via
        )
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(stack.api.state().records().len(), 1);
    // The same from an h2c client: a route without the lean path (the tunnel needs hyper's
    // client) serves its bodiless streams through the general path.
    let req = http::Request::get(format!("http://{}/x2", proxy.route_addrs()[0]))
        .body(http_body_util::Full::default())
        .unwrap();
    let reply = send(&h2c_client(), req).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(stack.api.state().records().len(), 2);
    let seen = forward.requests();
    for port in [stack.idp_tls.port(), stack.api_tls.port()] {
        let tunnel = format!("CONNECT localhost:{port} HTTP/1.1");
        assert!(seen.contains(&tunnel), "no {tunnel:?} in {seen:?}");
    }
    assert!(!format!("{:?}", proxy).contains(PROXY_PASSWORD));
}

#[tokio::test]
async fn plain_http_goes_to_the_forward_proxy_in_absolute_form_and_a_wrong_password_says_so() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let forward = ForwardProxy::start().await;
    let via = format!("proxy = \"{}\"", forward.url());
    let text = format!(
        "{}{}",
        credential("api", &token_proxy::demo::token_url(&idp), &via),
        route(&format!("http://{}/api", api.addr()), "api", &via)
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/items?x=1").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let record = &api.state().records()[0];
    assert_eq!(record.target, "/api/items?x=1");
    assert!(record.token_was_current);
    assert!(
        record.headers.get("proxy-authorization").is_none(),
        "the proxy's credentials stop at the proxy"
    );
    let seen = forward.requests();
    let token_url = token_proxy::demo::token_url(&idp);
    assert!(
        seen.contains(&format!("POST {token_url} HTTP/1.1")),
        "{seen:?}"
    );
    assert!(
        seen.contains(&format!("GET http://{}/api/items?x=1 HTTP/1.1", api.addr())),
        "{seen:?}"
    );

    // With a wrong password the proxy refuses: the client hears about it, the password never.
    let tls_text = format!(
        "{}{}",
        credential("api", &token_proxy::demo::token_url(&idp), ""),
        route(
            "https://localhost:1/base",
            "api",
            &format!(
                "proxy = \"http://{PROXY_USER}:wrong-password-xyz@{}\"",
                forward.addr
            )
        )
    );
    let proxy = start_proxy(&tls_text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let body = String::from_utf8_lossy(&reply.body);
    assert!(
        body.contains("upstream_unavailable")
            && body.contains(&format!("through forward proxy http://{}/", forward.addr)),
        "{body}"
    );
    assert!(
        !body.contains("wrong-password-xyz") && !body.contains(PROXY_USER),
        "{body}"
    );
}

#[tokio::test]
async fn mutual_tls_presents_the_routes_client_certificate() {
    let pki = private_pki();
    let ca_file = temp_file("ca.pem", &pki.ca_pem);
    let cert_file = temp_file("client.pem", &pki.client_cert_pem);
    let key_file = temp_file("client-key.pem", &pki.client_key_pem);
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let (api_tls, _front) = tls_front_with(&pki, api.addr(), true, &[b"h2", b"http/1.1"]).await;
    let upstream = format!("https://localhost:{}/base", api_tls.port());
    let ca = format!("ca_file = \"{}\"", ca_file.display());
    let with_cert = format!(
        "{ca}\nclient_certificate_file = \"{}\"\nclient_key_file = \"{}\"",
        cert_file.display(),
        key_file.display()
    );
    let text = format!(
        "{}{}{}",
        credential("api", &token_proxy::demo::token_url(&idp), ""),
        route(&upstream, "api", &with_cert),
        route(&upstream, "api", &ca)
    );
    let proxy = start_proxy(&text).await;
    let [with, without] = proxy.route_addrs()[..] else {
        panic!("two routes")
    };
    let reply = get(with, "/x").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let reply = get(without, "/x").await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_GATEWAY,
        "the upstream wants a client certificate"
    );
    let message = reply.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.to_ascii_lowercase().contains("certificate"),
        "the answer names the cause: {message}"
    );
    assert_eq!(api.state().records().len(), 1);

    // Half a pair is a config error that names the missing key.
    let half = format!(
        "{}{}",
        credential("api", "https://t.example/", ""),
        route(
            &upstream,
            "api",
            &format!("client_certificate_file = \"{}\"", cert_file.display())
        )
    );
    let e = token_proxy::config::Config::parse(&half, "t.toml", &|_| None).unwrap_err();
    assert_eq!(e.key, "routes[0].client_key_file");
}

#[tokio::test]
async fn a_changed_ca_file_is_picked_up_without_a_restart() {
    let pki = private_pki();
    let other = private_pki();
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let (api_tls, _front) = tls_front(&pki, api.addr()).await;
    // The route starts with the wrong CA: the upstream's certificate is refused.
    let ca_file = temp_file("ca.pem", &other.ca_pem);
    let text = https_route_config(&idp, api_tls, &ca_file);
    let proxy = start_proxy(&text).await;
    let addr = proxy.route_addrs()[0];
    let reply = get(addr, "/x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let message = reply.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("invalid peer certificate"),
        "the answer names the cause: {message}"
    );

    // The CA bundle is replaced the way Kubernetes does it: a new file renamed over the old.
    let fresh = ca_file.with_extension("new");
    std::fs::write(&fresh, &pki.ca_pem).unwrap();
    std::fs::rename(&fresh, &ca_file).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = get(addr, "/x").await.status;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status} 10 s after the change"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The credential's `ca_file` too: the token client is rebuilt at the next token request once
/// the file changes, and keeps working as long as it does not.
#[tokio::test]
async fn a_changed_ca_file_of_the_token_endpoint_is_picked_up_at_the_next_token_request() {
    let pki = private_pki();
    let other = private_pki();
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let (idp_tls, _front) = tls_front(&pki, idp.addr()).await;
    let ca_file = temp_file("idp-ca.pem", &other.ca_pem);
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n{}{}",
        credential(
            "api",
            &format!("https://localhost:{}/oauth2/v2.0/token", idp_tls.port()),
            &format!("ca_file = \"{}\"", ca_file.display())
        ),
        route(
            &format!("http://{}", api.addr()),
            "api",
            "token_wait_secs = 1"
        )
    );
    let proxy = start_proxy(&text).await;
    let admin = proxy.admin_addr().unwrap();
    let refused = eventually_async(Duration::from_secs(5), || async {
        let ready = get(admin, "/readyz").await.json();
        let e = ready["credentials"]["api"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        e.contains("certificate")
    })
    .await;
    assert!(refused, "the wrong CA refuses the token endpoint");
    assert_eq!(idp.state().request_count(), 0);

    let fresh = ca_file.with_extension("new");
    std::fs::write(&fresh, &pki.ca_pem).unwrap();
    std::fs::rename(&fresh, &ca_file).unwrap();
    let through = eventually_async(Duration::from_secs(15), || async {
        get(proxy.route_addrs()[0], "/x").await.status == StatusCode::OK
    })
    .await;
    assert!(through, "a token through the new CA");
    assert_eq!(idp.state().request_count(), 1);
}

#[tokio::test]
async fn an_upstream_that_speaks_only_h2_gets_bodiless_requests_over_h2() {
    // The lean exchange offers only http/1.1; this upstream refuses it in the handshake.
    // Nothing was sent, so the request goes through hyper's client (h2), and so do later ones.
    let pki = private_pki();
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let (api_tls, _front) = tls_front_with(&pki, api.addr(), false, &[b"h2"]).await;
    let ca_file = temp_file("ca.pem", &pki.ca_pem);
    let text = https_route_config(&idp, api_tls, &ca_file);
    let proxy = start_proxy(&text).await;
    for path in ["/first", "/second", "/third"] {
        let reply = get(proxy.route_addrs()[0], path).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.json()["target"], format!("/base{path}"));
    }
    let records = api.state().records();
    assert_eq!(records.len(), 3);
    for rec in &records {
        assert_eq!(rec.version, Version::HTTP_2);
        assert!(rec.headers.get("host").is_none(), "{:?}", rec.headers);
    }
}
