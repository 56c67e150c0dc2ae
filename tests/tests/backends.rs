//! Our engine against mistralrs on the same GGUF, through the real binary: greedy answers to
//! the 10 chat prompts of the llama.cpp fixture (48 tokens), each backend in its own server,
//! compared with each other and with llama.cpp's, and the first token's top-5 log-probs. Runs when the
//! suite runs against mistralrs (`PREFIX_RFT_TEST_BACKEND=mistralrs`, a binary built with
//! `--features mistralrs`); otherwise it says it skipped.
//!
//! With `PARITY_OUT=<file>` the agreement (and each backend's agreement with llama.cpp) is
//! written there as JSON; `scripts/bench-mistralrs` keeps it in bench/results.

use prefix_rft_e2e::{on_mistralrs, repo_root, shared, Server, ACME_KEY, MODEL};
use serde_json::{json, Value};

/// The fixture's cases: chat prompts as token ids, and llama.cpp's greedy answer.
fn cases() -> Vec<Value> {
    let path = repo_root().join("engine/tests/fixtures/greedy_llamacpp.json");
    let text = std::fs::read_to_string(&path).expect("greedy fixture");
    let v: Value = serde_json::from_str(&text).expect("fixture JSON");
    v["cases"].as_array().expect("cases").clone()
}

/// A greedy answer: its text, and its first token with the 5 most likely first tokens.
struct Answer {
    text: String,
    first: String,
    top5: serde_json::Map<String, Value>,
}

/// The greedy answer to `prompt` (token ids), `max_tokens` tokens at most, from the server
/// at `v1`.
async fn greedy(v1: &str, prompt: &Value, max_tokens: usize) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{v1}/completions"))
        .bearer_auth(ACME_KEY)
        .json(&json!({
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 5,
        }))
        .send()
        .await
        .expect("request");
    let status = r.status();
    let body: Value = r.json().await.expect("JSON");
    assert!(status.is_success(), "{status}: {body}");
    let choice = &body["choices"][0];
    let lp = &choice["logprobs"];
    Answer {
        text: choice["text"].as_str().expect("text").to_string(),
        first: lp["tokens"][0].as_str().expect("first token").to_string(),
        top5: lp["top_logprobs"][0]
            .as_object()
            .expect("top_logprobs")
            .clone(),
    }
}

/// Characters the two texts share from the start.
fn common(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

#[tokio::test]
async fn greedy_answers_agree_with_our_engine_on_the_fixture_prompts() {
    if !on_mistralrs() {
        eprintln!("skipped: runs with PREFIX_RFT_TEST_BACKEND=mistralrs");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Server::start_backend_in("engine", dir.path());
    let mistralrs = shared();
    let cases = cases();
    assert_eq!(cases.len(), 10);
    let mut rows = Vec::new();
    let (mut same, mut first_same) = (0, 0);
    let (mut ours_vs_llama, mut mistralrs_vs_llama) = (0, 0);
    let mut deltas = Vec::new();
    for case in &cases {
        let prompt = &case["prompt_tokens"];
        let llama = case["output_text"].as_str().expect("output_text");
        let ea = greedy(&engine.v1(), prompt, 48).await;
        let ma = greedy(&mistralrs.v1(), prompt, 48).await;
        // Each backend's first token is among the other's five most likely: a mixed-up
        // sequence or a broken forward would not be.
        for (x, y, who) in [(&ea, &ma, "mistralrs"), (&ma, &ea, "engine")] {
            assert!(
                y.top5.contains_key(&x.first),
                "{:?}: {who}'s top 5 {:?} lack {:?}",
                case["messages"],
                y.top5,
                x.first
            );
        }
        for (t, lp) in &ma.top5 {
            if let (Some(a), Some(b)) = (lp.as_f64(), ea.top5.get(t).and_then(Value::as_f64)) {
                deltas.push((a - b).abs());
            }
        }
        first_same += usize::from(ea.first == ma.first);
        let (a, b) = (ea.text, ma.text);
        same += usize::from(a == b);
        ours_vs_llama += usize::from(a == llama);
        mistralrs_vs_llama += usize::from(b == llama);
        rows.push(json!({
            "prompt": case["messages"],
            "engine": a,
            "mistralrs": b,
            "common_prefix_chars": common(&a, &b),
            "identical": a == b,
            "engine_equals_llamacpp": a == llama,
            "mistralrs_equals_llamacpp": b == llama,
        }));
    }
    let report = json!({
        "prompts": cases.len(),
        "max_tokens": 48,
        "identical": same,
        "first_token_identical": first_same,
        "first_token_top5_mean_abs_logprob_delta": deltas.iter().sum::<f64>() / deltas.len().max(1) as f64,
        "engine_equals_llamacpp": ours_vs_llama,
        "mistralrs_equals_llamacpp": mistralrs_vs_llama,
        "cases": rows,
    });
    eprintln!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
    if let Some(out) = std::env::var_os("PARITY_OUT") {
        std::fs::write(out, serde_json::to_string_pretty(&report).expect("JSON")).expect("write");
    }
    // Measured: 4 of 10 identical, 9 of 10 first tokens the same, mean |Δ| 0.10 over the
    // shared top-5 first tokens (our engine is within about 0.05 of llama.cpp). Both backends
    // equal llama.cpp on 4 of 10. Most answers part late, at near ties.
    assert!(first_same >= 8, "{report}");
}
