//! Several routes on one listener, told apart by `path_prefix`: longest prefix first, on whole
//! segments, the path normalised before it is matched and forwarded; `no_route` for the rest;
//! each route with its own upstream and credential, through the front door, hyper's path and
//! h2c alike; and reloads that change the routes of a listener that stays open.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::*;
use token_proxy::config::Config;
use token_proxy::demo::{self, DemoServer, EchoState, IdpState};

/// Two APIs, each trusting only its own identity provider: a request routed to the wrong
/// one, or sent with the other's token, gets `401` there.
struct TwoApis {
    _idps: (DemoServer<IdpState>, DemoServer<IdpState>),
    graph: DemoServer<EchoState>,
    items: DemoServer<EchoState>,
    graph_idp: String,
    items_idp: String,
}

impl TwoApis {
    async fn start() -> TwoApis {
        let graph_idp = start_token_endpoint(Duration::from_secs(60)).await;
        let items_idp = start_token_endpoint(Duration::from_secs(60)).await;
        let graph = start_upstream(&graph_idp).await;
        let items = start_upstream(&items_idp).await;
        TwoApis {
            graph_idp: demo::token_url(&graph_idp),
            items_idp: demo::token_url(&items_idp),
            _idps: (graph_idp, items_idp),
            graph,
            items,
        }
    }

    /// Both credentials, then `routes` (each a route table's lines after `[[routes]]`).
    fn config(&self, routes: &[String]) -> String {
        let mut text = format!(
            "admin_listen = \"127.0.0.1:0\"\n{}{}",
            credential("graph", &self.graph_idp, ""),
            credential("items", &self.items_idp, "")
        );
        for r in routes {
            text.push_str("[[routes]]\n");
            text.push_str(r);
            text.push('\n');
        }
        text
    }

    fn graph_route(&self, listen: &str, extra: &str) -> String {
        format!(
            "listen = \"{listen}\"\npath_prefix = \"/graph\"\nupstream = \"http://{}/v1.0\"\ncredential = \"graph\"\n{extra}",
            self.graph.addr()
        )
    }

    fn items_route(&self, listen: &str, extra: &str) -> String {
        format!(
            "listen = \"{listen}\"\npath_prefix = \"/items\"\nupstream = \"http://{}/base\"\ncredential = \"items\"\n{extra}",
            self.items.addr()
        )
    }
}

/// The one target each upstream last received, and that it came with its own token.
fn last_target(api: &DemoServer<EchoState>) -> String {
    let records = api.state().records();
    let last = records.last().expect("a request reached the upstream");
    assert!(last.token_was_current, "the route's own credential");
    last.target.clone()
}

