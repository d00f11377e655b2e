//! Large bodies stream through the real binary both ways with flat memory.

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::*;
use token_proxy::demo::{self, RepeatBody, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET};

const SIZE: u64 = 1024 * 1024 * 1024;
/// Peak RSS the proxy may reach while moving 1 GiB each way (its idle RSS is a few MiB).
const PEAK_RSS_LIMIT_KIB: u64 = 48 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_and_download_pass_with_bounded_memory() {
    let idp = start_token_endpoint(Duration::from_secs(60)).await;
    let api = start_upstream(&idp).await;
    let addr = fresh_addr();
    let config = format!(
        "workers = 1\n[credentials.api]\ntoken_url = \"{}\"\nclient_id = \"{DEMO_CLIENT_ID}\"\nclient_secret = \"{DEMO_CLIENT_SECRET}\"\n\
         [[routes]]\nlisten = \"{addr}\"\nupstream = \"http://{}\"\ncredential = \"api\"\n",
        demo::token_url(&idp),
        api.addr()
    );
    let proc = Process::run(&temp_file("stream.toml", &config), "warn");
    wait_listening(addr, Duration::from_secs(10)).await;
    assert_eq!(get(addr, "/warm").await.status, StatusCode::OK);
    let idle_kib = proc.rss_kib();

    let uploader: Client<_, RepeatBody> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}/upload"))
        .body(RepeatBody::new(SIZE))
        .unwrap();
    // A stalled transfer fails the test rather than hanging it.
    let transfer = Duration::from_secs(60);
    let resp = tokio::time::timeout(transfer, uploader.request(req))
        .await
        .expect("the upload is answered within 60 s")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within("the upload's answer body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["body_bytes"], SIZE);

    let req = Request::get(format!("http://{addr}/download/{SIZE}"))
        .body(Default::default())
        .unwrap();
    let resp = within("the download's head", client().request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    let download = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                received += data.len() as u64;
            }
        }
    };
    tokio::time::timeout(transfer, download)
        .await
        .expect("the download ends within 60 s");
    assert_eq!(received, SIZE);

    let peak_kib = proc.peak_rss_kib();
    eprintln!("proxy RSS: idle {idle_kib} KiB, peak {peak_kib} KiB after 2 x 1 GiB");
    assert!(
        peak_kib < PEAK_RSS_LIMIT_KIB,
        "peak RSS {peak_kib} KiB: bodies were buffered"
    );
    assert!(
        peak_kib - idle_kib < 16 * 1024,
        "RSS grew by {} KiB: bodies were buffered",
        peak_kib - idle_kib
    );
}
