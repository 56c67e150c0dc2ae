//! Adapters end to end, on the real binary, the real SmolLM2 model and a real store on disk:
//! the routes of API.md, mixed batches without cross-request bleed, hot swap under streaming
//! load, and crashes during publish.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prefix_rft_adapters::peft::{self, Limits, CONFIG_FILE, WEIGHTS_FILE};
use prefix_rft_adapters::testing::{random_lora, random_prefix};
use prefix_rft_adapters::{AdapterStore, PeftFiles};
use prefix_rft_e2e::{
    binary, kill_trials, on_mistralrs, repo_root, shared, ACME_KEY, ADMIN_KEY, GLOBEX_KEY, MODEL,
};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::{AdapterWeights, ModelConfig, Proj};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn model_config() -> ModelConfig {
    let path = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    ModelConfig::from_gguf(&GgufFile::open(&path).expect("model")).expect("config")
}

/// Random LoRA pairs on `targets` of every layer, large enough to change greedy output.
fn lora_files(seed: u64, rank: usize, targets: &[Proj]) -> PeftFiles {
    let cfg = model_config();
    let pairs = random_lora(&cfg, seed, rank, targets, 0.3, 2.0);
    let w = AdapterWeights::new(&cfg, pairs, None).expect("lora");
    peft::to_files(&w, &cfg, MODEL).expect("files")
}

/// A random prefix of `n` virtual tokens.
fn prefix_files(seed: u64, n: usize) -> PeftFiles {
    let cfg = model_config();
    let p = random_prefix(&cfg, seed, n, 4.0, 3.0);
    let w = AdapterWeights::new(&cfg, BTreeMap::new(), Some(p)).expect("prefix");
    peft::to_files(&w, &cfg, MODEL).expect("files")
}

