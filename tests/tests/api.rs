//! The HTTP contract of API.md against the real binary and model: the official Rust client
//! (`async-openai`) for the happy paths, raw HTTP for every error row and for fields the
//! client does not expose.

use async_openai::config::OpenAIConfig;
use async_openai::types::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CreateChatCompletionRequestArgs, CreateCompletionRequestArgs, Role,
};
use async_openai::Client;
use futures_util::StreamExt;
use prefix_rft_e2e::{shared, ACME_KEY, ADMIN_KEY, GLOBEX_KEY, MODEL};
use serde_json::{json, Value};

fn client() -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(shared().v1())
            .with_api_key(ACME_KEY),
    )
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts an OpenAI error body with this status, type, param and code.
    fn assert_error(&self, status: u16, kind: &str, param: Option<&str>, code: Option<&str>) {
        assert_eq!(self.status, status, "{}", self.text);
        let e = &self.json()["error"];
        assert_eq!(e["type"], kind, "{}", self.text);
        assert_eq!(e["param"].as_str(), param, "{}", self.text);
        assert_eq!(e["code"].as_str(), code, "{}", self.text);
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
    }
}

async fn post_raw(path: &str, key: Option<&str>, body: impl Into<reqwest::Body>) -> Reply {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", shared().base))
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    Reply {
        status,
        headers,
        text,
    }
}

async fn post(path: &str, body: Value) -> Reply {
    post_raw(path, Some(ACME_KEY), body.to_string()).await
}

async fn get(path: &str, key: Option<&str>) -> Reply {
    let mut req = reqwest::Client::new().get(format!("{}{path}", shared().base));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Reply {
        status,
        headers,
        text: r.text().await.expect("body"),
    }
}

fn chat_body(content: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

/// Greedy chat text for `content`.
async fn greedy_chat(content: &str, max_tokens: u32) -> String {
    let r = post("/v1/chat/completions", chat_body(content, max_tokens)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

#[tokio::test]
async fn chat_completion_returns_text_usage_and_base_version() {
    let req = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("What is the capital of France?")
            .build()
            .expect("message")
            .into()])
        .max_tokens(8u32)
        .temperature(0.0)
        .build()
        .expect("request");
    let resp = client().chat().create(req).await.expect("chat");
    assert!(resp.id.starts_with("chatcmpl-"), "{}", resp.id);
    assert_eq!(resp.model, MODEL);
    assert_eq!(resp.system_fingerprint.as_deref(), Some("base"));
    assert_eq!(resp.choices.len(), 1);
    let text = resp.choices[0].message.content.clone().unwrap_or_default();
    assert!(!text.is_empty());
    let usage = resp.usage.expect("usage");
    assert!(usage.prompt_tokens > 5, "{usage:?}");
    assert!(
        usage.completion_tokens >= 1 && usage.completion_tokens <= 8,
        "{usage:?}"
    );
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    let raw = post(
        "/v1/chat/completions",
        chat_body("What is the capital of France?", 8),
    )
    .await;
    assert_eq!(raw.headers["x-adapter-version"], "base");
    assert_eq!(
        raw.json()["choices"][0]["message"]["content"],
        text,
        "greedy output is deterministic"
    );
}

#[tokio::test]
async fn chat_stream_sends_role_first_then_the_same_text_and_usage_last() {
    let prompt = "Name three colors.";
    let expected = greedy_chat(prompt, 10).await;
    let req = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(prompt)
            .build()
            .expect("message")
            .into()])
        .max_tokens(10u32)
        .temperature(0.0)
        .stream(true)
        .stream_options(ChatCompletionStreamOptions {
            include_usage: true,
        })
        .build()
        .expect("request");
    let mut stream = client().chat().create_stream(req).await.expect("stream");
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.expect("chunk"));
    }
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    let text: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.content.clone())
        .collect();
    assert_eq!(text, expected);
    let last = chunks.last().expect("last");
    assert!(last.choices.is_empty(), "usage chunk has no choices");
    let usage = last.usage.clone().expect("usage in the last chunk");
    assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 10);
    let finishes: Vec<_> = chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.finish_reason)
        .collect();
    assert_eq!(finishes.len(), 1, "one finish_reason per choice");
}

