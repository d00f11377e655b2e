//! The binary itself: `check`, `token`, config errors and exit codes, signals and drain, and
//! logs that never carry a secret or a token.

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use http::StatusCode;
use support::*;
use token_proxy::demo::{self, DemoServer, EchoState, IdpState, DEMO_CLIENT_SECRET};

async fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = binary();
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run token-proxy"))
        .await
        .unwrap()
}

/// Whether `health --url readyz` exits 0 within `limit`, tried every 50 ms.
async fn health_within(readyz: &str, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cli(&["health", "--url", readyz], &[]).await.status.code() == Some(0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The line of `output` that starts with `start` (the test fails without one).
fn line_starting(output: &str, start: &str) -> String {
    output
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no {start:?} line in {output}"))
        .to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn stack_config(
    listen: std::net::SocketAddr,
    lifetime: Duration,
) -> (DemoServer<IdpState>, DemoServer<EchoState>, PathBuf) {
    let idp = start_token_endpoint(lifetime).await;
    let api = start_upstream(&idp).await;
    let config = format!(
        "[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"${{TP_TEST_SECRET}}\"\nscope = \"api://x/.default\"\n\n\
         [[routes]]\nlisten = \"{listen}\"\nupstream = \"http://{}/api\"\ncredential = \"api\"\n",
        demo::token_url(&idp),
        api.addr()
    );
    (idp, api, temp_file("config.toml", &config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_lifetimes_never_tokens() {
    let (idp, _api, path) = stack_config(LOOPBACK, Duration::from_secs(3599)).await;
    let out = cli(
        &["check", "--config", path.to_str().unwrap()],
        &[("TP_TEST_SECRET", DEMO_CLIENT_SECRET)],
    )
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("credential api: ok, token lifetime 3599 s"),
        "{stdout}"
    );
    for token in idp.state().tokens.all() {
        assert!(!stdout.contains(&token) && !text(&out.stderr).contains(&token));
    }
    assert_eq!(idp.state().request_count(), 1);
    assert!(stdout.contains(": can be bound"), "{stdout}");
    assert!(stdout.contains("TCP connection to 127.0.0.1:"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("check: ok"), "{stdout}");
}

/// `check` tries what `run` needs: it binds each listener and releases it, and reaches each
/// upstream, TLS verified with the route's own trust; every problem is reported, then one
/// verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_tries_each_listener_and_upstream_and_ends_with_one_verdict() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap();
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = gone.local_addr().unwrap();
    drop(gone);
    let (idp, api, _) = stack_config(LOOPBACK, Duration::from_secs(60)).await;
    let pki = support::tls::private_pki();
    let (tls_addr, _guard) = support::tls::tls_front(&pki, api.addr()).await;
    let ca = temp_file("check-ca.pem", &pki.ca_pem);
    let config = format!(
        "[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"{DEMO_CLIENT_SECRET}\"\n\n\
         [[routes]]\nname = \"busy\"\nlisten = \"{busy}\"\nupstream = \"http://{dead}/api\"\ncredential = \"api\"\n\n\
         [[routes]]\nname = \"trusted\"\nlisten = \"127.0.0.1:0\"\nupstream = \"https://localhost:{}/api\"\nca_file = \"{}\"\ncredential = \"api\"\n\n\
         [[routes]]\nname = \"untrusted\"\nlisten = \"127.0.0.1:0\"\nupstream = \"https://localhost:{}/api\"\ncredential = \"api\"\n",
        demo::token_url(&idp),
        tls_addr.port(),
        ca.display(),
        tls_addr.port(),
    );
    let path = temp_file("check-reach.toml", &config);
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let line = |start: &str| line_starting(&stdout, start);
    assert!(line(&format!("route busy: listen {busy}: FAILED")).contains("routes[0].listen"));
    assert!(line("route busy: upstream").contains(&format!("FAILED: cannot connect to {dead}")));
    assert!(line("route trusted: upstream").contains("ok (certificate verified, h2)"));
    let untrusted = line("route untrusted: upstream");
    assert!(
        untrusted.contains("FAILED: TLS") && untrusted.contains("UnknownIssuer"),
        "{untrusted}"
    );
    assert!(stdout.contains("credential api: ok"), "{stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some("check: FAILED (3 problems above)"),
        "{stdout}"
    );
    drop(held);
}

/// `check` judges a Unix socket listener as `run` would bind it, without disturbing what is
/// there; and through a forward proxy it reaches an `https` upstream through the proxy's
/// `CONNECT` tunnel, TLS included, not only the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_tries_unix_listeners_and_upstreams_through_a_forward_proxy() {
    let dir = temp_file("unused", "").parent().unwrap().to_owned();
    let fresh = dir.join("fresh.sock");
    let served = dir.join("served.sock");
    let _server = std::os::unix::net::UnixListener::bind(&served).unwrap();
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let plain = temp_file("plain.sock", "not a socket");
    let (idp, api, _) = stack_config(LOOPBACK, Duration::from_secs(60)).await;
    let pki = support::tls::private_pki();
    let (tls_addr, _guard) = support::tls::tls_front(&pki, api.addr()).await;
    let ca = temp_file("check-ca.pem", &pki.ca_pem);
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = gone.local_addr().unwrap();
    drop(gone);
    let forward = ForwardProxy::start().await;
    let route = |name: &str, listen: String, upstream: String, extra: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\ncredential = \"api\"\n{extra}\n"
        )
    };
    let via = format!(
        "proxy = \"{}\"\nca_file = \"{}\"",
        forward.url(),
        ca.display()
    );
    let local = format!("http://{}/api", api.addr());
    let config = [
        format!(
            "[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"{DEMO_CLIENT_SECRET}\"\n\n",
            demo::token_url(&idp)
        ),
        route("fresh", format!("unix:{}", fresh.display()), local.clone(), ""),
        route("served", format!("unix:{}", served.display()), local.clone(), ""),
        route("stale", format!("unix:{}", stale.display()), local.clone(), ""),
        route("plain", format!("unix:{}", plain.display()), local.clone(), ""),
        route(
            "nodir",
            format!("unix:{}", dir.join("missing/x.sock").display()),
            local.clone(),
            "",
        ),
        route(
            "tunnel",
            "127.0.0.1:0".into(),
            format!("https://localhost:{}/api", tls_addr.port()),
            &via,
        ),
        route(
            "no-tunnel",
            "127.0.0.1:0".into(),
            format!("https://localhost:{}/api", dead.port()),
            &via,
        ),
        route("absolute", "127.0.0.1:0".into(), local.clone(), &via),
        route(
            "fresh-b",
            format!("unix:{}", fresh.display()),
            local,
            "path_prefix = \"/b\"",
        ),
    ]
    .concat();
    let path = temp_file("check-unix.toml", &config);
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let line = |start: &str| line_starting(&stdout, start);
    assert!(
        line("route fresh: listen").ends_with(": can be bound"),
        "{stdout}"
    );
    assert!(!fresh.exists(), "check released the socket it bound");
    assert!(
        line("route fresh-b: listen").ends_with("(path_prefix /b): shared with route fresh"),
        "{stdout}"
    );
    let busy = line("route served: listen");
    assert!(
        busy.contains("FAILED: cannot be bound: another process is serving this socket")
            && busy.contains("(routes[1].listen: stop what holds it"),
        "{busy}"
    );
    assert!(served.exists(), "a served socket is left alone");
    assert!(line("route stale: listen").ends_with("a stale socket file, which run replaces"));
    assert!(
        stale.exists(),
        "check does not replace a stale socket; run does"
    );
    let other = line("route plain: listen");
    assert!(
        other.contains("FAILED: cannot be bound: the path exists and is not a socket")
            && other.contains("routes[3].listen: remove what is at the path"),
        "{other}"
    );
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "not a socket");
    let nodir = line("route nodir: listen");
    assert!(
        nodir.contains("FAILED: cannot be bound: No such file or directory")
            && nodir.contains("routes[4].listen: create the socket's directory"),
        "{nodir}"
    );
    let proxy_shown = format!("through forward proxy http://{}/", forward.addr);
    let tunnel = line("route tunnel: upstream");
    assert!(
        tunnel.contains(&format!(
            "TLS with localhost:{} {proxy_shown} ok (certificate verified, h2)",
            tls_addr.port()
        )),
        "{tunnel}"
    );
    let no_tunnel = line("route no-tunnel: upstream");
    assert!(
        no_tunnel.contains(&format!(
            "FAILED: cannot tunnel to localhost:{} {proxy_shown}",
            dead.port()
        )),
        "{no_tunnel}"
    );
    assert!(
        line("route absolute: upstream").contains("TCP connection to forward proxy"),
        "{stdout}"
    );
    assert!(
        forward
            .requests()
            .contains(&format!("CONNECT localhost:{} HTTP/1.1", tls_addr.port())),
        "{:?}",
        forward.requests()
    );
    assert!(!stdout.contains(PROXY_PASSWORD), "{stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some("check: FAILED (4 problems above)"),
        "{stdout}"
    );
}

/// `check` names the fields a route sets and where its token goes, never a value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_the_fields_a_route_sets_without_their_values() {
    let (_idp, _api, path) = stack_config(LOOPBACK, Duration::from_secs(60)).await;
    let key = temp_file("key", "file-value-never-shown");
    let config = std::fs::read_to_string(&path).unwrap();
    let extra = format!(
        "set_headers = {{ \"Ocp-Apim-Subscription-Key\" = \"inline-value-never-shown\" }}\nset_header_files = {{ \"X-Api-Key\" = \"{}\" }}\ntoken_header = \"api-key\"\ntoken_format = \"{{token}}\"\n",
        key.display()
    );
    std::fs::write(&path, format!("{config}{extra}")).unwrap();
    let out = cli(
        &["check", "--config", path.to_str().unwrap()],
        &[("TP_TEST_SECRET", DEMO_CLIENT_SECRET)],
    )
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains(": token in api-key: {token}; sets ocp-apim-subscription-key, x-api-key (values not shown)"),
        "{stdout}"
    );
    assert!(!stdout.contains("never-shown"), "{stdout}");
}

