//! The token lifecycle over real sockets: what the token endpoint receives, single flight,
//! short-lived tokens under load, outages and recovery, and `/readyz`.

mod support;

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use base64::Engine as _;
use http::StatusCode;
use support::*;
use token_proxy::demo::{self, CannedResponse, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET};

fn field<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn client_secret_post_sends_the_exact_form() {
    let s = Stack::start(
        Duration::from_secs(60),
        "scope = \"d6b7c858-55fa-4d04-85a6-131af690abd4/.default\"\nextra_params = { Type = \"oauth2\", resource = \"r&x=1\" }",
        "",
    )
    .await;
    assert_eq!(get(s.addr(), "/x").await.status, StatusCode::OK);
    let req = &s.idp.state().requests()[0];
    assert_eq!(
        req.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert!(req.headers.get("authorization").is_none());
    let keys: Vec<&str> = req.form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "grant_type",
            "client_id",
            "client_secret",
            "scope",
            "Type",
            "resource"
        ]
    );
    assert_eq!(field(&req.form, "grant_type"), Some("client_credentials"));
    assert_eq!(field(&req.form, "client_id"), Some(DEMO_CLIENT_ID));
    assert_eq!(field(&req.form, "client_secret"), Some(DEMO_CLIENT_SECRET));
    assert_eq!(
        field(&req.form, "scope"),
        Some("d6b7c858-55fa-4d04-85a6-131af690abd4/.default")
    );
    assert_eq!(field(&req.form, "Type"), Some("oauth2"));
    assert_eq!(
        field(&req.form, "resource"),
        Some("r&x=1"),
        "values are form-encoded"
    );
}

#[tokio::test]
async fn client_secret_basic_sends_credentials_in_the_header_only() {
    let s = Stack::start(
        Duration::from_secs(60),
        "auth_method = \"client_secret_basic\"\nextra_params = { Type = \"oauth2\" }",
        "",
    )
    .await;
    assert_eq!(get(s.addr(), "/x").await.status, StatusCode::OK);
    let req = &s.idp.state().requests()[0];
    let keys: Vec<&str> = req.form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["grant_type", "Type"]);
    let auth = req.headers["authorization"].to_str().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.strip_prefix("Basic ").unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        format!("{DEMO_CLIENT_ID}:{DEMO_CLIENT_SECRET}")
    );
}

#[tokio::test]
async fn expires_in_as_a_string_is_accepted() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    idp.state().set_expires_in_as_string(true);
    let api = start_upstream(&idp).await;
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route(&format!("http://{}", api.addr()), "api", "")
    );
    let proxy = start_proxy(&text).await;
    assert_eq!(
        get(proxy.route_addrs()[0], "/x").await.status,
        StatusCode::OK
    );
    let ready = get(proxy.admin_addr().unwrap(), "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    let left = ready.json()["credentials"]["api"]["expires_in_secs"]
        .as_u64()
        .unwrap();
    // 60 s less the 6 s margin: 53 s or 54 s left by now; 59 or 60 would mean no margin.
    assert!((52..=54).contains(&left), "{left}");
}

/// The margin before the stated expiry, counted from when the token request was *sent*: an
/// IdP that takes 2 s to answer gives a 100 s token 88 s of use from the answer (90 s from
/// the request), and Azure's 3599 s token 3567 s. `/readyz` shows the time left, rounded
/// down: no margin would show 97 s; a lifetime counted from the answer, 89 s.
#[tokio::test]
async fn the_token_lifetime_is_cut_by_its_margin_counted_from_the_request() {
    async fn left_after_a_slow_idp(lifetime: u64) -> u64 {
        let idp = start_token_endpoint(Duration::from_secs(lifetime)).await;
        idp.state().set_delay(Duration::from_secs(2));
        let api = start_upstream(&idp).await;
        let text = format!(
            "admin_listen = \"127.0.0.1:0\"\n{}{}",
            credential("api", &demo::token_url(&idp), ""),
            route(&format!("http://{}", api.addr()), "api", "")
        );
        let proxy = start_proxy(&text).await;
        let ok = within("first request", get(proxy.route_addrs()[0], "/x")).await;
        assert_eq!(ok.status, StatusCode::OK);
        let ready = get(proxy.admin_addr().unwrap(), "/readyz").await;
        ready.json()["credentials"]["api"]["expires_in_secs"]
            .as_u64()
            .unwrap()
    }
    let (short, azure) = tokio::join!(left_after_a_slow_idp(100), left_after_a_slow_idp(3599));
    assert!((85..=87).contains(&short), "100 s token: {short} s left");
    assert!(
        (3562..=3566).contains(&azure),
        "3599 s token: {azure} s left"
    );
}

