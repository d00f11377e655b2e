//! Load with faults: many clients while short-lived tokens expire and the identity provider
//! fails, and SIGTERM in the middle of traffic.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::*;
use token_proxy::demo::{self, DEMO_CLIENT_SECRET};

/// 200 clients for 30 s; tokens live 2 s; every third token request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_through_expiring_tokens_and_a_failing_idp() {
    let s = Stack::start(Duration::from_secs(2), "", "").await;
    s.idp.state().set_fail_every(3);
    s.api.state().set_keep_records(false);
    let addr = s.addr();
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let (c, stop, ok, failed) = (c.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = Request::get(format!("http://{addr}/load"))
                        .body(Full::default())
                        .unwrap();
                    let reply = send(&c, req).await;
                    if reply.status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.lock().unwrap().push((
                            reply.status,
                            String::from_utf8_lossy(&reply.body).to_string(),
                        ));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    let ok = ok.load(Ordering::Relaxed);
    let failed = failed.lock().unwrap();
    let idp = s.idp.state();
    eprintln!(
        "{ok} requests ok, {} failed, {} token requests ({} failed by script), max in flight {}",
        failed.len(),
        idp.request_count(),
        idp.request_count() / 3,
        idp.max_in_flight()
    );
    // Two refreshes a second apart, then a failure and its retry 3-9 s later (the requests
    // wait for it): at least 3 token requests in every 11 s.
    assert!(
        idp.request_count() >= 8,
        "tokens were refreshed through the run"
    );
    assert_eq!(
        s.api.state().rejected(),
        0,
        "a request reached the upstream with an expired or missing token"
    );
    assert_eq!(s.api.state().served(), ok);
    assert!(
        failed.is_empty(),
        "proxy-made errors: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        idp.max_in_flight(),
        1,
        "more than one token request in flight"
    );
    assert!(ok > 1000, "only {ok} requests");
}

/// SIGTERM while 20 clients keep sending: every request the upstream saw got its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_request_in_flight() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let addr = fresh_addr();
    let config = format!(
        "[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"demo-client\"\nclient_secret = \"{DEMO_CLIENT_SECRET}\"\n\
         [[routes]]\nlisten = \"{addr}\"\nupstream = \"http://{}\"\ncredential = \"api\"\n",
        demo::token_url(&idp),
        api.addr()
    );
    let mut proc = Process::run(&temp_file("load.toml", &config), "info");
    wait_listening(addr, Duration::from_secs(10)).await;
    let answered = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (answered, stop, next_id) = (answered.clone(), stop.clone(), next_id.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    // A fresh connection each time, so no request rides a connection being closed.
                    let req = Request::get(format!("http://{addr}/{id}/slow/150"))
                        .header("connection", "close")
                        .body(Full::default())
                        .unwrap();
                    match tokio::time::timeout(Duration::from_secs(10), client().request(req)).await
                    {
                        Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                            // Answered means the whole body arrived, not just the head.
                            let body = tokio::time::timeout(
                                Duration::from_secs(10),
                                resp.into_body().collect(),
                            )
                            .await
                            .expect("body within 10 s");
                            if let Ok(body) = body {
                                let body = body.to_bytes();
                                assert_eq!(&body[..], br#"{"slept_ms":"150"}"#, "request {id}");
                                answered.lock().unwrap().insert(format!("/{id}/slow/150"));
                            }
                        }
                        Ok(Ok(resp)) => panic!("request {id} got {}", resp.status()),
                        Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                        Err(_) => panic!("request {id} hung"),
                    }
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || api.state().records().len()
            >= 40)
        .await
    );
    proc.signal("TERM");
    assert_eq!(
        proc.wait_exit(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        proc.stderr()
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let answered = answered.lock().unwrap();
    let seen: Vec<String> = api
        .state()
        .records()
        .iter()
        .map(|r| r.target.clone())
        .collect();
    let lost: Vec<&String> = seen.iter().filter(|t| !answered.contains(*t)).collect();
    eprintln!(
        "{} requests reached the upstream, {} answered",
        seen.len(),
        answered.len()
    );
    assert!(
        lost.is_empty(),
        "requests in flight lost at shutdown: {lost:?}"
    );
    assert!(seen.len() >= 40);
}