/// `check` with a managed identity: the endpoint asked as `run` asks it, the kind and the
/// token's lifetime reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fetches_a_managed_identity_token() {
    let fake = FakeIdentity::start(None, &[]).await;
    let config = format!(
        "[credentials.mi]\nmanaged_identity = {{ endpoint = \"{}\" }}\nscope = \"api://x/.default\"\n\n\
         [[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9/api\"\ncredential = \"mi\"\n",
        fake.url()
    );
    let path = temp_file("mi.toml", &config);
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("credential mi: authenticates with managed_identity (IMDS)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("credential mi: ok, token lifetime 3599 s"),
        "{stdout}"
    );
    assert_eq!(fake.state().requests.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_a_wrong_secret_explains_and_fails() {
    let (_idp, _api, path) = stack_config(LOOPBACK, Duration::from_secs(60)).await;
    let out = cli(
        &["check", "--config", path.to_str().unwrap()],
        &[("TP_TEST_SECRET", "not-the-secret")],
    )
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAILED") && stdout.contains("invalid_client") && stdout.contains("hint:"),
        "{stdout}"
    );
    assert!(!stdout.contains("not-the-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_one_access_token_for_scripts() {
    let (idp, _api, path) = stack_config(LOOPBACK, Duration::from_secs(60)).await;
    let out = cli(
        &[
            "token",
            "--config",
            path.to_str().unwrap(),
            "--credential",
            "api",
        ],
        &[("TP_TEST_SECRET", DEMO_CLIENT_SECRET)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        idp.state().tokens.all(),
        vec![stdout.trim_end().to_string()]
    );
    assert!(stdout.ends_with('\n') && stdout.lines().count() == 1);

    let out = cli(
        &[
            "token",
            "--config",
            path.to_str().unwrap(),
            "--credential",
            "nope",
        ],
        &[("TP_TEST_SECRET", DEMO_CLIENT_SECRET)],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("api"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_file_key_and_fix_and_exit_2() {
    let base = "[credentials.api]\ntoken_url = \"https://login.example.com/t/token\"\nclient_id = \"id\"\n\
                client_secret = \"s\"\n[[routes]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.example.com\"\ncredential = \"api\"\n";
    let cases = [
        (base.replace("client_id =", "client_idd ="), "client_idd"),
        (
            base.replace("\"s\"", "\"${TP_SURELY_UNSET_VAR}\""),
            "TP_SURELY_UNSET_VAR",
        ),
        (
            base.replace("https://api.example.com", "htp:/nope"),
            "routes[0].upstream",
        ),
        (
            base.replace("https://login.example.com/t/token", "not a url"),
            "credentials.api.token_url",
        ),
        (
            base.replace("127.0.0.1:8080", "localhost"),
            "routes[0].listen",
        ),
        // Type and structure errors read like the others: the dotted key, plain words.
        (
            base.replace("client_secret = \"s\"", "client_secret = \"s\"\nscope = 5"),
            "credentials.api.scope (line 5): expected a string or a list of strings",
        ),
        (
            base.replace("[[routes]]", "[routes]"),
            "routes (line 5): expected [[routes]], an array of tables",
        ),
        (
            base.replace("\"127.0.0.1:8080\"", "8080"),
            "routes[0].listen (line 6): expected a string, found",
        ),
        // Routes sharing a listener: prefixes must differ and be plain paths.
        (
            format!("{base}[[routes]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://b.example.com\"\ncredential = \"api\"\n"),
            "routes[1].path_prefix: / on 127.0.0.1:8080 is already routes[0]'s",
        ),
        (
            base.replace("credential = \"api\"", "credential = \"api\"\npath_prefix = \"/a/../b\""),
            "routes[0].path_prefix: `/a/../b` is not a path prefix",
        ),
        (
            format!(
                "{}[[routes]]\nlisten = \"unix:/tmp/tp-x.sock\"\npath_prefix = \"/b\"\nsocket_mode = \"0600\"\nupstream = \"https://b.example.com\"\ncredential = \"api\"\n",
                base.replace("127.0.0.1:8080", "unix:/tmp/tp-x.sock")
            ),
            "routes[1].socket_mode: differs from routes[0]'s",
        ),
    ];
    for (config, key) in cases {
        let path = temp_file("bad.toml", &config);
        for cmd in ["check", "run"] {
            let out = cli(&[cmd, "--config", path.to_str().unwrap()], &[]).await;
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {key}: {stderr}");
            assert!(
                stderr.contains(path.to_str().unwrap()),
                "names the file: {stderr}"
            );
            assert!(stderr.contains(key), "names {key}: {stderr}");
            assert!(stderr.contains("fix:"), "says the fix: {stderr}");
        }
    }
    // Every problem of the file in one run, each named.
    let two = base
        .replace("https://login.example.com/t/token", "not a url")
        .replace("127.0.0.1:8080", "localhost")
        .replace("credential = \"api\"", "credential = \"other\"");
    let path = temp_file("two-errors.toml", &two);
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("credentials.api.token_url") && stderr.contains("routes[0].listen"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("  fix: ").count(), 2, "{stderr}");
    // A variable that is set but empty is named, as an unset one is.
    let tenant = base.replace("/t/token", "/${TP_TEST_EMPTY_TENANT}/oauth2/v2.0/token");
    let path = temp_file("empty-var.toml", &tenant);
    let out = cli(
        &["check", "--config", path.to_str().unwrap()],
        &[("TP_TEST_EMPTY_TENANT", "")],
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("credentials.api.token_url")
            && stderr.contains("TP_TEST_EMPTY_TENANT is set but empty"),
        "{stderr}"
    );
    let out = cli(&["run", "--config", "/nonexistent/token-proxy.toml"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/token-proxy.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_and_exits_0() {
    let addr = fresh_addr();
    let (_idp, api, path) = stack_config(addr, Duration::from_secs(60)).await;
    let mut proc = Process::run_with(&path, "info", &[("TP_TEST_SECRET", DEMO_CLIENT_SECRET)]);
    wait_listening(addr, Duration::from_secs(10)).await;
    let slow = tokio::spawn(async move { get(addr, "/slow/1500").await });
    assert!(eventually(Duration::from_secs(5), || api.state().in_flight() == 1).await);
    proc.signal("TERM");
    // New connections are refused while the slow request is still being served.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    let reply = slow.await.unwrap();
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the request in flight finished"
    );
    assert_eq!(
        proc.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        proc.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_at_trace_level_hold_no_secret_and_no_token() {
    let addr = fresh_addr();
    let (idp, _api, path) = stack_config(addr, Duration::from_secs(2)).await;
    // A field the route sets is a secret too.
    let set = "set-header-secret-never-logged";
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{config}set_headers = {{ \"X-Api-Key\" = \"{set}\" }}\n"),
    )
    .unwrap();
    let mut proc = Process::run_with(&path, "trace", &[("TP_TEST_SECRET", DEMO_CLIENT_SECRET)]);
    wait_listening(addr, Duration::from_secs(10)).await;
    for path in ["/a?token=1", "/status/401", "/b"] {
        get(addr, path).await;
    }
    let post = http::Request::post(format!("http://{addr}/p"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&client(), post).await.status, StatusCode::OK);
    // Let a refresh or two happen, then a failing one.
    assert!(eventually(Duration::from_secs(5), || idp.state().request_count() >= 2).await);
    idp.state().set_canned(Some(demo::CannedResponse {
        status: StatusCode::BAD_REQUEST,
        content_type: "application/json",
        body: format!("{{\"error\":\"invalid_request\",\"error_description\":\"echoing {DEMO_CLIENT_SECRET}\"}}"),
        retry_after: None,
        headers: Vec::new(),
        drip: None,
    }));
    assert!(eventually(Duration::from_secs(5), || idp.state().request_count() >= 3).await);
    get(addr, "/c").await;
    proc.signal("INT");
    assert_eq!(proc.wait_exit(Duration::from_secs(10)).await, Some(0));
    let log = proc.stderr();
    assert!(
        log.contains("token refreshed"),
        "the log was captured: {log}"
    );
    assert!(
        log.contains("refresh{credential=api}"),
        "the refresh span names the credential: {log}"
    );
    assert!(
        log.contains("invalid_request"),
        "the failure was logged: {log}"
    );
    assert!(
        !log.contains(DEMO_CLIENT_SECRET),
        "the client secret leaked into the log"
    );
    assert!(
        !log.contains(set),
        "a set_headers value leaked into the log"
    );
    let tokens = idp.state().tokens.all();
    assert!(!tokens.is_empty());
    for token in tokens {
        assert!(!log.contains(&token), "a token leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_subcommand_serves_the_echo_api_through_the_proxy() {
    let addr = fresh_addr();
    let stdout_path = temp_file("demo.out", "");
    let child = binary()
        .args(["demo", "--listen", &addr.to_string()])
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Process {
        child,
        stderr_path: stdout_path.clone(),
    };
    wait_listening(addr, Duration::from_secs(10)).await;
    let reply = get(addr, "/hello?name=world").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["target"], "/api/hello?name=world");
    let printed = std::fs::read_to_string(&stdout_path).unwrap();
    assert!(
        printed.contains(&format!("curl -s 'http://{addr}/hello?name=world'")),
        "{printed}"
    );
    // The demo has an admin listener on a free loopback port, and says where.
    let admin_line = printed
        .lines()
        .find(|l| l.contains("admin") && l.contains("http://"))
        .unwrap_or_else(|| panic!("no admin line in {printed}"));
    let admin: std::net::SocketAddr = admin_line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no admin address in {admin_line:?}"));
    assert_ne!(admin.port(), 0);
    let readyz = format!("http://{admin}/readyz");
    assert!(
        printed.contains(&format!("token-proxy health --url {readyz}")),
        "{printed}"
    );
    let ready = health_within(&readyz, Duration::from_secs(5)).await;
    assert!(ready, "the demo's /readyz never answered 200");
    assert_eq!(get(admin, "/metrics").await.status, StatusCode::OK);
    proc.signal("TERM");
    assert_eq!(proc.wait_exit(Duration::from_secs(10)).await, Some(0));
}

/// The demo's config is embedded: an address in use is named by the flag the user gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_a_busy_port_names_the_flag() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    for flag in ["--listen", "--admin-listen"] {
        let out = cli(&["demo", flag, &addr], &[]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(&format!("{flag} {addr}")), "{stderr}");
        assert!(!stderr.contains("routes[0]"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_metrics_and_the_health_probe() {
    let idp = start_token_endpoint(Duration::from_secs(3600)).await;
    let api = start_upstream(&idp).await;
    let (addr, admin) = (fresh_addr(), fresh_addr());
    let readyz = format!("http://{admin}/readyz");
    // Nothing listens yet: the probe fails.
    let out = cli(&["health", "--url", &readyz, "--timeout", "1"], &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));

    let config = format!(
        "admin_listen = \"{admin}\"\n[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"{DEMO_CLIENT_SECRET}\"\n\n\
         [[routes]]\nname = \"main\"\nlisten = \"{addr}\"\nupstream = \"http://{}/api\"\ncredential = \"api\"\n",
        demo::token_url(&idp),
        api.addr()
    );
    let path = temp_file("observed.toml", &config);
    let mut proxy = Process::run_args(
        &path,
        &["--workers", "2", "--log-format", "json"],
        "info",
        &[],
    );
    wait_listening(addr, Duration::from_secs(10)).await;
    let ready = health_within(&readyz, Duration::from_secs(5)).await;
    assert!(ready, "health never exited 0: {}", proxy.stderr());
    // The same probe, finding the admin listener in the config.
    let by_config = cli(&["health", "--config", path.to_str().unwrap()], &[]).await;
    assert_eq!(
        by_config.status.code(),
        Some(0),
        "{}",
        text(&by_config.stdout)
    );
    assert!(text(&by_config.stdout).contains(&readyz));
    // A config without an admin listener has nothing to probe: a config error.
    let bare = temp_file(
        "no-admin.toml",
        &config.replace(&format!("admin_listen = \"{admin}\"\n"), ""),
    );
    let out = cli(&["health", "--config", bare.to_str().unwrap()], &[]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no-admin.toml") && stderr.contains("admin_listen"),
        "{stderr}"
    );

    for i in 0..5 {
        let reply = get(addr, &format!("/items/{i}?sig=query-secret-{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let metrics = get(admin, "/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let metrics = text(&metrics.body);
    for line in [
        r#"token_proxy_requests_total{route="main",method="GET",status="2xx"} 5"#,
        r#"token_proxy_request_duration_seconds_count{route="main"} 5"#,
        r#"token_proxy_token_fetches_total{credential="api",outcome="ok"} 1"#,
        r#"token_proxy_token_fetches_in_flight{credential="api"} 0"#,
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }

    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(0));
    let stderr = proxy.stderr();
    let access: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|v| v["target"] == "token_proxy::access")
        .collect();
    assert_eq!(access.len(), 5, "{stderr}");
    // A line is written when its response has ended, which with two workers may come after
    // the client already sent the next request: compare the paths as a set.
    let mut paths: Vec<String> = access.iter().map(|l| l["path"].to_string()).collect();
    paths.sort();
    let expected: Vec<String> = (0..5).map(|i| format!("\"/items/{i}\"")).collect();
    assert_eq!(paths, expected, "{stderr}");
    for line in &access {
        assert_eq!(line["route"], "main");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["status"], 200);
        assert_eq!(line["complete"], true);
        assert!(line["bytes"].as_u64().unwrap() > 0, "{line}");
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    }
    assert!(
        !stderr.contains("query-secret"),
        "query strings are never logged"
    );
    for token in idp.state().tokens.all() {
        assert!(!stderr.contains(&token) && !metrics.contains(&token));
    }
}

#[tokio::test]
async fn completions_and_man_page_come_from_the_cli_definition() {
    let out = cli(&["completions", "bash"], &[]).await;
    assert_eq!(out.status.code(), Some(0));
    let script = text(&out.stdout);
    assert!(
        script.contains("token-proxy") && script.contains("health"),
        "{script}"
    );
    let out = cli(&["man"], &[]).await;
    assert_eq!(out.status.code(), Some(0));
    let page = text(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH token-proxy"),
        "{page}"
    );
    assert!(
        page.contains("health") && page.contains("\\-\\-log\\-format"),
        "{page}"
    );
    // One page: every command and its options are on it, with no reference to a page per
    // command that nothing installs.
    for needle in [
        "token\\-proxy health",
        "\\-\\-admin\\-listen",
        "token\\-proxy check \\-\\-config",
    ] {
        assert!(page.contains(needle), "{needle} not in {page}");
    }
    assert!(!page.contains("token\\-proxy\\-run(1)"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environments_proxy_variables_are_honoured_and_their_credentials_never_shown() {
    let forward = ForwardProxy::start().await;
    // A destination that is not loopback (loopback never uses an environment proxy). The
    // proxy cannot resolve it, so the token request fails there, and the proxy's log shows
    // the request went through it.
    let config = temp_file(
        "env-proxy.toml",
        "[credentials.far]\ntoken_url = \"http://idp.token-proxy-test.invalid/oauth2/token\"\nallow_insecure_token_url = true\nclient_id = \"i\"\nclient_secret = \"s\"\n\n\
         [credentials.near]\ntoken_url = \"http://127.0.0.1:9/oauth2/token\"\nclient_id = \"i\"\nclient_secret = \"s\"\n\n\
         [[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9\"\ncredential = \"near\"\n",
    );
    let url = forward.url();
    let out = cli(
        &["check", "--config", config.to_str().unwrap()],
        &[("HTTP_PROXY", url.as_str()), ("NO_PROXY", "")],
    )
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let via = format!(
        "credential far: authenticates with client_secret_post, through forward proxy http://{}/",
        forward.addr
    );
    assert!(stdout.contains(&via), "{stdout}");
    assert!(
        stdout.contains("credential near: authenticates with client_secret_post\n"),
        "loopback goes direct: {stdout}"
    );
    assert!(
        forward.requests().contains(
            &"POST http://idp.token-proxy-test.invalid/oauth2/token HTTP/1.1".to_string()
        ),
        "{:?}",
        forward.requests()
    );
    for shown in [&stdout, &stderr] {
        assert!(!shown.contains(PROXY_PASSWORD), "{shown}");
    }
}

/// `private_key_jwt` with a key that is not the certificate's is a config error at load,
/// naming the key, rather than a refusal by the identity provider at the first token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_key_that_is_not_the_certificates_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("tp-cli-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, cert, other) = (dir.join("k.pem"), dir.join("c.pem"), dir.join("o.pem"));
    let openssl = |args: Vec<&str>| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl (tests/run.sh installs it)");
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    let (k, c, o) = (
        key.to_str().unwrap(),
        cert.to_str().unwrap(),
        other.to_str().unwrap(),
    );
    openssl(vec![
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        k,
        "-out",
        c,
        "-subj",
        "/CN=token-proxy test",
        "-days",
        "1",
    ]);
    openssl(vec![
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        o,
    ]);
    let config = format!(
        "[credentials.api]\ntoken_url = \"https://login.example.com/t/token\"\nclient_id = \"id\"\n\
         private_key_file = \"{o}\"\ncertificate_file = \"{c}\"\n\
         [[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"https://api.example.com\"\ncredential = \"api\"\n"
    );
    let path = temp_file("mismatched-key.toml", &config);
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("credentials.api.private_key_file")
            && stderr.contains("is not the certificate's"),
        "{stderr}"
    );
    // One PEM with the certificate before the key, given for both, loads: `check` goes on to
    // the token endpoint (refused here, exit 1) instead of stopping at the config (exit 2).
    let both = dir.join("both.pem");
    let pem = [std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()].concat();
    std::fs::write(&both, pem).unwrap();
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = gone.local_addr().unwrap();
    drop(gone);
    let config = format!(
        "[credentials.api]\ntoken_url = \"http://{dead}/t/token\"\nclient_id = \"id\"\n\
         private_key_file = \"{b}\"\ncertificate_file = \"{b}\"\n\
         [[routes]]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://{dead}\"\ncredential = \"api\"\n",
        b = both.display()
    );
    let path = temp_file("cert-first.toml", &config);
    let out = cli(&["check", "--config", path.to_str().unwrap()], &[]).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("credential api: authenticates with private_key_jwt"),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