#[tokio::test]
async fn a_hundred_concurrent_first_requests_cause_one_token_request() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    idp.state().set_delay(Duration::from_millis(300));
    let api = start_upstream(&idp).await;
    let text = format!(
        "{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route(&format!("http://{}", api.addr()), "api", "")
    );
    let proxy = start_proxy(&text).await;
    let addr = proxy.route_addrs()[0];
    let c = client();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://{addr}/r/{i}"))
                    .body(Default::default())
                    .unwrap();
                send(&c, req).await.status
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(idp.state().request_count(), 1);
    assert_eq!(idp.state().max_in_flight(), 1);
    assert_eq!(api.state().records().len(), 100);
}

#[tokio::test]
async fn two_second_tokens_under_continuous_load_never_reach_the_upstream_expired() {
    let s = Stack::start(Duration::from_secs(2), "", "").await;
    let addr = s.addr();
    let c = client();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = http::Request::get(format!("http://{addr}/load"))
                        .body(Default::default())
                        .unwrap();
                    statuses.push(send(&c, req).await.status);
                }
                statuses
            })
        })
        .collect();
    // Run through at least three token lifetimes.
    assert!(
        eventually(Duration::from_secs(10), || s.idp.state().request_count()
            >= 4)
        .await
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let statuses = w.await.unwrap();
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        total += statuses.len();
    }
    assert!(total > 100, "only {total} requests");
    assert_eq!(
        s.api.state().rejected(),
        0,
        "an expired token reached the upstream"
    );
    assert!(s.api.state().records().iter().all(|r| r.token_was_current));
    assert_eq!(s.idp.state().max_in_flight(), 1);
}

