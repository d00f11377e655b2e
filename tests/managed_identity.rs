//! Azure managed identity as a token source, against a fake identity endpoint that keeps the
//! real rules (`tests/support`): IMDS for VMs, scale sets and AKS nodes, and App Service's
//! `IDENTITY_ENDPOINT` for App Service, Functions and Container Apps; system- and
//! user-assigned identities; the endpoint's transient answers retried.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::*;
use token_proxy::config::Config;

const SCOPE: &str = "d6b7c858-55fa-4d04-85a6-131af690abd4/.default";
const RESOURCE: &str = "d6b7c858-55fa-4d04-85a6-131af690abd4";

/// A proxy whose credential `mi` is `managed_identity = {mi}`, routed to an echo API that
/// takes the fake endpoint's tokens; `env` is the process environment it sees.
async fn proxy(
    fake: &FakeIdentity,
    mi: &str,
    env: &'static [(&'static str, &'static str)],
) -> (
    token_proxy::app::Running,
    token_proxy::demo::DemoServer<token_proxy::demo::EchoState>,
) {
    let api = token_proxy::demo::start_echo_api(LOOPBACK, fake.tokens.clone())
        .await
        .unwrap();
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n[credentials.mi]\nmanaged_identity = {mi}\nscope = \"{SCOPE}\"\n\n{}",
        route(&format!("http://{}/api", api.addr()), "mi", "token_wait_secs = 8")
    );
    let config = Config::parse(&text, "mi.toml", &|name| {
        env.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let running = token_proxy::app::start(&config).await.unwrap();
    (running, api)
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn imds_issues_the_token_of_the_system_assigned_identity() {
    let fake = FakeIdentity::start(None, &[]).await;
    let (proxy, api) = proxy(&fake, &format!("{{ endpoint = \"{}\" }}", fake.url()), &[]).await;
    let reply = get(proxy.route_addrs()[0], "/v1/items").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(api.state().records()[0].token_was_current);
    let (query, headers) = fake.state().requests[0].clone();
    let (query, headers) = (&query, &headers);
    assert_eq!(
        query_param(query, "api-version").as_deref(),
        Some("2018-02-01")
    );
    assert_eq!(query_param(query, "resource").as_deref(), Some(RESOURCE));
    assert_eq!(query_param(query, "client_id"), None, "system-assigned");
    assert_eq!(headers["metadata"], "true");
    assert!(!headers.contains_key("x-forwarded-for"));
    assert!(!headers.contains_key("authorization"));
    // `expires_in` came as the string "3599": the token is held for about an hour.
    let readyz = get(proxy.admin_addr().unwrap(), "/readyz").await.json();
    let left = readyz["credentials"]["mi"]["expires_in_secs"]
        .as_u64()
        .unwrap();
    assert!((3000..=3599).contains(&left), "{readyz}");
}

#[tokio::test]
async fn a_user_assigned_identity_is_named_and_an_unknown_one_is_refused() {
    let fake = FakeIdentity::start(None, &["11111111-2222-3333-4444-555555555555"]).await;
    let known = format!(
        "{{ client_id = \"11111111-2222-3333-4444-555555555555\", endpoint = \"{}\" }}",
        fake.url()
    );
    let (proxy_known, _api) = proxy(&fake, &known, &[]).await;
    assert_eq!(
        get(proxy_known.route_addrs()[0], "/a").await.status,
        StatusCode::OK
    );
    let query = fake.state().requests[0].0.clone();
    assert_eq!(
        query_param(&query, "client_id").as_deref(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    // An identity the machine does not have: 400, a permanent error, in the answer.
    let unknown = format!(
        "{{ object_id = \"99999999-0000-0000-0000-000000000000\", endpoint = \"{}\" }}",
        fake.url()
    );
    let (proxy_unknown, _api2) = proxy(&fake, &unknown, &[]).await;
    let reply = get(proxy_unknown.route_addrs()[0], "/a").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let json = reply.json();
    assert_eq!(json["error"], "token_unavailable");
    let message = json["message"].as_str().unwrap();
    assert!(
        message.contains("400") && message.contains("Identity not found"),
        "{message}"
    );
    let last = fake.state().requests.last().unwrap().0.clone();
    assert_eq!(
        query_param(&last, "object_id").as_deref(),
        Some("99999999-0000-0000-0000-000000000000")
    );
}

#[tokio::test]
async fn the_endpoints_transient_answers_are_retried() {
    let fake = FakeIdentity::start(None, &[]).await;
    // IMDS answers 410 while it starts: tried again after the first backoff (3 to 9 s).
    // (404, 429 and 5xx are transient too: see `token::source`'s unit test of the rule.)
    fake.state().fail_first.push_back(410);
    let (proxy, api) = proxy(&fake, &format!("{{ endpoint = \"{}\" }}", fake.url()), &[]).await;
    // Ready once the second attempt succeeds.
    let admin = proxy.admin_addr().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while get(admin, "/readyz").await.status != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.state().requests.len(), 2);
    let reply = get(proxy.route_addrs()[0], "/a").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(api.state().records()[0].token_was_current);
}

#[tokio::test]
async fn app_service_uses_identity_endpoint_and_its_header_and_reads_expires_on() {
    let fake = FakeIdentity::start(Some("app-service-header-never-shown"), &["obj-1"]).await;
    let endpoint: &'static str =
        Box::leak(format!("http://{}/msi/token", fake.addr).into_boxed_str());
    let env: &'static [(&str, &str)] = Box::leak(Box::new([
        ("IDENTITY_ENDPOINT", endpoint),
        ("IDENTITY_HEADER", "app-service-header-never-shown"),
    ]));
    let (proxy, api) = proxy(&fake, "{ object_id = \"obj-1\" }", env).await;
    let reply = get(proxy.route_addrs()[0], "/a").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(api.state().records()[0].token_was_current);
    let (query, headers) = fake.state().requests[0].clone();
    let (query, headers) = (&query, &headers);
    assert_eq!(
        query_param(query, "api-version").as_deref(),
        Some("2019-08-01")
    );
    assert_eq!(query_param(query, "principal_id").as_deref(), Some("obj-1"));
    assert_eq!(
        headers["x-identity-header"],
        "app-service-header-never-shown"
    );
    assert!(!headers.contains_key("metadata"));
    // Only `expires_on` came: the lifetime is counted from it.
    let readyz = get(proxy.admin_addr().unwrap(), "/readyz").await.json();
    let left = readyz["credentials"]["mi"]["expires_in_secs"]
        .as_u64()
        .unwrap();
    assert!((1500..=1800).contains(&left), "{readyz}");
    assert!(!format!("{proxy:?}").contains("app-service-header-never-shown"));
}

