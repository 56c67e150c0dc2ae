//! Back-pressure and graceful shutdown, each on its own small server: a full queue answers 429
//! with `Retry-After`; SIGTERM makes new requests and `/ready` answer 503 while the running
//! stream finishes, then the process exits 0; `kill -9` mid-stream breaks the stream (it ends
//! without `[DONE]`, it does not hang) and a server restarted on the same data starts clean.

use std::time::Duration;

use futures_util::StreamExt;
use prefix_rft_e2e::{Server, ACME_KEY, MODEL};
use serde_json::json;

/// The repository's config with one batch slot, no queue and a 64 KiB body limit.
fn one_slot_config() -> String {
    let text = prefix_rft_e2e::repo_config();
    text.replace("max_batch_size = 32", "max_batch_size = 1")
        .replace("max_queue = 64", "max_queue = 0")
        .replace("max_n = 8", "max_n = 1")
        // Small enough that an oversized body still fits the loopback socket buffers, so the
        // client reads the 413 instead of a reset while it is still sending.
        .replace("max_body_bytes = 4194304", "max_body_bytes = 65536")
}

async fn start_stream(server: &Server, max_tokens: u32) -> reqwest::Response {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.base))
        .bearer_auth(ACME_KEY)
        .json(&json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": true}))
        .send()
        .await
        .expect("stream request");
    assert_eq!(r.status(), 200);
    r
}

async fn post_small(server: &Server) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/completions", server.base))
        .bearer_auth(ACME_KEY)
        .json(&json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1}))
        .send()
        .await
        .expect("request")
}

/// Reads the SSE body to the end; returns it whole.
async fn read_all(r: reqwest::Response) -> String {
    let mut body = String::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        body.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_is_429_with_retry_after() {
    let server = Server::start(Some(&one_slot_config()));
    let running = start_stream(&server, 40).await;
    let r = post_small(&server).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let body = read_all(running).await;
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // The slot is free again once the stream is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = post_small(&server).await;
        if r.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot never freed: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_running_requests_then_exits_zero() {
    let mut server = Server::start(Some(&one_slot_config()));
    let running = start_stream(&server, 64).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = reqwest::get(format!("{}/ready", server.base))
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let refused = post_small(&server).await;
    assert_eq!(refused.status(), 503);
    let body = read_all(running).await;
    assert!(body.contains("\"finish_reason\":\"length\""), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_frees_the_slot() {
    let server = Server::start(Some(&one_slot_config()));
    let running = start_stream(&server, 2000).await;
    let mut body = running.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("chunk");
    assert!(!first.is_empty());
    drop(body);
    // With one slot and no queue, a new request succeeds only once the abandoned one is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = post_small(&server).await;
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned stream kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn body_over_the_limit_is_413() {
    let server = Server::start(Some(&one_slot_config()));
    let big = "a".repeat(200_000);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", server.base))
        .bearer_auth(ACME_KEY)
        .json(&json!({"model": MODEL, "prompt": big, "max_tokens": 1}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "request_too_large");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_streaming_breaks_the_stream_and_the_restart_is_clean() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(None, data.path());
    // A finished completion: acknowledged only once recorded, so it must survive the kill.
    let r = post_small(&server).await;
    assert_eq!(r.status(), 200);
    let done: serde_json::Value = r.json().await.expect("json");
    let done_id = done["id"].as_str().expect("id").to_string();

    let running = start_stream(&server, 400).await;
    let mut stream = running.bytes_stream();
    let first = stream.next().await.expect("a first chunk").expect("chunk");
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    server.kill9();
    let mut rest = String::new();
    let mut broken = false;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => rest.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
    })
    .await
    .expect("the stream must end once the server is gone");
    assert!(
        broken || !rest.contains("[DONE]"),
        "a killed server cannot have finished the stream: {rest}"
    );
    drop(server);

    let server = Server::start_in(None, data.path());
    let r = post_small(&server).await;
    assert_eq!(r.status(), 200, "the restarted server serves");
    let fb = reqwest::Client::new()
        .post(format!("{}/v1/feedback", server.base))
        .bearer_auth(ACME_KEY)
        .json(&json!({"completion_id": done_id, "rating": "up"}))
        .send()
        .await
        .expect("feedback");
    assert_eq!(
        fb.status(),
        201,
        "the completion finished before the kill is still on record"
    );
}