#[tokio::test]
async fn completion_echo_with_max_tokens_zero_scores_the_prompt() {
    let prompt = "The capital of France is Paris.";
    let r = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    let choice = &v["choices"][0];
    assert_eq!(choice["text"], prompt);
    let lp = &choice["logprobs"];
    let tokens = lp["tokens"].as_array().expect("tokens");
    let n_prompt = v["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    assert_eq!(tokens.len(), n_prompt);
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(
        tokens
            .iter()
            .map(|t| t.as_str().unwrap_or(""))
            .collect::<String>(),
        prompt
    );
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    for i in 1..n_prompt {
        let x = lp["token_logprobs"][i].as_f64().expect("logprob");
        assert!(x.is_finite() && x <= 0.0, "{x}");
        assert_eq!(lp["top_logprobs"][i].as_object().expect("top").len(), 1);
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
}

/// Greedy `/v1/completions` of one prompt: the text and the prompt's token count.
async fn greedy_completion(prompt: &str, max_tokens: u32) -> (String, u64) {
    let r = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let text = v["choices"][0]["text"].as_str().expect("text").to_string();
    (text, v["usage"]["prompt_tokens"].as_u64().expect("usage"))
}

#[tokio::test]
async fn several_prompts_answer_prompt_by_prompt_as_each_alone() {
    let prompts = ["The capital of France is", "1, 2, 3, 4,", "Roses are red,"];
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(greedy_completion(p, 6).await);
    }
    let r = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 6, "3 prompts × n = 2");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["text"],
            solo[i / 2].0,
            "choice {i} answers prompt {}",
            i / 2
        );
    }
    let prompt_tokens: u64 = solo.iter().map(|s| s.1).sum();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);

    // Streamed: the chunks of each index add up to the same texts, one finish per choice.
    let mut body =
        json!({"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0});
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post("/v1/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut texts = vec![String::new(); 6];
    let mut finishes = vec![0; 6];
    let mut usage = None;
    for data in r.text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("chunk");
        for c in chunk["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            texts[i].push_str(c["text"].as_str().unwrap_or(""));
            finishes[i] += usize::from(!c["finish_reason"].is_null());
        }
        if chunk["usage"].is_object() {
            usage = Some(chunk["usage"]["prompt_tokens"].clone());
        }
    }
    let expected: Vec<String> = (0..6).map(|i| solo[i / 2].0.clone()).collect();
    assert_eq!(texts, expected);
    assert_eq!(finishes, vec![1; 6]);
    assert_eq!(usage, Some(json!(prompt_tokens)));
}

#[tokio::test]
async fn several_token_prompts_are_scored_each_with_echo() {
    let r = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": [[504, 3575, 282], [1689, 28, 2476]], "max_tokens": 0,
               "echo": true, "logprobs": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    for c in choices {
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().expect("tokens").len(), 3, "{c}");
        assert!(lp["token_logprobs"][0].is_null());
        assert!(lp["token_logprobs"][2].as_f64().is_some_and(|x| x <= 0.0));
        let joined: String = lp["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(c["text"].as_str(), Some(joined.as_str()));
    }
    assert_ne!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(v["usage"]["prompt_tokens"], 6);
}

#[tokio::test]
async fn bad_prompt_lists_are_400_naming_the_prompt() {
    let body =
        |prompt: Value, n: u32| json!({"model": MODEL, "prompt": prompt, "n": n, "max_tokens": 1});
    post("/v1/completions", body(json!([]), 1))
        .await
        .assert_error(400, "invalid_request_error", Some("prompt"), None);
    let seventeen: Vec<String> = (0..17).map(|i| format!("prompt {i}")).collect();
    post("/v1/completions", body(json!(seventeen), 1))
        .await
        .assert_error(400, "invalid_request_error", Some("prompt"), None);
    post("/v1/completions", body(json!([[1, 2], [3, 99999999]]), 1))
        .await
        .assert_error(400, "invalid_request_error", Some("prompt[1][1]"), None);
    post("/v1/completions", body(json!(["fine", ""]), 1))
        .await
        .assert_error(400, "invalid_request_error", Some("prompt[1]"), None);
    // 16 prompts × n = 8 is 128 sequences, over max_batch_size (32).
    let sixteen: Vec<String> = (0..16).map(|i| format!("prompt {i}")).collect();
    post("/v1/completions", body(json!(sixteen), 8))
        .await
        .assert_error(400, "invalid_request_error", Some("n"), None);
}

#[tokio::test]
async fn completion_with_the_rust_client_and_logprobs() {
    let req = CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt("Once upon a time")
        .max_tokens(6u32)
        .temperature(0.0)
        .logprobs(2u8)
        .build()
        .expect("request");
    let resp = client()
        .completions()
        .create(req)
        .await
        .expect("completion");
    assert_eq!(resp.choices.len(), 1);
    let lp = resp.choices[0].logprobs.clone().expect("logprobs");
    assert_eq!(
        lp.tokens.len(),
        resp.usage.expect("usage").completion_tokens as usize
    );
    assert_eq!(lp.tokens.concat(), resp.choices[0].text);
    for (chosen, top) in lp.token_logprobs.iter().zip(&lp.top_logprobs) {
        let top = top.as_object().expect("top");
        let best = top
            .values()
            .filter_map(Value::as_f64)
            .fold(f64::NEG_INFINITY, f64::max) as f32;
        assert_eq!(top.len(), 2);
        assert!(
            (chosen.expect("logprob") - best).abs() < 1e-5,
            "greedy picks the most likely token"
        );
    }
}

#[tokio::test]
async fn chat_logprobs_report_top_alternatives() {
    let mut body = chat_body("Say hello.", 4);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let r = post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().expect("usage")
    );
    for t in content {
        let top = t["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        assert_eq!(
            t["logprob"], top[0]["logprob"],
            "greedy token is the top one"
        );
        assert!(t["bytes"].is_array());
    }
}