#[test]
fn managed_identity_config_errors_name_the_key() {
    let base = |mi: &str, extra: &str| {
        format!(
            "[credentials.mi]\nmanaged_identity = {mi}\n{extra}\n[[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"https://api.example.com\"\ncredential = \"mi\"\n"
        )
    };
    let scope = format!("scope = \"{SCOPE}\"");
    for (text, env, key) in [
        (
            base("true", &format!("{scope}\nclient_secret = \"s\"")),
            &[][..],
            "credentials.mi.client_secret",
        ),
        (
            base("true", &format!("{scope}\ntoken_url = \"https://x/t\"")),
            &[][..],
            "credentials.mi.token_url",
        ),
        (base("true", ""), &[][..], "credentials.mi.scope"),
        (
            base("true", "scope = [\"a/.default\", \"b/.default\"]"),
            &[][..],
            "credentials.mi.scope",
        ),
        (
            base("{ client_id = \"a\", object_id = \"b\" }", &scope),
            &[][..],
            "credentials.mi.managed_identity",
        ),
        (
            base("{ name = \"x\" }", &scope),
            &[][..],
            "credentials.mi.managed_identity",
        ),
        (
            base("true", &scope),
            &[("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token")][..],
            "credentials.mi.managed_identity",
        ),
    ] {
        let e = Config::parse(&text, "t.toml", &|name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
        .expect_err(&text);
        let shown = e.to_string();
        assert!(shown.contains(key), "{key}: {shown}");
        assert!(shown.contains("fix:"), "{shown}");
    }
    // Without an endpoint or IDENTITY_ENDPOINT, the IMDS address.
    let c = Config::parse(&base("true", &scope), "t.toml", &|_| None).unwrap();
    assert_eq!(
        c.credentials[0].token_url.as_str(),
        "http://169.254.169.254/metadata/identity/oauth2/token"
    );
    assert_eq!(c.credentials[0].kind(), "managed_identity (IMDS)");
}