fn write_dir(dir: &Path, files: &PeftFiles) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(CONFIG_FILE), &files.config).expect("config");
    std::fs::write(dir.join(WEIGHTS_FILE), &files.weights).expect("weights");
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.expect("request");
    Reply {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.bytes().await.expect("body").to_vec(),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(path: &str, key: &str, body: Value) -> Reply {
    send(
        http()
            .post(format!("{}{path}", shared().v1()))
            .bearer_auth(key)
            .json(&body),
    )
    .await
}

async fn get(path: &str, key: &str) -> Reply {
    send(
        http()
            .get(format!("{}{path}", shared().v1()))
            .bearer_auth(key),
    )
    .await
}

async fn upload(name: &str, key: &str, files: &PeftFiles, extra: &[(&str, &str)]) -> Reply {
    let mut form = reqwest::multipart::Form::new()
        .part(
            CONFIG_FILE,
            reqwest::multipart::Part::bytes(files.config.clone()).file_name(CONFIG_FILE),
        )
        .part(
            WEIGHTS_FILE,
            reqwest::multipart::Part::bytes(files.weights.clone()).file_name(WEIGHTS_FILE),
        );
    for (k, v) in extra {
        form = form.text(k.to_string(), v.to_string());
    }
    send(
        http()
            .post(format!("{}/adapters/{name}/versions", shared().v1()))
            .bearer_auth(key)
            .multipart(form),
    )
    .await
}

/// Creates `name` (identity v1) and uploads `files` as its current v2.
async fn adapter_with(name: &str, kind: &str, files: &PeftFiles) {
    let r = post(
        "/adapters",
        ACME_KEY,
        json!({"name": name, "kind": kind, "rank": 4}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = upload(name, ACME_KEY, files, &[]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], 2);
}

/// Greedy chat completion: (content, x-adapter-version).
async fn chat(model: &str, prompt: &str, max_tokens: usize) -> (String, String) {
    let r = post(
        "/chat/completions",
        ACME_KEY,
        json!({"model": model, "messages": [{"role": "user", "content": prompt}],
               "max_tokens": max_tokens, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{model}: {}", r.text());
    let content = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    (content, r.header("x-adapter-version"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_upload_activate_download_delete() {
    let name = "life";
    let r = post(
        "/adapters",
        ACME_KEY,
        json!({"name": name, "kind": "lora", "rank": 8}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    assert_eq!(
        (created["current"].clone(), created["kind"].clone()),
        (json!(1), json!("lora"))
    );
    // Identity v1 (LoRA B = 0) answers exactly as the base model.
    let prompt = "Name three colours.";
    let (base, label) = chat(MODEL, prompt, 16).await;
    assert_eq!(label, "base");
    assert_eq!(
        chat(name, prompt, 16).await,
        (base.clone(), "life@1".into())
    );

    // v2 from PEFT files changes the answer and becomes current.
    let v2 = lora_files(11, 8, &Proj::ALL);
    let r = upload(name, ACME_KEY, &v2, &[("expected_current", "1")]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (out2, label) = chat(name, prompt, 16).await;
    assert_eq!(label, "life@2");
    assert_ne!(out2, base, "a random LoRA must change greedy output");
    assert_eq!(
        chat("life@1", prompt, 16).await.0,
        base,
        "name@N pins a version"
    );

    // Listing shows both versions with lineage.
    let list = get("/adapters", ACME_KEY).await.json();
    let entry = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|a| a["name"] == name)
        .expect("listed")
        .clone();
    assert_eq!(entry["current"], 2);
    assert_eq!(entry["versions"][1]["parent"], 1);
    assert_eq!(entry["versions"][1]["source"], "upload");
    assert_eq!(entry["versions"][1]["status"], "live");

    // Roll back with compare-and-swap; a stale expectation is 409.
    let r = post(
        &format!("/adapters/{name}/activate"),
        ACME_KEY,
        json!({"version": 1, "expected_current": 2}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["previous"].clone()),
        (200, json!(2)),
        "{}",
        r.text()
    );
    let r = post(
        &format!("/adapters/{name}/activate"),
        ACME_KEY,
        json!({"version": 2, "expected_current": 2}),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        chat(name, prompt, 16).await,
        (base.clone(), "life@1".into())
    );
    let r = post(
        &format!("/adapters/{name}/activate"),
        ACME_KEY,
        json!({"version": 9}),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());

    // Files come back byte for byte.
    let r = get(
        &format!("/adapters/{name}/versions/2/files/{WEIGHTS_FILE}"),
        ACME_KEY,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v2.weights);
    let r = get(
        &format!("/adapters/{name}/versions/2/files/{CONFIG_FILE}"),
        ACME_KEY,
    )
    .await;
    assert_eq!(r.body, v2.config);
    for bad in ["../CURRENT", "manifest.jsonx", "..%2F..%2Fadapter.json"] {
        let r = get(
            &format!("/adapters/{name}/versions/2/files/{bad}"),
            ACME_KEY,
        )
        .await;
        assert_eq!(r.status, 404, "{bad}: {}", r.text());
    }

    // Another tenant sees nothing.
    let r = post(
        "/chat/completions",
        GLOBEX_KEY,
        json!({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_eq!(
        get(&format!("/adapters/{name}"), GLOBEX_KEY).await.status,
        404
    );
    assert_eq!(upload(name, GLOBEX_KEY, &v2, &[]).await.status, 404);
    assert!(!get("/adapters", GLOBEX_KEY)
        .await
        .text()
        .contains("\"life\""));
    let theirs = get("/models", GLOBEX_KEY).await.json();
    assert!(
        !theirs["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == name),
        "{theirs}"
    );
    // Models list the tenant's adapters.
    let models = get("/models", ACME_KEY).await.json();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == name));

    // Resident adapters show in the metrics.
    let metrics = send(http().get(format!("{}/metrics", shared().base)))
        .await
        .text();
    let resident: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("prefix_rft_adapters_resident "))
        .and_then(|v| v.trim().parse().ok())
        .expect("prefix_rft_adapters_resident in /metrics");
    assert!(resident >= 1.0, "{resident}");

    // Delete.
    let r = send(
        http()
            .delete(format!("{}/adapters/{name}", shared().v1()))
            .bearer_auth(ACME_KEY),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        get(&format!("/adapters/{name}"), ACME_KEY).await.status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_and_files_change_nothing() {
    let name = "strict";
    let r = post(
        "/adapters",
        ACME_KEY,
        json!({"name": name, "kind": "lora", "rank": 4, "target_modules": ["q_proj"]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    for (body, param) in [
        (json!({"name": "x", "kind": "lora", "rank": 100000}), "rank"),
        // Found by schemathesis: finite, but the scale overflowed f32 and answered 500.
        (
            json!({"name": "x", "kind": "lora", "alpha": 7.6e267}),
            "alpha",
        ),
        (
            json!({"name": "x", "kind": "lora", "target_modules": ["lm_head"]}),
            "target_modules",
        ),
        (json!({"name": "../x", "kind": "lora"}), "name"),
        (json!({"name": MODEL, "kind": "lora"}), "name"),
        (json!({"name": "x", "kind": "adapter"}), "kind"),
        (
            json!({"name": "x", "kind": "prefix", "num_virtual_tokens": 0}),
            "num_virtual_tokens",
        ),
    ] {
        let r = post("/adapters", ACME_KEY, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let r = post("/adapters", ACME_KEY, json!({"name": name, "kind": "lora"})).await;
    assert_eq!(r.status, 409, "{}", r.text());

    let good = lora_files(3, 4, &[Proj::Q]);
    let mut truncated = good.clone();
    truncated.weights.truncate(truncated.weights.len() / 3);
    let wrong_shape = {
        let mut c: Value = serde_json::from_slice(&good.config).unwrap();
        c["r"] = json!(5);
        PeftFiles {
            config: serde_json::to_vec(&c).unwrap(),
            weights: good.weights.clone(),
        }
    };
    let unknown_module = {
        let mut c: Value = serde_json::from_slice(&good.config).unwrap();
        c["target_modules"] = json!(["q_proj", "embed_tokens"]);
        PeftFiles {
            config: serde_json::to_vec(&c).unwrap(),
            weights: good.weights.clone(),
        }
    };
    let over_rank = lora_files(4, 65, &[Proj::V]);
    let prefix_for_lora = prefix_files(5, 4);
    for (what, files) in [
        ("truncated", &truncated),
        ("wrong shape", &wrong_shape),
        ("unknown module", &unknown_module),
        ("rank over the limit", &over_rank),
        ("a prefix for a LoRA adapter", &prefix_for_lora),
    ] {
        let r = upload(name, ACME_KEY, files, &[]).await;
        assert_eq!(r.status, 422, "{what}: {}", r.text());
        assert!(
            r.json()["error"]["message"].as_str().unwrap().len() > 10,
            "{what}: a reason"
        );
    }
    let r = upload(name, ACME_KEY, &good, &[("expected_current", "7")]).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let only_config = send(
        http()
            .post(format!("{}/adapters/{name}/versions", shared().v1()))
            .bearer_auth(ACME_KEY)
            .multipart(reqwest::multipart::Form::new().part(
                CONFIG_FILE,
                reqwest::multipart::Part::bytes(good.config.clone()).file_name(CONFIG_FILE),
            )),
    )
    .await;
    assert_eq!(only_config.status, 400, "{}", only_config.text());
    let not_multipart = post(&format!("/adapters/{name}/versions"), ACME_KEY, json!({})).await;
    assert_eq!(not_multipart.status, 400, "{}", not_multipart.text());
    let listing = get(&format!("/adapters/{name}"), ACME_KEY).await.json();
    assert_eq!(
        listing["versions"].as_array().unwrap().len(),
        1,
        "nothing was published"
    );
    assert_eq!(
        upload(name, ACME_KEY, &good, &[("expected_current", "1")])
            .await
            .status,
        201
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vllm_load_and_unload_are_admin_only_and_confined() {
    let store = shared().data_dir.join("adapters");
    let inside = store.join("incoming/vllm-a");
    write_dir(&inside, &lora_files(21, 4, &[Proj::Q, Proj::V]));
    let outside = tempfile::tempdir().unwrap();
    write_dir(outside.path(), &lora_files(22, 4, &[Proj::Q]));
    let link = store.join("incoming/escape");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();

    let admin = |body: Value| async move {
        send(
            http()
                .post(format!("{}/load_lora_adapter", shared().v1()))
                .bearer_auth(ADMIN_KEY)
                .header("X-Tenant", "acme")
                .json(&body),
        )
        .await
    };
    let r = post(
        "/load_lora_adapter",
        ACME_KEY,
        json!({"lora_name": "v", "lora_path": "incoming/vllm-a"}),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    for path in [
        "../../etc".to_string(),
        "incoming/../../x".to_string(),
        outside.path().display().to_string(),
        "incoming/escape".to_string(),
        "/etc".to_string(),
        "incoming/missing".to_string(),
    ] {
        let r = admin(json!({"lora_name": "v", "lora_path": path})).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
    }
    let r = admin(json!({"lora_name": "vllm-a", "lora_path": "incoming/vllm-a"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, label) = chat("vllm-a", "Hello", 4).await;
    assert_eq!(label, "vllm-a@1");
    let r = admin(json!({"lora_name": "vllm-a", "lora_path": "incoming/vllm-a"})).await;
    assert_eq!(
        r.status,
        409,
        "loading a taken name without load_inplace: {}",
        r.text()
    );
    let r =
        admin(json!({"lora_name": "vllm-a", "lora_path": "incoming/vllm-a", "load_inplace": true}))
            .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat("vllm-a", "Hello", 4).await.1, "vllm-a@2");
    let unload = |key: &'static str| async move {
        send(
            http()
                .post(format!("{}/unload_lora_adapter", shared().v1()))
                .bearer_auth(key)
                .header("X-Tenant", "acme")
                .json(&json!({"lora_name": "vllm-a"})),
        )
        .await
    };
    assert_eq!(unload(ACME_KEY).await.status, 403);
    assert_eq!(unload(ADMIN_KEY).await.status, 200);
    assert_eq!(unload(ADMIN_KEY).await.status, 404);
    assert!(
        inside.join(WEIGHTS_FILE).is_file(),
        "the source directory is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_batch_equals_each_request_alone() {
    let kinds: Vec<(String, &str, PeftFiles)> = vec![
        (
            "mix-l0".into(),
            "lora",
            lora_files(100, 4, &[Proj::Q, Proj::V]),
        ),
        ("mix-l1".into(), "lora", lora_files(101, 8, &Proj::ALL)),
        ("mix-l2".into(), "lora", lora_files(102, 2, &[Proj::Down])),
        (
            "mix-l3".into(),
            "lora",
            lora_files(103, 16, &[Proj::K, Proj::O, Proj::Up]),
        ),
        ("mix-l4".into(), "lora", lora_files(104, 1, &[Proj::Gate])),
        ("mix-p0".into(), "prefix", prefix_files(105, 4)),
        ("mix-p1".into(), "prefix", prefix_files(106, 16)),
        ("mix-p2".into(), "prefix", prefix_files(107, 1)),
    ];
    for (name, kind, files) in &kinds {
        adapter_with(name, kind, files).await;
    }
    let mut models: Vec<String> = kinds.iter().map(|k| k.0.clone()).collect();
    models.push(MODEL.into());
    let prompts = [
        "Tell me about the sea.",
        "What is 12 times 7?",
        "Write a haiku about rain.",
        "Who are you?",
    ];
    let jobs: Vec<(String, String)> = (0..16)
        .map(|i| {
            (
                models[i % models.len()].clone(),
                prompts[i % prompts.len()].to_string(),
            )
        })
        .collect();
    let mut alone = Vec::new();
    for (m, p) in &jobs {
        alone.push(chat(m, p, 24).await);
    }
    let mut base_answers = HashMap::new();
    for p in prompts {
        base_answers.insert(p, chat(MODEL, p, 24).await.0);
    }
    let changed = jobs
        .iter()
        .zip(&alone)
        .filter(|((m, p), (out, _))| m != MODEL && base_answers[p.as_str()] != *out)
        .count();
    assert!(
        changed >= 10,
        "random adapters changed only {changed} of 14 answers vs the base"
    );
    let together = futures_util::future::join_all(jobs.iter().map(|(m, p)| chat(m, p, 24))).await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} ({}) differs when batched", jobs[i].0);
    }
}

/// Activations in order: `(request sent, response received, version)`. The server switched
/// somewhere inside each window.
type Timeline = Arc<Mutex<Vec<(Instant, Instant, u32)>>>;

/// Versions that may have been current at some moment in `[from, to]`: a version may be
/// current from when its activation was sent until the next activation was answered.
fn versions_during(timeline: &Timeline, from: Instant, to: Instant) -> Vec<u32> {
    let t = timeline.lock().unwrap();
    let mut out = Vec::new();
    for (k, &(sent, _, v)) in t.iter().enumerate() {
        let until = t.get(k + 1).map(|&(_, answered, _)| answered);
        if sent <= to && until.is_none_or(|u| u >= from) {
            out.push(v);
        }
    }
    out
}

/// One streamed greedy chat: (text, x-adapter-version, sent, headers received).
async fn stream_chat(
    model: &str,
    prompt: &str,
) -> Result<(String, String, Instant, Instant), String> {
    let sent = Instant::now();
    let r = http()
        .post(format!("{}/chat/completions", shared().v1()))
        .bearer_auth(ACME_KEY)
        .json(
            &json!({"model": model, "messages": [{"role": "user", "content": prompt}],
                      "max_tokens": 12, "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let got_headers = Instant::now();
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let label = r
        .headers()
        .get("x-adapter-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = r.bytes_stream();
    let mut raw = Vec::new();
    while let Some(chunk) = body.next().await {
        raw.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let mut text = String::new();
    let mut done = false;
    for line in raw.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
        if v.get("error").is_some() {
            return Err(data.to_string());
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
    }
    if !done {
        return Err("stream ended without [DONE]".into());
    }
    Ok((text, label, sent, got_headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_swap_under_streaming_load() {
    let name = "swap";
    let prompt = "Describe a cat in one sentence.";
    adapter_with(name, "lora", &lora_files(200, 8, &Proj::ALL)).await;
    let r = upload(
        name,
        ACME_KEY,
        &lora_files(201, 8, &Proj::ALL),
        &[("activate", "false")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v2 = stream_chat("swap@2", prompt).await.expect("v2 alone").0;
    let v3 = stream_chat("swap@3", prompt).await.expect("v3 alone").0;
    assert_ne!(
        v2, v3,
        "the two versions must answer differently for the check to mean anything"
    );
    let expected = HashMap::from([(2u32, v2), (3u32, v3)]);

    let t0 = Instant::now();
    let timeline: Timeline = Arc::new(Mutex::new(vec![(t0, t0, 2)]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                seen.push(stream_chat("swap", prompt).await);
            }
            seen
        }));
    }
    // 20 activations and 20 rollbacks spread over ~16 s, so every client streams several
    // requests across swaps even on a loaded 2-core machine.
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (to, from) = if i % 2 == 0 { (3, 2) } else { (2, 3) };
        let asked = Instant::now();
        let r = post(
            &format!("/adapters/{name}/activate"),
            ACME_KEY,
            json!({"version": to, "expected_current": from}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        timeline.lock().unwrap().push((asked, Instant::now(), to));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    let mut by_version = HashMap::new();
    for c in clients {
        for result in c.await.expect("client task") {
            let (text, label, sent, headers) = result.expect("zero failed requests");
            let version: u32 = label
                .strip_prefix("swap@")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad x-adapter-version {label:?}"));
            let allowed = versions_during(&timeline, sent, headers);
            assert!(
                allowed.contains(&version),
                "got v{version}, current during admission: {allowed:?}"
            );
            assert_eq!(
                &text, &expected[&version],
                "v{version} answered differently under load"
            );
            *by_version.entry(version).or_insert(0) += 1;
            total += 1;
        }
    }
    eprintln!("hot swap: {total} streamed requests, by version {by_version:?}");
    // mistralrs answers one sequence at a time (see its backend's docs), so fewer complete.
    let enough = if on_mistralrs() { 8 } else { 32 };
    assert!(total >= enough, "only {total} requests completed");
    assert_eq!(by_version.len(), 2, "both versions served: {by_version:?}");
}

#[test]
fn kill_during_publish_leaves_a_loadable_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let peft_dir = dir.path().join("peft");
    write_dir(&peft_dir, &lora_files(300, 16, &Proj::ALL));
    let import = || {
        let mut cmd = std::process::Command::new(binary());
        cmd.current_dir(repo_root())
            .args([
                "adapters", "import", "--tenant", "acme", "--name", "crash", "--dir",
            ])
            .arg(&peft_dir)
            .arg("--data-dir")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    };
    // Complete imports create the adapter and time a whole run (the fastest of three).
    let full = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            assert!(import().status().expect("run import").success());
            t0.elapsed()
        })
        .min()
        .expect("three runs");
    let cfg = model_config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut outcomes = BTreeMap::new();
    let trials = kill_trials("PUBLISH_KILL_TRIALS", 20);
    for trial in 0..trials {
        let before = {
            let store = AdapterStore::open(data.join("adapters")).expect("store");
            store.current("acme", "crash").expect("current")
        };
        let mut child = import().spawn().expect("spawn import");
        let delay = full.mul_f64(rng.gen_range(0.0..1.0));
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().expect("wait");
        // Reopening recovers; the current version is the old one or the one this import
        // published, complete. A kill between the version's rename and the CURRENT write
        // leaves a published, inactive version behind, so the next import's number skips
        // it: "new" means the newest version, not `before + 1`.
        let store = AdapterStore::open(data.join("adapters")).expect("store reopens");
        let current = store.current("acme", "crash").expect("current");
        let newest = *store
            .versions("acme", "crash")
            .unwrap()
            .last()
            .expect("a version");
        assert!(
            current == before || (current > before && current == newest),
            "trial {trial}: {before} → {current} (newest v{newest})"
        );
        let files = store
            .read_files("acme", "crash", current)
            .expect("current files intact");
        peft::parse(&files.config, &files.weights, &cfg, &Limits::default())
            .expect("current loads");
        for v in store.versions("acme", "crash").unwrap() {
            store
                .read_files("acme", "crash", v)
                .expect("every published version is complete");
        }
        let leftovers: Vec<_> = std::fs::read_dir(data.join("adapters/acme/crash"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(
            leftovers.is_empty(),
            "trial {trial}: leftovers {leftovers:?}"
        );
        *outcomes
            .entry(if status.success() {
                "completed"
            } else {
                "killed"
            })
            .or_insert(0usize) += 1;
    }
    eprintln!("kill -9 during publish: {outcomes:?}, full import {full:?}");
    assert!(
        outcomes.get("killed").copied().unwrap_or(0) >= trials / 4,
        "{outcomes:?}"
    );
}