#[tokio::test]
async fn two_prefixes_on_one_listener_reach_their_own_upstream_with_their_own_token() {
    let apis = TwoApis::start().await;
    let addr = fresh_addr();
    let listen = addr.to_string();
    let proxy = start_proxy(&apis.config(&[
        apis.graph_route(&listen, ""),
        apis.items_route(&listen, "strip_prefix = false"),
    ]))
    .await;
    assert_eq!(proxy.route_addrs(), vec![addr, addr]);

    // The front door's lean path: the prefix cut (graph) or kept (items).
    let reply = get(addr, "/graph/me?$select=id").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(last_target(&apis.graph), "/v1.0/me?$select=id");
    let reply = get(addr, "/items/42").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(last_target(&apis.items), "/base/items/42");
    // The prefix alone, and with a bare query.
    get(addr, "/graph").await;
    assert_eq!(last_target(&apis.graph), "/v1.0");
    get(addr, "/graph?x=1").await;
    assert_eq!(last_target(&apis.graph), "/v1.0?x=1");

    // hyper's path (a body) and h2c, on the same routes.
    let post = http::Request::post(format!("http://{addr}/graph/items"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&client(), post).await.status, StatusCode::OK);
    assert_eq!(last_target(&apis.graph), "/v1.0/items");
    let h2 = http::Request::get(format!("http://{addr}/items/h2"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&h2c_client(), h2).await.status, StatusCode::OK);
    assert_eq!(last_target(&apis.items), "/base/items/h2");
    let h2_put = http::Request::put(format!("http://{addr}/graph/put"))
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    assert_eq!(send(&h2c_client(), h2_put).await.status, StatusCode::OK);
    assert_eq!(last_target(&apis.graph), "/v1.0/put");

    // Whole segments only: `/graphql` is no route's, over every path.
    let before = (
        apis.graph.state().records().len(),
        apis.items.state().records().len(),
    );
    for reply in [
        get(addr, "/graphql").await,
        get(addr, "/").await,
        send(
            &client(),
            http::Request::post(format!("http://{addr}/graphql"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await,
        send(
            &h2c_client(),
            http::Request::get(format!("http://{addr}/nothing"))
                .body(Full::default())
                .unwrap(),
        )
        .await,
    ] {
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(reply.json()["error"], "no_route", "{:?}", reply.body);
        assert_eq!(reply.headers["content-type"], "application/json");
    }
    let after = (
        apis.graph.state().records().len(),
        apis.items.state().records().len(),
    );
    assert_eq!(before, after, "nothing went upstream");
}

#[tokio::test]
async fn the_path_is_normalised_before_it_is_matched_and_never_climbs_above_the_base_path() {
    let apis = TwoApis::start().await;
    let addr = fresh_addr();
    let listen = addr.to_string();
    let _proxy =
        start_proxy(&apis.config(&[apis.graph_route(&listen, ""), apis.items_route(&listen, "")]))
            .await;
    // Read as the upstream would read it: /graph/x, the graph route's.
    let reply = get(addr, "/items/../graph/x").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(last_target(&apis.graph), "/v1.0/x");
    let reply = get(addr, "/items/%2e%2e/%2E%2E/graph/y").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(last_target(&apis.graph), "/v1.0/y");
    // `..` stops at the route's base path.
    get(addr, "/items/../../../items/z").await;
    assert_eq!(last_target(&apis.items), "/base/z");
    // An encoded slash joined to a dot segment is refused, not guessed at.
    let items_before = apis.items.state().records().len();
    let graph_before = apis.graph.state().records().len();
    for target in ["/items/..%2Fgraph/x", "/items/..%5Cgraph/x"] {
        let reply = get(addr, target).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{target}");
        assert_eq!(reply.json()["error"], "bad_request");
    }
    assert_eq!(apis.items.state().records().len(), items_before);
    assert_eq!(apis.graph.state().records().len(), graph_before);
    // An encoded slash alone is an API's business, passed as sent.
    get(addr, "/items/group%2Fproject").await;
    assert_eq!(last_target(&apis.items), "/base/group%2Fproject");
}

#[tokio::test]
async fn the_longest_prefix_wins() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let addr = fresh_addr();
    let listen = addr.to_string();
    let route = |prefix: &str, base: &str| {
        format!(
            "[[routes]]\nlisten = \"{listen}\"\npath_prefix = \"{prefix}\"\nupstream = \"http://{}{base}\"\ncredential = \"api\"\n",
            api.addr()
        )
    };
    let text = format!(
        "{}{}{}{}",
        credential("api", &demo::token_url(&idp), ""),
        route("/", "/root"),
        route("/a/b/", "/ab"),
        route("/a", "/a-only"),
    );
    let _proxy = start_proxy(&text).await;
    for (sent, reached) in [
        ("/a/b/c", "/ab/c"),
        ("/a/b", "/ab"),
        ("/a/bc", "/a-only/bc"),
        ("/a", "/a-only"),
        ("/ab", "/root/ab"),
        ("/", "/root/"),
    ] {
        let reply = get(addr, sent).await;
        assert_eq!(reply.status, StatusCode::OK, "{sent}");
        let records = api.state().records();
        assert_eq!(records.last().unwrap().target, reached, "{sent}");
    }
}

#[tokio::test]
async fn metrics_and_access_lines_name_each_route_of_a_shared_listener() {
    let apis = TwoApis::start().await;
    let addr = fresh_addr();
    let listen = addr.to_string();
    let proxy = start_proxy(&apis.config(&[
        apis.graph_route(&listen, ""),
        apis.items_route(&listen, "name = \"items-api\""),
    ]))
    .await;
    get(addr, "/graph/a").await;
    get(addr, "/items/b").await;
    get(addr, "/items/c").await;
    get(addr, "/other").await;
    let admin = proxy.admin_addr().unwrap();
    let scrape = String::from_utf8(get(admin, "/metrics").await.body.to_vec()).unwrap();
    for line in [
        format!(
            r#"token_proxy_requests_total{{route="{listen}/graph",method="GET",status="2xx"}} 1"#
        ),
        r#"token_proxy_requests_total{route="items-api",method="GET",status="2xx"} 2"#.to_string(),
        // What the listener answers before a route is known counts under its address.
        format!(r#"token_proxy_errors_total{{route="{listen}",error="no_route"}} 1"#),
    ] {
        assert!(scrape.contains(&line), "no {line} in\n{scrape}");
    }
}

#[tokio::test]
async fn a_reload_adds_changes_and_removes_routes_of_a_listener_that_stays_open() {
    let apis = TwoApis::start().await;
    let addr = fresh_addr();
    let listen = addr.to_string();
    let mut proxy = start_proxy(&apis.config(&[apis.graph_route(&listen, "")])).await;
    assert_eq!(get(addr, "/items/1").await.json()["error"], "no_route");
    // A connection kept open across the reloads: the listener never closes.
    let held = tokio::net::TcpStream::connect(addr).await.unwrap();

    let parse = |text: String| Config::parse(&text, "test.toml", &|_| None).unwrap();
    let added = parse(apis.config(&[apis.graph_route(&listen, ""), apis.items_route(&listen, "")]));
    let summary = proxy.apply(&added).await.unwrap();
    assert_eq!(
        (
            summary.routes_started,
            summary.routes_updated,
            summary.routes_stopped
        ),
        (1, 0, 0)
    );
    assert_eq!(get(addr, "/items/1").await.status, StatusCode::OK);
    assert_eq!(last_target(&apis.items), "/base/1");
    assert_eq!(get(addr, "/graph/2").await.status, StatusCode::OK);

    let changed = parse(apis.config(&[
        apis.graph_route(&listen, "strip_prefix = false"),
        apis.items_route(&listen, ""),
    ]));
    let summary = proxy.apply(&changed).await.unwrap();
    assert_eq!(
        (
            summary.routes_started,
            summary.routes_updated,
            summary.routes_stopped
        ),
        (0, 1, 0)
    );
    get(addr, "/graph/3").await;
    assert_eq!(last_target(&apis.graph), "/v1.0/graph/3");

    let removed = parse(apis.config(&[apis.items_route(&listen, "")]));
    let summary = proxy.apply(&removed).await.unwrap();
    assert_eq!(
        (
            summary.routes_started,
            summary.routes_updated,
            summary.routes_stopped
        ),
        (0, 0, 1)
    );
    assert_eq!(get(addr, "/graph/4").await.json()["error"], "no_route");
    assert_eq!(get(addr, "/items/5").await.status, StatusCode::OK);
    // Unchanged: nothing is counted, nothing is swapped.
    let summary = proxy.apply(&removed).await.unwrap();
    assert_eq!(
        (
            summary.routes_started,
            summary.routes_updated,
            summary.routes_stopped
        ),
        (0, 0, 0)
    );
    drop(held);
}

#[tokio::test]
async fn redirects_to_the_upstream_come_back_under_the_prefix_the_route_cut() {
    let upstream = ScriptedUpstream::start(|seen: &Seen| {
        let origin = seen.header("host")[0].clone();
        vec![Step::Write(
            format!("HTTP/1.1 302 Found\r\nLocation: http://{origin}/base/next?x=1\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
        )]
    })
    .await;
    let (_idp, proxy) = proxy_to_scripted(
        upstream.addr,
        Duration::from_secs(60),
        "path_prefix = \"/items\"",
    )
    .await;
    let addr = proxy.route_addrs()[0];
    let location = |reply: Reply| reply.headers["location"].to_str().unwrap().to_owned();
    let go = |method: http::Method| {
        http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}/items/go"))
            .header("host", "proxy.local:8080")
            .body(Full::default())
            .unwrap()
    };
    // The front door (GET) and hyper's path (POST).
    for method in [http::Method::GET, http::Method::POST] {
        assert_eq!(
            location(send(&client(), go(method)).await),
            "http://proxy.local:8080/items/next?x=1"
        );
    }
    assert_eq!(upstream.seen().last().unwrap().target, "/base/go");
    // Kept in the path upstream, the prefix is in the redirect already.
    let (_idp2, kept) = proxy_to_scripted(
        upstream.addr,
        Duration::from_secs(60),
        "path_prefix = \"/items\"\nstrip_prefix = false",
    )
    .await;
    let addr = kept.route_addrs()[0];
    let reply = send(
        &client(),
        http::Request::get(format!("http://{addr}/items/go"))
            .header("host", "proxy.local:8080")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(location(reply), "http://proxy.local:8080/next?x=1");
    assert_eq!(upstream.seen().last().unwrap().target, "/base/items/go");
}