#[tokio::test]
async fn n_two_returns_two_indexed_choices() {
    let r = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 6, "n": 2, "seed": 11}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    let tokens = v["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((2..=12).contains(&tokens), "{tokens}");
}

#[tokio::test]
async fn stop_string_ends_the_text_before_it() {
    let prompt = "Count from one to ten in words.";
    let full = greedy_chat(prompt, 16).await;
    // Stop at the third word boundary of the greedy answer.
    let cut = full
        .char_indices()
        .filter(|&(_, c)| c == ' ')
        .nth(2)
        .map(|(i, _)| i)
        .unwrap_or(full.len() / 2);
    let stop: String = full[cut..].chars().take(3).collect();
    assert!(!stop.is_empty(), "greedy answer too short: {full:?}");
    let expected = &full[..full.find(&stop).expect("stop occurs")];
    let mut body = chat_body(prompt, 16);
    body["stop"] = json!([stop, "never-occurs-xyz"]);
    let r = post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], expected);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn seed_reproduces_sampled_output() {
    let body = json!({"model": MODEL, "prompt": "My favourite animal is", "max_tokens": 8, "temperature": 1.0, "seed": 1234});
    let a = post("/v1/completions", body.clone()).await.json();
    let b = post("/v1/completions", body).await.json();
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_ne!(a["id"], b["id"]);
}

#[tokio::test]
async fn eight_concurrent_greedy_requests_match_solo_runs() {
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Write one sentence about the number {i}."))
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(greedy_chat(p, 12).await);
    }
    let batched = futures_util::future::join_all(prompts.iter().map(|p| greedy_chat(p, 12))).await;
    assert_eq!(batched, solo);
}

#[tokio::test]
async fn models_list_has_the_base_model() {
    let list = client().models().list().await.expect("models");
    assert_eq!(list.object, "list");
    assert_eq!(list.data[0].id, MODEL);
    let raw = get("/v1/models", Some(GLOBEX_KEY)).await;
    assert_eq!(raw.status, 200);
    let ids: Vec<Value> = raw.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![json!(MODEL)],
        "no adapters yet, and none of another tenant"
    );
}