#[tokio::test]
async fn idp_down_at_start_gives_503_json_then_recovers_without_restart() {
    let idp_addr = fresh_addr();
    let token_url = format!("http://{idp_addr}/oauth2/v2.0/token");
    // The upstream accepts tokens of the IdP that will later listen on `idp_addr`.
    let tokens = Arc::new(demo::IssuedTokens::default());
    let api = demo::start_echo_api(LOOPBACK, tokens.clone())
        .await
        .unwrap();
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n{}{}",
        credential("api", &token_url, "token_timeout_secs = 1"),
        route(
            &format!("http://{}", api.addr()),
            "api",
            "token_wait_secs = 2"
        )
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = reply.json();
    assert_eq!(body["error"], "token_unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("could not reach the token endpoint"),
        "{message}"
    );
    let ready = get(proxy.admin_addr().unwrap(), "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json()["credentials"]["api"]["state"], "pending");
    assert!(ready.json()["credentials"]["api"]["last_error"]
        .as_str()
        .unwrap()
        .contains("could not reach"));
    assert!(
        api.state().records().is_empty(),
        "no request went upstream without a token"
    );

    // The IdP comes up on the configured address; the proxy recovers by itself.
    let idp = demo::start_token_endpoint_with(idp_addr, Duration::from_secs(60), tokens)
        .await
        .unwrap();
    let _ = idp.addr();
    // With requests waiting, the refresher retries within 9 s of each failure, whatever its
    // backoff, so a request soon gets a token.
    let back = Instant::now();
    let mut recovered = false;
    while back.elapsed() < Duration::from_secs(15) {
        if get(proxy.route_addrs()[0], "/again").await.status == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(recovered, "the proxy never recovered");
    assert!(
        back.elapsed() <= Duration::from_secs(10),
        "{:?}",
        back.elapsed()
    );
    assert_eq!(
        get(proxy.admin_addr().unwrap(), "/readyz").await.status,
        StatusCode::OK
    );
    assert!(idp.state().request_count() >= 1);
}

#[tokio::test]
async fn rejected_credentials_give_503_with_the_idp_error_and_hint() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let text = format!(
        "admin_listen = \"127.0.0.1:0\"\n[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"{DEMO_CLIENT_ID}\"\nclient_secret = \"wrong-secret-value\"\n{}",
        demo::token_url(&idp),
        route(&format!("http://{}", api.addr()), "api", "token_wait_secs = 3")
    );
    let proxy = start_proxy(&text).await;
    let reply = get(proxy.route_addrs()[0], "/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let message = reply.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("invalid_client") && message.contains("7000215"),
        "{message}"
    );
    assert!(
        message.contains("hint: check client_id and the client secret"),
        "{message}"
    );
    assert!(!message.contains("wrong-secret-value"));
    let ready = get(proxy.admin_addr().unwrap(), "/readyz").await;
    assert!(!String::from_utf8_lossy(&ready.body).contains("wrong-secret-value"));
}

#[tokio::test]
async fn failed_refresh_keeps_serving_the_current_token_while_valid() {
    let s = Stack::start(Duration::from_secs(4), "", "").await;
    assert_eq!(get(s.addr(), "/x").await.status, StatusCode::OK);
    s.idp.state().set_canned(Some(CannedResponse {
        status: StatusCode::SERVICE_UNAVAILABLE,
        content_type: "text/html",
        body: "<html>maintenance</html>".into(),
        retry_after: Some(1),
        headers: Vec::new(),
        drip: None,
    }));
    // The refresh at ~2 s fails; the token is still good until ~3.6 s.
    assert!(
        eventually(Duration::from_secs(5), || s.idp.state().request_count()
            >= 2)
        .await
    );
    let reply = get(s.addr(), "/y").await;
    assert_eq!(reply.status, StatusCode::OK);
    let ready = get(s.admin(), "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert!(ready.json()["credentials"]["api"]["last_error"]
        .as_str()
        .unwrap()
        .contains("HTML page"));
    s.idp.state().set_canned(None);
    // The retry comes 3-6 s after the failure (Retry-After 1 s plus its spread of up to 5 s,
    // and never under 3 s while the token is valid).
    assert!(
        eventually(Duration::from_secs(10), || {
            s.idp.state().tokens.all().len() >= 2
        })
        .await
    );
    assert_eq!(get(s.addr(), "/z").await.status, StatusCode::OK);
    assert_eq!(s.api.state().rejected(), 0);
}

#[tokio::test]
async fn healthz_is_up_and_readyz_never_shows_a_token() {
    let s = Stack::start(Duration::from_secs(60), "", "").await;
    assert_eq!(get(s.addr(), "/x").await.status, StatusCode::OK);
    let health = get(s.admin(), "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = get(s.admin(), "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["ready"], true);
    assert_eq!(ready.json()["credentials"]["api"]["state"], "valid");
    let text = String::from_utf8_lossy(&ready.body).to_string();
    for token in s.idp.state().tokens.all() {
        assert!(!text.contains(&token));
    }
}

/// A token that runs out with the endpoint failing is reported `expired` (not `pending`, which
/// means none was ever had): `/readyz` answers 503 with the error, and requests get 503
/// rather than the stale token.
#[tokio::test]
async fn a_token_that_runs_out_unreplaced_is_expired_in_readyz() {
    let s = Stack::start(Duration::from_secs(2), "", "").await;
    assert_eq!(get(s.addr(), "/x").await.status, StatusCode::OK);
    let ready = get(s.admin(), "/readyz").await.json();
    assert_eq!(ready["credentials"]["api"]["state"], "valid", "{ready}");
    s.idp.state().set_canned(Some(CannedResponse::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        "down",
    )));
    // Usable for 1.8 s: by 5 s it has run out, whatever the retries did.
    let admin = s.admin();
    let expired = eventually_async(Duration::from_secs(5), || async move {
        get(admin, "/readyz").await.json()["credentials"]["api"]["state"] == "expired"
    })
    .await;
    // The endpoint keeps failing: `expired` stays.
    let reply = get(admin, "/readyz").await;
    let last = reply.json();
    assert!(expired, "{last}");
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(last["ready"], false);
    assert_eq!(last["credentials"]["api"]["expires_in_secs"], 0, "{last}");
    assert!(
        last["credentials"]["api"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{last}"
    );
    let served = s.api.state().records().len();
    let reply = get(s.addr(), "/after").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"], "token_unavailable");
    assert_eq!(
        s.api.state().records().len(),
        served,
        "no stale token was sent"
    );
}
