//! Live configuration changes: SIGHUP (or `Running::apply`) switches to a new config without a
//! restart, keeps unchanged credentials' tokens, starts and stops listeners, lets requests in
//! flight finish on the config they started with, and rejects a broken config whole.

mod support;

use tokio::io::AsyncReadExt;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use support::*;
use token_proxy::app::ReloadSummary;
use token_proxy::config::Config;
use token_proxy::demo::{self, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET};

fn config_text(token_url: &str, routes: &[(SocketAddr, String)]) -> String {
    let mut text = credential("api", token_url, "");
    for (listen, upstream) in routes {
        text.push_str(&format!(
            "[[routes]]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\ncredential = \"api\"\n"
        ));
    }
    text
}

fn parse(text: &str) -> Config {
    Config::parse(text, "reload.toml", &|_| None).unwrap()
}

#[tokio::test]
async fn reload_keeps_tokens_updates_adds_and_removes_routes() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let (p1, p2) = (fresh_addr(), fresh_addr());
    let url = demo::token_url(&idp);
    let mut running = token_proxy::app::start(&parse(&config_text(
        &url,
        &[(p1, format!("http://{}/v1", api.addr()))],
    )))
    .await
    .unwrap();
    assert_eq!(get(p1, "/x").await.json()["target"], "/v1/x");

    // A request in flight when the config changes finishes on the old config.
    let slow = tokio::spawn(async move { get(p1, "/slow/500").await });
    assert!(eventually(Duration::from_secs(5), || api.state().in_flight() == 1).await);

    let new = config_text(
        &url,
        &[
            (p1, format!("http://{}/v2", api.addr())),
            (p2, format!("http://{}/v3", api.addr())),
        ],
    );
    let summary = running.apply(&parse(&new)).await.unwrap();
    assert_eq!(
        summary,
        ReloadSummary {
            credentials_kept: 1,
            routes_started: 1,
            routes_updated: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        get(p1, "/x").await.json()["target"],
        "/v2/x",
        "new connections use the new route"
    );
    assert_eq!(
        get(p2, "/y").await.json()["target"],
        "/v3/y",
        "the added route listens"
    );
    let finished = slow.await.unwrap();
    assert_eq!(finished.status, StatusCode::OK);
    assert!(
        api.state()
            .records()
            .iter()
            .any(|r| r.target == "/v1/slow/500"),
        "the old route served it"
    );
    assert_eq!(
        idp.state().request_count(),
        1,
        "the unchanged credential kept its token"
    );

    // Remove the first route: its listener closes, and so do its idle kept-alive connections.
    let mut idle = tokio::net::TcpStream::connect(p1).await.unwrap();
    assert!(answer_on(&mut idle, "/idle")
        .await
        .starts_with("HTTP/1.1 200"));
    let mut buf = vec![0u8; 8192];
    let summary = running
        .apply(&parse(&config_text(
            &url,
            &[(p2, format!("http://{}/v3", api.addr()))],
        )))
        .await
        .unwrap();
    assert_eq!(summary.routes_stopped, 1);
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("the removed route's idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect(p1)
            .is_err())
        .await
    );
    assert_eq!(get(p2, "/z").await.status, StatusCode::OK);
    running.shutdown().await;
}

#[tokio::test]
async fn a_changed_credential_gets_a_new_token_and_a_broken_config_changes_nothing() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let (p1, busy) = (
        fresh_addr(),
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let url = demo::token_url(&idp);
    let base = config_text(&url, &[(p1, format!("http://{}", api.addr()))]);
    let mut running = token_proxy::app::start(&parse(&base)).await.unwrap();
    assert_eq!(get(p1, "/a").await.status, StatusCode::OK);

    // A new route on a port that is taken: the whole reload is refused, the old config runs.
    let broken = format!(
        "{base}[[routes]]\nlisten = \"{}\"\nupstream = \"http://{}\"\ncredential = \"api\"\nscope = \"x\"\n",
        busy.local_addr().unwrap(),
        api.addr()
    );
    assert!(
        Config::parse(&broken, "reload.toml", &|_| None).is_err(),
        "unknown key refused at parse"
    );
    let broken = format!(
        "{base}[[routes]]\nlisten = \"{}\"\nupstream = \"http://{}\"\ncredential = \"api\"\n",
        busy.local_addr().unwrap(),
        api.addr()
    );
    let err = running.apply(&parse(&broken)).await.unwrap_err();
    assert!(err.to_string().contains("cannot listen"), "{err}");
    assert_eq!(running.route_addrs(), vec![p1]);
    assert_eq!(get(p1, "/b").await.status, StatusCode::OK);

    // A changed credential (new scope): a new refresher and a new token.
    let changed = base.replace(
        &format!("client_secret = \"{DEMO_CLIENT_SECRET}\""),
        &format!("client_secret = \"{DEMO_CLIENT_SECRET}\"\nscope = \"new/.default\""),
    );
    let summary = running.apply(&parse(&changed)).await.unwrap();
    assert_eq!(summary.credentials_started, 1);
    assert_eq!(summary.credentials_stopped, 1);
    assert_eq!(summary.routes_updated, 1);
    assert_eq!(get(p1, "/c").await.status, StatusCode::OK);
    let last = idp.state().requests().pop().unwrap();
    assert!(
        last.form.contains(&("scope".into(), "new/.default".into())),
        "{:?}",
        last.form
    );
    assert_eq!(
        last.form.iter().find(|(k, _)| k == "client_id").unwrap().1,
        DEMO_CLIENT_ID
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_serving_and_a_good_file_applies() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let (p1, p2) = (fresh_addr(), fresh_addr());
    let url = demo::token_url(&idp);
    let good = config_text(&url, &[(p1, format!("http://{}/one", api.addr()))]);
    let path = temp_file("hup.toml", &good);
    let mut proc = Process::run(&path, "info");
    wait_listening(p1, Duration::from_secs(10)).await;
    assert_eq!(get(p1, "/x").await.json()["target"], "/one/x");

    std::fs::write(&path, "this is [not toml").unwrap();
    proc.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || proc
            .stderr()
            .contains("configuration rejected"))
        .await,
        "{}",
        proc.stderr()
    );
    assert_eq!(
        get(p1, "/x").await.json()["target"],
        "/one/x",
        "the old config keeps serving"
    );

    let better = config_text(
        &url,
        &[
            (p1, format!("http://{}/one", api.addr())),
            (p2, format!("http://{}/two", api.addr())),
        ],
    );
    std::fs::write(&path, better).unwrap();
    proc.signal("HUP");
    wait_listening(p2, Duration::from_secs(5)).await;
    assert_eq!(get(p2, "/y").await.json()["target"], "/two/y");
    assert_eq!(
        idp.state().request_count(),
        1,
        "the token survived both reloads"
    );
    proc.signal("TERM");
    assert_eq!(proc.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test]