#[tokio::test]
async fn tenant_cannot_select_another_tenants_adapter() {
    // globex's adapter names are invisible to acme: exactly the 404 of a model that does not exist.
    for model in ["globex-support", "globex-support@1"] {
        let mut body = chat_body("hi", 1);
        body["model"] = json!(model);
        post("/v1/chat/completions", body).await.assert_error(
            404,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
        );
    }
}

#[tokio::test]
async fn missing_key_is_401() {
    post_raw("/v1/chat/completions", None, chat_body("hi", 1).to_string())
        .await
        .assert_error(401, "authentication_error", None, Some("invalid_api_key"));
    get("/v1/models", None).await.assert_error(
        401,
        "authentication_error",
        None,
        Some("invalid_api_key"),
    );
}

#[tokio::test]
async fn wrong_key_is_401() {
    post_raw(
        "/v1/chat/completions",
        Some("sk-wrong"),
        chat_body("hi", 1).to_string(),
    )
    .await
    .assert_error(401, "authentication_error", None, Some("invalid_api_key"));
}

#[tokio::test]
async fn admin_key_acts_on_a_tenant_with_x_tenant() {
    let r = reqwest::Client::new()
        .get(format!("{}/v1/models", shared().base))
        .bearer_auth(ADMIN_KEY)
        .header("X-Tenant", "globex")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    let mut body = chat_body("hi", 1);
    body["model"] = json!("gpt-4");
    post("/v1/chat/completions", body).await.assert_error(
        404,
        "invalid_request_error",
        Some("model"),
        Some("model_not_found"),
    );
}

#[tokio::test]
async fn prompt_over_the_context_is_400_before_any_byte() {
    let long = "hello ".repeat(9000);
    for stream in [false, true] {
        let mut body = chat_body(&long, 4);
        body["stream"] = json!(stream);
        let r = post("/v1/chat/completions", body).await;
        assert!(
            r.headers["content-type"]
                .to_str()
                .unwrap_or("")
                .starts_with("application/json"),
            "stream={stream}"
        );
        r.assert_error(
            400,
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
        );
        let c = post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": long, "max_tokens": 4, "stream": stream}),
        )
        .await;
        c.assert_error(
            400,
            "invalid_request_error",
            Some("prompt"),
            Some("context_length_exceeded"),
        );
    }
}

#[tokio::test]
async fn malformed_json_is_400() {
    post_raw("/v1/chat/completions", Some(ACME_KEY), "{\"model\": ")
        .await
        .assert_error(400, "invalid_request_error", None, None);
}

#[tokio::test]
async fn empty_messages_is_400() {
    post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": []}),
    )
    .await
    .assert_error(400, "invalid_request_error", Some("messages"), None);
}

#[tokio::test]
async fn wrong_field_types_are_400_naming_the_field() {
    let mut body = chat_body("hi", 1);
    body["temperature"] = json!("warm");
    post("/v1/chat/completions", body).await.assert_error(
        400,
        "invalid_request_error",
        Some("temperature"),
        None,
    );
    post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
    )
    .await
    .assert_error(
        400,
        "invalid_request_error",
        Some("messages[0].content"),
        None,
    );
    post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x", "max_tokens": "many"}),
    )
    .await
    .assert_error(400, "invalid_request_error", Some("max_tokens"), None);
}

#[tokio::test]
async fn negative_max_tokens_is_400() {
    post(
        "/v1/chat/completions",
        chat_body_with("max_tokens", json!(-1)),
    )
    .await
    .assert_error(400, "invalid_request_error", Some("max_tokens"), None);
    post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "x", "max_tokens": -5}),
    )
    .await
    .assert_error(400, "invalid_request_error", Some("max_tokens"), None);
}

fn chat_body_with(field: &str, value: Value) -> Value {
    let mut body = chat_body("hi", 1);
    body[field] = value;
    body
}

