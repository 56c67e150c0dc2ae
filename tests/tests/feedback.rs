//! API.md "Feedback" against the real binary, model and SQLite file: every bad input, tenant
//! isolation, idempotency, pairing through the HTTP surface, and durability under `kill -9`
//! (the MongoDB `sync_write.js` pattern).
//!
//! Tenant `acme` is shared by the tests of this file; only
//! `pairs_stats_export_and_delete_for_one_adapter` writes as `globex`, so its counts are exact.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prefix_rft_e2e::{
    data_dir, kill_trials, shared, Server, ACME_KEY, ADMIN_KEY, GLOBEX_KEY, MODEL,
};
use serde_json::{json, Value};

struct Reply {
    status: u16,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    fn assert_error(&self, status: u16, kind: &str, param: Option<&str>) {
        assert_eq!(self.status, status, "{}", self.text);
        let e = &self.json()["error"];
        assert_eq!(e["type"], kind, "{}", self.text);
        assert_eq!(e["param"].as_str(), param, "{}", self.text);
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
    }
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    Reply { status, text }
}

async fn post_feedback(
    base: &str,
    key: &str,
    idem: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Reply {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/feedback"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    send(req).await
}

async fn rate(key: &str, completion: &str, index: u32, rating: &str) -> Reply {
    let body = json!({"completion_id": completion, "choice_index": index, "rating": rating});
    post_feedback(&shared().base, key, None, body.to_string()).await
}

async fn get(path: &str, key: &str) -> Reply {
    send(
        reqwest::Client::new()
            .get(format!("{}{path}", shared().base))
            .bearer_auth(key),
    )
    .await
}

/// A chat completion as `key`; returns its response body.
async fn chat(base: &str, key: &str, user: &str, n: u32, max_tokens: u32) -> Value {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "n": n,
        "temperature": 0.0,
    });
    let r = send(
        reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

fn completion_id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

/// The shared server's database, opened read-only (WAL lets us read while it writes).
fn shared_db() -> rusqlite::Connection {
    open_db(&data_dir().join("feedback.sqlite"))
}

fn open_db(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("open feedback db");
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c
}

#[tokio::test]
async fn bad_feedback_inputs_are_refused_with_openai_errors() {
    let base = &shared().base;
    let c = chat(base, ACME_KEY, "Say yes.", 1, 2).await;
    let id = completion_id(&c);
    let ok = |extra: Value| {
        let mut b = json!({"completion_id": id, "rating": "up"});
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b.to_string()
    };
    let cases: Vec<(Vec<u8>, u16, &str, Option<&str>)> = vec![
        (Vec::new(), 400, "invalid_request_error", None),
        (
            b"{\"completion_id\": ".to_vec(),
            400,
            "invalid_request_error",
            None,
        ),
        (b"[1, 2]".to_vec(), 400, "invalid_request_error", None),
        (
            b"{\"completion_id\": \"\xff\xfe\", \"rating\": \"up\"}".to_vec(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            ok(json!({"rating": "meh"})).into_bytes(),
            400,
            "invalid_request_error",
            Some("rating"),
        ),
        (
            ok(json!({"rating": null})).into_bytes(),
            400,
            "invalid_request_error",
            Some("rating"),
        ),
        (
            json!({"completion_id": id}).to_string().into_bytes(),
            400,
            "invalid_request_error",
            Some("rating"),
        ),
        (
            json!({"rating": "up"}).to_string().into_bytes(),
            400,
            "invalid_request_error",
            Some("completion_id"),
        ),
        (
            ok(json!({"choice_index": 1})).into_bytes(),
            400,
            "invalid_request_error",
            Some("choice_index"),
        ),
        (
            ok(json!({"choice_index": -1})).into_bytes(),
            400,
            "invalid_request_error",
            Some("choice_index"),
        ),
        (
            ok(json!({"correction": "x".repeat(1 << 20)})).into_bytes(),
            413,
            "invalid_request_error",
            Some("correction"),
        ),
        (
            ok(json!({"comment": "x".repeat(1 << 20)})).into_bytes(),
            413,
            "invalid_request_error",
            Some("comment"),
        ),
        (
            json!({"completion_id": "chatcmpl-nope", "rating": "up"})
                .to_string()
                .into_bytes(),
            404,
            "not_found_error",
            None,
        ),
    ];
    for (body, status, kind, param) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let r = post_feedback(base, ACME_KEY, None, body).await;
        assert_eq!(r.status, status, "{shown}: {}", r.text);
        r.assert_error(status, kind, param);
    }
    // Another tenant's completion is a 404, exactly like an unknown one.
    rate(GLOBEX_KEY, &id, 0, "up")
        .await
        .assert_error(404, "not_found_error", None);
    // No key at all.
    let r = send(
        reqwest::Client::new()
            .post(format!("{base}/v1/feedback"))
            .body(ok(json!({}))),
    )
    .await;
    r.assert_error(401, "authentication_error", None);
    // Nothing of the above was stored; the server still works.
    let n: i64 = shared_db()
        .query_row(
            "SELECT count(*) FROM feedback WHERE completion_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 0);
    assert_eq!(rate(ACME_KEY, &id, 0, "up").await.status, 201);
}

#[tokio::test]
async fn completions_are_recorded_before_the_response_and_when_the_stream_ends() {
    let base = &shared().base;
    let c = chat(base, ACME_KEY, "Name a colour.", 2, 3).await;
    let id = completion_id(&c);
    // Feedback right after the response must find the completion: it was committed first.
    assert_eq!(rate(ACME_KEY, &id, 1, "down").await.status, 201);
    let db = shared_db();
    let (tenant, version, request): (String, String, String) = db
        .query_row(
            "SELECT tenant, adapter_version, request FROM completions WHERE id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("recorded");
    assert_eq!((tenant.as_str(), version.as_str()), ("acme", "base"));
    assert_eq!(
        serde_json::from_str::<Value>(&request).expect("json"),
        json!([{"role": "user", "content": "Name a colour."}])
    );
    let text: String = db
        .query_row(
            "SELECT text FROM choices WHERE completion_id = ?1 AND idx = 1",
            [&id],
            |r| r.get(0),
        )
        .expect("choice");
    assert_eq!(
        text,
        c["choices"][1]["message"]["content"]
            .as_str()
            .expect("content")
    );

    // Streaming: the id is in every chunk; feedback right after [DONE] must find it.
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(ACME_KEY)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": true}))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    let mut body = String::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        body.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let first = body
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a chunk");
    let sid = serde_json::from_str::<Value>(first).expect("chunk json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(rate(ACME_KEY, &sid, 0, "up").await.status, 201);
}

#[tokio::test]
async fn rating_changed_twice_keeps_one_feedback_with_the_last_rating() {
    let c = chat(&shared().base, ACME_KEY, "Pick a number.", 1, 2).await;
    let id = completion_id(&c);
    let first = rate(ACME_KEY, &id, 0, "up").await;
    assert_eq!(first.status, 201, "{}", first.text);
    let fid = first.json()["id"].as_str().expect("id").to_string();
    assert!(fid.starts_with("fb-"));
    assert_eq!(first.json()["rating"], "up");
    for rating in ["down", "up", "down"] {
        let r = rate(ACME_KEY, &id, 0, rating).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["id"], fid.as_str());
        assert_eq!(r.json()["rating"], rating);
        assert_eq!(r.json()["created"], first.json()["created"]);
    }
    let rows: Vec<(String, String)> = {
        let db = shared_db();
        let mut stmt = db
            .prepare("SELECT id, rating FROM feedback WHERE completion_id = ?1")
            .expect("prepare");
        stmt.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect()
    };
    assert_eq!(rows, vec![(fid, "down".to_string())]);
    // Every accepted submission is counted by rating in /metrics.
    let metrics = send(reqwest::Client::new().get(format!("{}/metrics", shared().base))).await;
    let count = |rating: &str| -> f64 {
        let prefix = format!("prefix_rft_feedback_total{{rating=\"{rating}\"}} ");
        metrics
            .text
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        count("up") >= 2.0 && count("down") >= 2.0,
        "{}",
        metrics.text
    );
}

#[tokio::test]
async fn idempotency_key_returns_the_first_result() {
    let base = &shared().base;
    let a = completion_id(&chat(base, ACME_KEY, "Tell me a fact.", 1, 2).await);
    let b = completion_id(&chat(base, ACME_KEY, "Tell me a joke.", 1, 2).await);
    let key = format!("retry-{a}");
    let body = json!({"completion_id": a, "rating": "down", "comment": "too short"}).to_string();
    let first = post_feedback(base, ACME_KEY, Some(&key), body.clone()).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = post_feedback(base, ACME_KEY, Some(&key), body).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json()["id"], first.json()["id"]);
    // The same key for another completion is a client bug, not a silent overwrite.
    let other = json!({"completion_id": b, "rating": "down"}).to_string();
    post_feedback(base, ACME_KEY, Some(&key), other)
        .await
        .assert_error(400, "invalid_request_error", Some("Idempotency-Key"));
    // Keys are per tenant: globex's same key does not see acme's feedback.
    let foreign = json!({"completion_id": a, "rating": "up"}).to_string();
    post_feedback(base, GLOBEX_KEY, Some(&key), foreign)
        .await
        .assert_error(404, "not_found_error", None);
    let n: i64 = shared_db()
        .query_row(
            "SELECT count(*) FROM feedback WHERE completion_id IN (?1, ?2)",
            [&a, &b],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn feedback_on_a_several_prompt_completion_pairs_under_its_own_prompt() {
    let base = &shared().base;
    let prompts = [
        "Q: Which river runs through Paris? A:",
        "Q: Which river runs through Vienna? A:",
    ];
    let r = send(
        reqwest::Client::new()
            .post(format!("{base}/v1/completions"))
            .bearer_auth(ACME_KEY)
            .json(&json!({"model": MODEL, "prompt": prompts, "max_tokens": 4, "temperature": 0})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let rejected = v["choices"][1]["text"].as_str().expect("text").to_string();
    let correction = "The Danube (several-prompt test).";
    let fb = post_feedback(
        base,
        ACME_KEY,
        None,
        json!({"completion_id": completion_id(&v), "choice_index": 1, "rating": "down",
               "correction": correction})
        .to_string(),
    )
    .await;
    assert_eq!(fb.status, 201, "{}", fb.text);
    let export = get("/v1/feedback/export?adapter=base", ACME_KEY).await;
    assert_eq!(export.status, 200, "{}", export.text);
    let row: Value = export
        .text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("jsonl row"))
        .find(|row| row["chosen"] == correction)
        .unwrap_or_else(|| panic!("no pair with the correction: {}", export.text));
    assert_eq!(
        row,
        json!({"prompt": prompts[1], "chosen": correction, "rejected": rejected})
    );
}

#[tokio::test]
async fn pairs_stats_export_and_delete_for_one_adapter() {
    let base = &shared().base;
    let prompt = "Answer with one word: what colour is the sky?";
    let one = chat(base, GLOBEX_KEY, prompt, 1, 4).await;
    // The same prompt with other whitespace is the same prompt for pairing.
    let two = chat(
        base,
        GLOBEX_KEY,
        &format!("  {}", prompt.replace(' ', "  ")),
        1,
        4,
    )
    .await;
    let (a, b) = (completion_id(&one), completion_id(&two));
    let text_a = one["choices"][0]["message"]["content"]
        .as_str()
        .expect("a")
        .to_string();
    // Down with a correction: a pair (correction > output) and a demonstration.
    let r = post_feedback(
        base,
        GLOBEX_KEY,
        None,
        json!({"completion_id": a, "rating": "down", "correction": "Blue, on a clear day."})
            .to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Thumbs-up: a demonstration (it cannot partner the corrected down).
    assert_eq!(rate(GLOBEX_KEY, &b, 0, "up").await.status, 201);
    let stats = get("/v1/feedback/stats?adapter=base", GLOBEX_KEY).await;
    assert_eq!(stats.status, 200, "{}", stats.text);
    let s = stats.json();
    assert_eq!(
        (
            s["up"].as_u64(),
            s["down"].as_u64(),
            s["corrections"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(
        (
            s["pairs"].as_u64(),
            s["demonstrations"].as_u64(),
            s["unpaired_negatives"].as_u64(),
            s["untrained"].as_u64()
        ),
        (Some(1), Some(2), Some(0), Some(3)),
        "{s}"
    );
    // acme sees none of globex's feedback.
    let acme_export = get("/v1/feedback/export?adapter=base", ACME_KEY).await;
    assert!(!acme_export.text.contains("Blue, on a clear day."));

    let export = get("/v1/feedback/export?adapter=base", GLOBEX_KEY).await;
    assert_eq!(export.status, 200, "{}", export.text);
    let rows: Vec<Value> = export
        .text
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl row"))
        .collect();
    assert_eq!(
        rows,
        vec![json!({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": "Blue, on a clear day."}],
            "rejected": [{"role": "assistant", "content": text_a}],
        })]
    );
    get("/v1/feedback/stats", GLOBEX_KEY).await.assert_error(
        400,
        "invalid_request_error",
        Some("adapter"),
    );

    // Delete: admin only, with X-Tenant.
    let del = |key: &'static str, tenant: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .delete(format!("{base}/v1/feedback?adapter=base"))
            .bearer_auth(key);
        if let Some(t) = tenant {
            req = req.header("X-Tenant", t);
        }
        send(req)
    };
    del(GLOBEX_KEY, None)
        .await
        .assert_error(403, "permission_error", None);
    del(ADMIN_KEY, None)
        .await
        .assert_error(400, "invalid_request_error", Some("X-Tenant"));
    let d = del(ADMIN_KEY, Some("globex")).await;
    assert_eq!(d.status, 200, "{}", d.text);
    assert_eq!(d.json()["feedback"], 2);
    assert!(d.json()["completions"].as_u64().is_some_and(|n| n >= 2));
    let s = get("/v1/feedback/stats?adapter=base", GLOBEX_KEY)
        .await
        .json();
    assert_eq!(
        (s["up"].as_u64(), s["pairs"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    rate(GLOBEX_KEY, &a, 0, "up")
        .await
        .assert_error(404, "not_found_error", None);
}

#[test]
fn cli_imports_trl_and_sft_rows_and_exports_trl_pairs() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("fresh/dirs/feedback.sqlite");
    let input = dir.path().join("seed.jsonl");
    std::fs::write(
        &input,
        concat!(
            r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}"#,
            "\n",
            r#"{"prompt": "2+2=", "chosen": "4", "rejected": "5"}"#,
            "\n\n",
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hey"}]}"#,
            "\n",
        ),
    )
    .expect("write seed");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(prefix_rft_e2e::binary())
            .arg("feedback")
            .args(args)
            .arg("--db")
            .arg(&db)
            .args(["--tenant", "acme", "--adapter", "support"])
            .output()
            .expect("run prefix-rft feedback");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = cli(&["import", "--file", input.to_str().expect("utf-8 path")]);
    assert!(ok, "{err}");
    assert!(err.contains("imported 3 row(s)"), "{err}");
    let (ok, out, err) = cli(&["export"]);
    assert!(ok, "{err}");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect();
    assert_eq!(
        rows,
        vec![
            json!({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}),
            json!({"prompt": "2+2=", "chosen": "4", "rejected": "5"}),
        ]
    );
    // A row of no known shape is refused with its line number, and nothing is imported.
    std::fs::write(
        &input,
        "{\"prompt\": \"x\", \"completion\": \"y\"}\n{\"bad\": 1}\n",
    )
    .expect("write");
    let (ok, _, err) = cli(&["import", "--file", input.to_str().expect("utf-8 path")]);
    assert!(!ok);
    assert!(err.contains("line 2"), "{err}");
    let demos: i64 = open_db(&db)
        .query_row("SELECT count(*) FROM completions", [], |r| r.get(0))
        .expect("count");
    assert_eq!(demos, 3);
}

/// The server config for the durability trials: many choices per completion (so there are
/// many distinct feedback targets) and a database of the test's own.
fn durability_config(db: &Path) -> String {
    let text = prefix_rft_e2e::repo_config();
    let text = text
        .replace("max_n = 8", "max_n = 64")
        .replace("max_batch_size = 32", "max_batch_size = 64")
        .replace(
            "path = \"feedback.sqlite\"",
            &format!("path = {:?}", db.display().to_string()),
        );
    assert!(text.contains("max_n = 64") && text.contains(&db.display().to_string()));
    text
}

/// One acknowledged write: which target, the id and the rating the server confirmed.
#[derive(Debug, Clone)]
struct Acked {
    target: (String, u32),
    id: String,
    rating: &'static str,
}

/// Small deterministic generator for kill times and ratings (no extra crate for a test).
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Kill trials in the suite; `FEEDBACK_KILL_TRIALS` raises it.
const TRIALS: usize = 20;
/// Concurrent writers per trial.
const WRITERS: usize = 8;

#[test]
fn acknowledged_feedback_survives_kill_9() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tmp");
    let db_path = dir.path().join("durability/feedback.sqlite");
    let config = durability_config(&db_path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Targets: 4 completions x 64 choices, recorded (and so durable) before each response.
    let targets: Vec<(String, u32)> = {
        let server = Server::start(Some(&config));
        let ids: Vec<String> = rt.block_on(async {
            let mut ids = Vec::new();
            for i in 0..4 {
                ids.push(completion_id(
                    &chat(&server.base, ACME_KEY, &format!("Count to {i}."), 64, 1).await,
                ));
            }
            ids
        });
        ids.iter()
            .flat_map(|id| (0..64).map(move |c| (id.clone(), c)))
            .collect()
    };
    let mut seed = ((std::process::id() as u64) << 20) | 0x9e37_79b9;
    let mut acked_all: Vec<Acked> = Vec::new();
    let mut total_acked = 0usize;
    let trials = kill_trials("FEEDBACK_KILL_TRIALS", TRIALS);
    for trial in 0..trials {
        let mut server = Server::start_listening(Some(&config));
        let kill_after = Duration::from_millis(20 + xorshift(&mut seed) % 400);
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
        let in_flight = Arc::new(Mutex::new(
            HashMap::<usize, ((String, u32), &'static str)>::new(),
        ));
        let unexpected = Arc::new(Mutex::new(Vec::<String>::new()));
        let trial_seed = xorshift(&mut seed);
        rt.block_on(async {
            let client = reqwest::Client::new();
            let mut tasks = Vec::new();
            for w in 0..WRITERS {
                let (client, base, targets) = (client.clone(), server.base.clone(), targets.clone());
                let (stop, acked, in_flight, unexpected) =
                    (stop.clone(), acked.clone(), in_flight.clone(), unexpected.clone());
                tasks.push(tokio::spawn(async move {
                    let mut rng = trial_seed ^ ((w as u64 + 1) * 0x2545_f491);
                    // Each writer owns targets w, w+WRITERS, ...: one write in flight per target.
                    let mine: Vec<&(String, u32)> = targets.iter().skip(w).step_by(WRITERS).collect();
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let target = mine[i % mine.len()].clone();
                        i += 1;
                        let rating = if xorshift(&mut rng).is_multiple_of(2) { "up" } else { "down" };
                        if let Ok(mut f) = in_flight.lock() {
                            f.insert(w, (target.clone(), rating));
                        }
                        let body = json!({"completion_id": target.0, "choice_index": target.1, "rating": rating});
                        let r = client
                            .post(format!("{base}/v1/feedback"))
                            .bearer_auth(ACME_KEY)
                            .json(&body)
                            .send()
                            .await;
                        let Ok(r) = r else { break };
                        let status = r.status().as_u16();
                        let Ok(text) = r.text().await else { break };
                        if status != 200 && status != 201 {
                            unexpected.lock().expect("lock").push(format!("{status}: {text}"));
                            break;
                        }
                        let v: Value = serde_json::from_str(&text).expect("json reply");
                        let id = v["id"].as_str().expect("id").to_string();
                        acked.lock().expect("lock").push(Acked { target, id, rating });
                        if let Ok(mut f) = in_flight.lock() {
                            f.remove(&w);
                        }
                    }
                }));
            }
            tokio::time::sleep(kill_after).await;
            server.kill9();
            stop.store(true, Ordering::SeqCst);
            for t in tasks {
                let _ = t.await;
            }
        });
        let unexpected = unexpected.lock().expect("lock").clone();
        assert!(
            unexpected.is_empty(),
            "trial {trial}: non-2xx replies: {unexpected:?}"
        );
        let acked = acked.lock().expect("lock").clone();
        let in_flight = in_flight.lock().expect("lock").clone();
        total_acked += acked.len();
        check_after_crash(&db_path, &acked, &in_flight, trial);
        acked_all.extend(acked);
    }
    // Restart once more on the same file: the server sees every acknowledged id.
    let server = Server::start_listening(Some(&config));
    let last = acked_all.last().cloned();
    if let Some(last) = last {
        let r = rt.block_on(post_feedback(
            &server.base,
            ACME_KEY,
            None,
            json!({"completion_id": last.target.0, "choice_index": last.target.1, "rating": "up"})
                .to_string(),
        ));
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["id"], last.id.as_str());
    }
    drop(server);
    assert!(
        total_acked > 0,
        "no write was acknowledged in {trials} trials"
    );
    eprintln!(
        "durability: {trials} kill -9 trials, {total_acked} acknowledged writes checked in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// After `kill -9`: the file is intact, every acknowledged id is stored exactly once, and each
/// target holds its last acknowledged rating (or the one still in flight at the kill).
fn check_after_crash(
    db: &Path,
    acked: &[Acked],
    in_flight: &HashMap<usize, ((String, u32), &'static str)>,
    trial: usize,
) {
    let c = open_db(db);
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok", "trial {trial}");
    let mut last: HashMap<(String, u32), &Acked> = HashMap::new();
    for a in acked {
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM feedback WHERE id = ?1",
                [&a.id],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(
            n, 1,
            "trial {trial}: acknowledged {} stored {n} times",
            a.id
        );
        last.insert(a.target.clone(), a);
    }
    for (target, a) in last {
        let (id, rating): (String, String) = c
            .query_row(
                "SELECT id, rating FROM feedback WHERE completion_id = ?1 AND choice_index = ?2",
                rusqlite::params![target.0, target.1],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("target row");
        assert_eq!(id, a.id, "trial {trial}: one id per target");
        let pending = in_flight
            .values()
            .find(|(t, _)| *t == target)
            .map(|(_, r)| *r);
        assert!(
            rating == a.rating || Some(rating.as_str()) == pending,
            "trial {trial}: {target:?} holds {rating}, acknowledged {} (in flight: {pending:?})",
            a.rating
        );
    }
}