async fn a_changed_route_closes_its_open_keep_alive_connections_after_their_requests() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let p1 = fresh_addr();
    let url = demo::token_url(&idp);
    let mut running = token_proxy::app::start(&parse(&config_text(
        &url,
        &[(p1, format!("http://{}/old", api.addr()))],
    )))
    .await
    .unwrap();
    let mut conn = tokio::net::TcpStream::connect(p1).await.unwrap();
    assert!(answer_on(&mut conn, "/a").await.contains("/old/a"));
    let mut buf = vec![0u8; 8192];
    running
        .apply(&parse(&config_text(
            &url,
            &[(p1, format!("http://{}/new", api.addr()))],
        )))
        .await
        .unwrap();
    // The idle kept-alive connection of the old route is closed, not left on the old upstream.
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    assert_eq!(get(p1, "/b").await.json()["target"], "/new/b");
    running.shutdown().await;
}

#[tokio::test]
async fn a_reload_retries_a_failing_credential_at_once() {
    // The secret file holds a wrong secret: a permanent error, next attempt in 60-75 s.
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let secret = temp_file("fixed-secret", "wrong-secret-value");
    let text = format!(
        "[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"{DEMO_CLIENT_ID}\"\nclient_secret_file = \"{}\"\n{}",
        demo::token_url(&idp),
        secret.display(),
        route(&format!("http://{}", api.addr()), "api", "token_wait_secs = 2")
    );
    let mut running = token_proxy::app::start(&parse(&text)).await.unwrap();
    let proxy = running.route_addrs()[0];
    assert!(eventually(Duration::from_secs(5), || idp.state().request_count() == 1).await);
    let refused = get(proxy, "/a").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let message = refused.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("invalid_client"), "{message}");

    // The operator fixes the file and reloads the same config: the credential is kept, and
    // retried now rather than after its minute.
    std::fs::write(&secret, DEMO_CLIENT_SECRET).unwrap();
    let reloaded = tokio::time::Instant::now();
    let summary = running.apply(&parse(&text)).await.unwrap();
    assert_eq!(summary.credentials_kept, 1);
    assert!(eventually(Duration::from_secs(5), || idp.state().request_count() == 2).await);
    assert!(
        reloaded.elapsed() < Duration::from_secs(3),
        "{:?}",
        reloaded.elapsed()
    );
    assert_eq!(get(proxy, "/b").await.status, StatusCode::OK);

    // A healthy credential is not asked again by a reload.
    running.apply(&parse(&text)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idp.state().request_count(), 2);
    running.shutdown().await;
}

/// A route open beyond loopback with no inbound check starts, with a warning at start and at
/// each reload; one with `allowed_clients` starts quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_remote_route_is_warned_about_at_start_and_reload() {
    const WARNING: &str = "route listens beyond loopback with no inbound_token_file";
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let url = demo::token_url(&idp);
    let port = fresh_addr().port();
    let route = |extra: &str| {
        format!(
            "{}[[routes]]\nlisten = \"0.0.0.0:{port}\"\nupstream = \"http://{}\"\ncredential = \"api\"\nallow_remote = true\n{extra}",
            credential("api", &url, ""),
            api.addr()
        )
    };
    let path = temp_file("remote.toml", &route(""));
    let mut proc = Process::run(&path, "info");
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(local, Duration::from_secs(10)).await;
    assert_eq!(get(local, "/x").await.status, StatusCode::OK);
    assert_eq!(
        proc.stderr().matches(WARNING).count(),
        1,
        "{}",
        proc.stderr()
    );

    /// SIGHUP, then the count of warnings once the `n`th reload is logged.
    async fn reload(proc: &Process, n: usize) -> usize {
        proc.signal("HUP");
        let done = || proc.stderr().matches("configuration reloaded").count() == n;
        assert!(
            eventually(Duration::from_secs(5), done).await,
            "{}",
            proc.stderr()
        );
        proc.stderr().matches(WARNING).count()
    }
    assert_eq!(reload(&proc, 1).await, 2, "{}", proc.stderr());

    // Guarded by client networks: no warning on this reload.
    std::fs::write(&path, route("allowed_clients = [\"127.0.0.0/8\"]\n")).unwrap();
    assert_eq!(reload(&proc, 2).await, 2, "{}", proc.stderr());
    assert_eq!(get(local, "/x").await.status, StatusCode::OK);
    proc.signal("TERM");
    assert_eq!(proc.wait_exit(Duration::from_secs(10)).await, Some(0));
}