#[tokio::test]
async fn n_zero_is_400() {
    post("/v1/chat/completions", chat_body_with("n", json!(0)))
        .await
        .assert_error(400, "invalid_request_error", Some("n"), None);
}

#[tokio::test]
async fn temperature_out_of_range_is_400() {
    post(
        "/v1/chat/completions",
        chat_body_with("temperature", json!(2.5)),
    )
    .await
    .assert_error(400, "invalid_request_error", Some("temperature"), None);
    post("/v1/chat/completions", chat_body_with("top_p", json!(0)))
        .await
        .assert_error(400, "invalid_request_error", Some("top_p"), None);
}

#[tokio::test]
async fn health_ready_and_metrics_need_no_key() {
    assert_eq!(get("/health", None).await.status, 200);
    let ready = get("/ready", None).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    let _ = greedy_chat("Hi", 2).await;
    let m = get("/metrics", None).await;
    assert_eq!(m.status, 200);
    for name in [
        "prefix_rft_requests_total{adapter=\"base\",route=\"/v1/chat/completions\",status=\"200\"}",
        "prefix_rft_time_to_first_token_seconds_bucket",
        "prefix_rft_inter_token_latency_seconds_bucket",
        "prefix_rft_e2e_request_latency_seconds_count",
        "prefix_rft_requests_running",
        "prefix_rft_requests_waiting",
        "prefix_rft_batch_size_bucket",
        "prefix_rft_prompt_tokens_total",
        "prefix_rft_generation_tokens_total",
        "prefix_rft_feedback_total{rating=\"down\"}",
        "prefix_rft_training_last_loss",
    ] {
        assert!(m.text.contains(name), "missing {name}");
    }
    // promtool (Debian package `prometheus`) is the reference checker; run it where installed.
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(m.text.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => eprintln!("promtool not installed: only the metric names were checked"),
    }
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let doc = get("/openapi.json", None).await.json();
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
}

/// `[model] activations = "f32"` reaches the engine: the quantized model then scores fixture
/// texts as `transformers` does on the dequantized GGUF (engine/tests/fixtures/logprobs_hf.json),
/// where the default int8 activations (llama.cpp's arithmetic) are some 0.05 nats off.
#[tokio::test]
async fn f32_activations_score_as_the_dequantized_reference() {
    let config =
        prefix_rft_e2e::repo_config().replace("activations = \"int8\"", "activations = \"f32\"");
    assert!(
        config.contains("activations = \"f32\""),
        "config.toml changed"
    );
    let server = prefix_rft_e2e::Server::start(Some(&config));
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            prefix_rft_e2e::repo_root().join("engine/tests/fixtures/logprobs_hf.json"),
        )
        .expect("fixture"),
    )
    .expect("fixture json");
    let http = reqwest::Client::new();
    let mut mean_delta = Vec::new();
    for base in [server.v1(), shared().v1()] {
        let (mut sum, mut n) = (0.0, 0usize);
        for text in fixture["texts"].as_array().expect("texts").iter().take(6) {
            let r = http
                .post(format!("{base}/completions"))
                .bearer_auth(ACME_KEY)
                .json(
                    &json!({"model": MODEL, "prompt": text["tokens"], "max_tokens": 0,
                              "echo": true, "logprobs": 0}),
                )
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.expect("json");
            let got = v["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .expect("logprobs")
                .clone();
            let want = text["logprobs"].as_array().expect("fixture logprobs");
            assert_eq!(
                got.len(),
                want.len() + 1,
                "one log-prob per token after the first"
            );
            for (g, w) in got[1..].iter().zip(want) {
                sum += (g.as_f64().expect("logprob") - w.as_f64().expect("fixture")).abs();
                n += 1;
            }
        }
        mean_delta.push(sum / n as f64);
    }
    let (f32, int8) = (mean_delta[0], mean_delta[1]);
    assert!(f32 <= 0.01, "f32 activations: mean |Δ log-prob| {f32}");
    assert!(
        int8 > 2.0 * f32,
        "int8 {int8} vs f32 {f32}: the setting made no difference"
    );
}
