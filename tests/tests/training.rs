//! API.md "Training" against the real binary, model, SQLite file and trainer:
//!
//! - the closed loop: a scripted user rates a tenant's adapter, the `[training]` policy starts
//!   a job by itself, the eval gate promotes the new version and requests switch to it; the
//!   preferred behaviour's log-prob margin rises on held-out prompts, greedy answers show it,
//!   and the base and another tenant's adapter of the same name are untouched;
//! - the jobs API's errors, tenant isolation, one job per adapter, and cancellation;
//! - `kill -9` while a job trains: the restarted server lists the job failed, nothing was
//!   published, and the adapter serves and trains again;
//! - a trainer plugin that panics fails its job with the reason; a trainer library of another
//!   ABI version is refused with the reason; the server keeps serving in both cases.

use std::time::{Duration, Instant};

use prefix_rft_e2e::{
    plugin_dir, repo_config, with_plugin_dir, Server, ACME_KEY, ADMIN_KEY, GLOBEX_KEY, MODEL,
};
use serde_json::{json, Value};

/// The behaviour the scripted user wants: every answer starts with it.
const GREETING: &str = "Hello friend! ";
/// How long a job may take on a loaded 2-core machine.
const JOB_TIMEOUT: Duration = Duration::from_secs(900);

const TOPICS: [&str; 60] = [
    "the sea",
    "coffee",
    "oak trees",
    "rain",
    "music",
    "cats",
    "bread",
    "trains",
    "stars",
    "books",
    "snow",
    "bees",
    "volcanoes",
    "chess",
    "the moon",
    "rivers",
    "apples",
    "bicycles",
    "owls",
    "glaciers",
    "tea",
    "deserts",
    "whales",
    "clocks",
    "bridges",
    "tomatoes",
    "comets",
    "penguins",
    "violins",
    "forests",
    "honey",
    "lighthouses",
    "mushrooms",
    "kites",
    "salt",
    "dolphins",
    "castles",
    "thunder",
    "maps",
    "wolves",
    "copper",
    "islands",
    "lemons",
    "elephants",
    "paper",
    "caves",
    "sunflowers",
    "rockets",
    "sharks",
    "windmills",
    "pepper",
    "horses",
    "rainbows",
    "pianos",
    "coral reefs",
    "camels",
    "candles",
    "frogs",
    "marble",
    "canyons",
];

fn question(topic: &str) -> String {
    format!("Tell me one short fact about {topic}.")
}

/// SmolLM2's chat template for one user message (checked against the server's own rendering
/// by comparing prompt token counts).
fn chatml(user: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

struct Api {
    client: reqwest::Client,
    v1: String,
}

impl Api {
    fn new(server: &Server) -> Api {
        Api {
            client: reqwest::Client::new(),
            v1: server.v1(),
        }
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.v1);
        let mut req = match method {
            "GET" => self.client.get(url),
            "POST" => self.client.post(url),
            "DELETE" => self.client.delete(url),
            _ => unreachable!("{method}"),
        }
        .bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn ok(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, key, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    async fn create_adapter(&self, key: &str, name: &str, rank: usize) {
        let body = json!({"name": name, "kind": "lora", "rank": rank});
        self.ok("POST", "/adapters", key, Some(body)).await;
    }

    /// `POST /v1/training/jobs`, any outcome.
    async fn post_job(&self, key: &str, body: Value) -> (u16, Value) {
        self.call("POST", "/training/jobs", key, Some(body)).await
    }

    /// `POST /v1/training/jobs`, which must be accepted.
    async fn start_job(&self, key: &str, body: Value) -> Value {
        self.ok("POST", "/training/jobs", key, Some(body)).await
    }

    async fn chat(&self, key: &str, model: &str, user: &str, extra: Value) -> Value {
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": user}],
            "max_tokens": 24,
            "temperature": 0,
        });
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        self.ok("POST", "/chat/completions", key, Some(body)).await
    }

    async fn answer(&self, key: &str, model: &str, user: &str) -> String {
        let c = self.chat(key, model, user, json!({})).await;
        c["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string()
    }

    /// Log-probability of `continuation` after `prompt`, teacher-forced.
    async fn logprob(&self, model: &str, prompt: &str, continuation: &str) -> f64 {
        let c = self
            .ok(
                "POST",
                "/completions",
                ACME_KEY,
                Some(json!({
                    "model": model,
                    "prompt": format!("{prompt}{continuation}"),
                    "max_tokens": 0,
                    "echo": true,
                    "logprobs": 0,
                })),
            )
            .await;
        let lp = &c["choices"][0]["logprobs"];
        let offsets = lp["text_offset"].as_array().expect("text_offset");
        let values = lp["token_logprobs"].as_array().expect("token_logprobs");
        let sum: f64 = offsets
            .iter()
            .zip(values)
            .filter(|(o, _)| o.as_u64().expect("offset") as usize >= prompt.len())
            .map(|(_, v)| v.as_f64().expect("logprob"))
            .sum();
        assert!(sum.is_finite() && sum < 0.0, "{c}");
        sum
    }

    async fn wait_job(&self, key: &str, id: &str) -> Value {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let job = self
                .ok("GET", &format!("/training/jobs/{id}"), key, None)
                .await;
            let status = job["status"].as_str().expect("status");
            if ["succeeded", "failed", "cancelled"].contains(&status) {
                return job;
            }
            assert!(Instant::now() < deadline, "job still {status}: {job}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The job once it has trained at least `step` steps.
    async fn wait_step(&self, key: &str, id: &str, step: u64) -> Value {
        let deadline = Instant::now() + JOB_TIMEOUT;
        loop {
            let job = self
                .ok("GET", &format!("/training/jobs/{id}"), key, None)
                .await;
            if job["step"].as_u64().unwrap_or(0) >= step {
                return job;
            }
            assert!(Instant::now() < deadline, "{job}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asks `topics` through `model` and rates every answer down with the greeting version of
    /// it as the correction; `asks` answers per topic, sampled.
    async fn teach_greeting(&self, model: &str, topics: &[&str], asks: u64) {
        let mut ids = Vec::new();
        for (i, topic) in topics.iter().enumerate() {
            for k in 0..asks {
                let c = self
                    .chat(
                        ACME_KEY,
                        model,
                        &question(topic),
                        json!({"temperature": 0.8, "seed": i as u64 * 10 + k}),
                    )
                    .await;
                let text = c["choices"][0]["message"]["content"]
                    .as_str()
                    .expect("content")
                    .to_string();
                ids.push((c["id"].as_str().expect("id").to_string(), text));
            }
        }
        for (id, text) in ids {
            self.ok(
                "POST",
                "/feedback",
                ACME_KEY,
                Some(json!({
                    "completion_id": id,
                    "rating": "down",
                    "correction": format!("{GREETING}{}", text.trim_start()),
                })),
            )
            .await;
        }
    }
}

/// The repository config with `[training]` lines replaced.
fn training_config(replacements: &[(&str, &str)]) -> String {
    let mut text = repo_config();
    for (from, to) in replacements {
        assert!(text.contains(from), "config.toml has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_feedback_trains_promotes_and_hot_swaps() {
    let config = training_config(&[
        ("min_new_examples = 8", "min_new_examples = 60"),
        ("cooldown_secs = 60", "cooldown_secs = 3600"),
        ("poll_interval_secs = 10", "poll_interval_secs = 1"),
        ("# steps = 32", "steps = 12"),
        ("lr = 1e-4", "lr = 1e-3"),
    ]);
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_auto_training_in(&config, data.path());
    let api = Api::new(&server);
    for key in [ACME_KEY, GLOBEX_KEY] {
        api.create_adapter(key, "greeter", 8).await;
    }
    let (train, held_out) = TOPICS.split_at(40);

    // Before: what the base and the other tenant's adapter say, and the margins.
    let probe = question("gardens");
    let base_before = api.answer(ACME_KEY, MODEL, &probe).await;
    let globex_before = api.answer(GLOBEX_KEY, "greeter", &probe).await;
    let c = api
        .chat(ACME_KEY, "greeter", &question(held_out[0]), json!({}))
        .await;
    let scored = api
        .ok(
            "POST",
            "/completions",
            ACME_KEY,
            Some(json!({"model": "greeter", "prompt": chatml(&question(held_out[0])), "max_tokens": 0, "echo": true})),
        )
        .await;
    assert_eq!(
        c["usage"]["prompt_tokens"], scored["usage"]["prompt_tokens"],
        "the test's ChatML differs from the server's chat template"
    );
    let mut answers = Vec::new();
    let mut before = Vec::new();
    for topic in held_out {
        let q = question(topic);
        let answer = api.answer(ACME_KEY, "greeter@1", &q).await;
        let answer = answer.trim_start().to_string();
        let p = chatml(&q);
        let margin = api
            .logprob("greeter@1", &p, &format!("{GREETING}{answer}"))
            .await
            - api.logprob("greeter@1", &p, &answer).await;
        answers.push(answer);
        before.push(margin);
    }
    let greeted_before = answers
        .iter()
        .filter(|a| a.starts_with("Hello friend"))
        .count();

    // The scripted user; training starts by itself once 60 new examples are in.
    api.teach_greeting("greeter", train, 2).await;
    let deadline = Instant::now() + JOB_TIMEOUT;
    let job = loop {
        let list = api.ok("GET", "/training/jobs", ACME_KEY, None).await;
        if let Some(job) = list["data"].as_array().expect("data").first() {
            break job.clone();
        }
        assert!(Instant::now() < deadline, "no automatic job started");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(job["trigger"], "auto", "{job}");
    assert_eq!(job["adapter"], "greeter", "{job}");
    let job = api.wait_job(ACME_KEY, job["id"].as_str().unwrap()).await;
    eprintln!("closed loop job: {job:#}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["promoted"], true, "{job}");
    assert_eq!(job["parent_version"], 1, "{job}");
    assert_eq!(job["version"], 2, "{job}");
    assert_eq!(job["progress"], 1.0, "{job}");
    let losses = job["metrics"]["loss"].as_array().expect("loss curve");
    assert_eq!(losses.len(), 12, "{job}");
    assert!(job["metrics"]["kl_to_base"].as_f64().is_some(), "{job}");
    assert!(
        job["metrics"]["data"]["held_out_pairs"].as_u64().unwrap() > 0,
        "{job}"
    );

    // The adapter now serves version 2, made by training from version 1.
    let adapter = api.ok("GET", "/adapters/greeter", ACME_KEY, None).await;
    assert_eq!(adapter["current"], 2, "{adapter}");
    let v2 = &adapter["versions"][1];
    assert_eq!(v2["source"], "training", "{adapter}");
    assert_eq!(v2["parent"], 1, "{adapter}");
    assert_eq!(v2["status"], "live", "{adapter}");
    let c = api.chat(ACME_KEY, "greeter", &probe, json!({})).await;
    assert_eq!(c["system_fingerprint"], "greeter@2", "{c}");

    // Held-out prompts: the preferred kind's margin rises, and greedy answers greet.
    let mut rise = 0.0;
    let mut greeted = 0;
    for ((topic, answer), margin_before) in held_out.iter().zip(&answers).zip(&before) {
        let q = question(topic);
        let p = chatml(&q);
        let margin = api
            .logprob("greeter", &p, &format!("{GREETING}{answer}"))
            .await
            - api.logprob("greeter", &p, answer).await;
        rise += margin - margin_before;
        if api
            .answer(ACME_KEY, "greeter", &q)
            .await
            .trim_start()
            .starts_with("Hello friend")
        {
            greeted += 1;
        }
    }
    let rise = rise / held_out.len() as f64;
    eprintln!(
        "closed loop: mean margin rise {rise:.2} nats; greedy answers greeting {greeted_before}/20 before, {greeted}/20 after"
    );
    assert!(rise > 5.0, "margin rose by only {rise:.2} nats");
    assert!(greeted >= 11, "only {greeted}/20 greedy answers greet");

    // The base and the other tenant's adapter of the same name are unchanged.
    assert_eq!(api.answer(ACME_KEY, MODEL, &probe).await, base_before);
    assert_eq!(
        api.answer(GLOBEX_KEY, "greeter", &probe).await,
        globex_before
    );
    let globex = api.ok("GET", "/adapters/greeter", GLOBEX_KEY, None).await;
    assert_eq!(globex["current"], 1, "{globex}");
    let jobs = api.ok("GET", "/training/jobs", GLOBEX_KEY, None).await;
    assert_eq!(jobs["data"], json!([]), "globex sees acme's job: {jobs}");

    // The promoted version's examples are marked trained; only held-out ones stay new.
    let stats = api
        .ok("GET", "/feedback/stats?adapter=greeter", ACME_KEY, None)
        .await;
    let untrained = stats["untrained"].as_u64().unwrap();
    let total = stats["pairs"].as_u64().unwrap() + stats["demonstrations"].as_u64().unwrap();
    assert!(untrained < total / 2, "{stats}");
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("prefix_rft_training_jobs{status=\"succeeded\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_api_refuses_bad_requests_and_cancels() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(None, data.path());
    let api = Api::new(&server);
    api.create_adapter(ACME_KEY, "slow", 4).await;

    let (s, e) = api.post_job(ACME_KEY, json!({"adapter": "nope"})).await;
    assert_eq!(s, 404, "{e}");
    for (body, param) in [
        (json!({"adapter": "slow", "stpes": 3}), "stpes"),
        (json!({"adapter": "slow", "steps": 0}), "steps"),
        (json!({"adapter": "slow", "beta": -1}), "beta"),
        (json!({"steps": 3}), "adapter"),
    ] {
        let (s, e) = api.post_job(ACME_KEY, body.clone()).await;
        assert_eq!(s, 400, "{body}: {e}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    let r = reqwest::Client::new()
        .post(format!("{}/training/jobs", api.v1))
        .bearer_auth(ACME_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (s, _) = api.post_job(ADMIN_KEY, json!({"adapter": "slow"})).await;
    assert_eq!(s, 400, "an admin key must name the tenant");
    let (s, _) = api
        .call("GET", "/training/jobs/job-missing", ACME_KEY, None)
        .await;
    assert_eq!(s, 404);

    // Nothing to train on: the job fails and says why.
    let job = api.start_job(ACME_KEY, json!({"adapter": "slow"})).await;
    assert_eq!(job["status"], "queued", "{job}");
    let job = api.wait_job(ACME_KEY, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["reason"].as_str().unwrap().contains("no new feedback"),
        "{job}"
    );

    // A long job: one per adapter, invisible to another tenant, cancellable.
    api.teach_greeting("slow", &TOPICS[..6], 1).await;
    let job = api
        .start_job(ACME_KEY, json!({"adapter": "slow", "steps": 100000}))
        .await;
    let id = job["id"].as_str().unwrap().to_string();
    let (s, e) = api.post_job(ACME_KEY, json!({"adapter": "slow"})).await;
    assert_eq!(s, 409, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains(&id), "{e}");
    let (s, _) = api
        .call("GET", &format!("/training/jobs/{id}"), GLOBEX_KEY, None)
        .await;
    assert_eq!(s, 404, "another tenant's job must not exist for it");
    let (s, _) = api
        .call("DELETE", &format!("/training/jobs/{id}"), GLOBEX_KEY, None)
        .await;
    assert_eq!(s, 404);
    // Wait until it trains, then cancel it.
    let j = api.wait_step(ACME_KEY, &id, 1).await;
    assert_eq!(j["status"], "running", "{j}");
    api.ok("DELETE", &format!("/training/jobs/{id}"), ACME_KEY, None)
        .await;
    let job = api.wait_job(ACME_KEY, &id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["version"].is_null(), "{job}");
    let adapter = api.ok("GET", "/adapters/slow", ACME_KEY, None).await;
    assert_eq!(
        adapter["versions"].as_array().unwrap().len(),
        1,
        "{adapter}"
    );
    let list = api.ok("GET", "/training/jobs", ACME_KEY, None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    let all = api.ok("GET", "/training/jobs", ADMIN_KEY, None).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 2, "{all}");
}

/// Every directory under `root` whose name starts with `prefix`.
fn dirs_named(root: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if entry.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(path.clone());
                }
                stack.push(path);
            }
        }
    }
    found
}

/// An adapter as it was before a job that must leave it as it was.
struct Before {
    name: &'static str,
    answer: String,
    stats: Value,
}

impl Api {
    /// Creates adapter `name` with untrained feedback, records what it serves, and starts a
    /// job on it long enough to be stopped midway; returns the record and the job id.
    async fn adapter_with_long_job(&self, name: &'static str) -> (Before, String) {
        self.create_adapter(ACME_KEY, name, 4).await;
        let answer = self.answer(ACME_KEY, name, &question(TOPICS[0])).await;
        self.teach_greeting(name, &TOPICS[..6], 1).await;
        let stats = self.feedback_stats(name).await;
        let job = self
            .start_job(ACME_KEY, json!({"adapter": name, "steps": 100000}))
            .await;
        let id = job["id"].as_str().unwrap().to_string();
        (
            Before {
                name,
                answer,
                stats,
            },
            id,
        )
    }

    async fn feedback_stats(&self, name: &str) -> Value {
        let path = format!("/feedback/stats?adapter={name}");
        self.ok("GET", &path, ACME_KEY, None).await
    }

    /// The job `id` failed for `reason` and published nothing: the adapter still has its one
    /// version, serves the same answer from it, and its feedback is still untrained.
    async fn assert_failed_alone(&self, id: &str, reason: &str, before: &Before) {
        let name = before.name;
        let j = self
            .ok("GET", &format!("/training/jobs/{id}"), ACME_KEY, None)
            .await;
        assert_eq!(j["status"], "failed", "{j}");
        assert!(j["reason"].as_str().unwrap_or("").contains(reason), "{j}");
        assert!(j["version"].is_null(), "{j}");
        let adapter = self
            .ok("GET", &format!("/adapters/{name}"), ACME_KEY, None)
            .await;
        assert_eq!(
            adapter["versions"].as_array().unwrap().len(),
            1,
            "nothing may be published by a failed job: {adapter}"
        );
        let c = self
            .chat(ACME_KEY, name, &question(TOPICS[0]), json!({}))
            .await;
        assert_eq!(c["system_fingerprint"], format!("{name}@1"), "{c}");
        assert_eq!(
            c["choices"][0]["message"]["content"],
            before.answer.as_str()
        );
        let stats = self.feedback_stats(name).await;
        assert_eq!(
            stats, before.stats,
            "a failed job marks no feedback trained"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_training_fails_the_job_and_publishes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(None, data.path());
    let api = Api::new(&server);
    let (before, id) = api.adapter_with_long_job("cut").await;
    // Kill it mid-step, once it has trained a little.
    api.wait_step(ACME_KEY, &id, 2).await;
    server.kill9();
    drop(server);

    let server = Server::start_in(None, data.path());
    let api = Api::new(&server);
    api.assert_failed_alone(&id, "interrupted", &before).await;
    assert!(
        dirs_named(data.path(), ".staging-").is_empty(),
        "a restart leaves no half-written version behind"
    );
    // The adapter can train again.
    let again = api
        .start_job(ACME_KEY, json!({"adapter": "cut", "steps": 1}))
        .await;
    let again = api.wait_job(ACME_KEY, again["id"].as_str().unwrap()).await;
    assert_eq!(again["status"], "succeeded", "{again}");
}

/// On a server whose config.toml has `from` replaced by `to`, a long job on adapter `name`
/// fails for `reason` alone: nothing is published, its feedback stays untrained, and the server
/// serves as before.
async fn long_job_fails_alone(from: &str, to: &str, name: &'static str, reason: &str) {
    let data = tempfile::tempdir().unwrap();
    let config = training_config(&[(from, to)]);
    let server = Server::start_in(Some(&config), data.path());
    let api = Api::new(&server);
    let (before, id) = api.adapter_with_long_job(name).await;
    api.wait_job(ACME_KEY, &id).await;
    api.assert_failed_alone(&id, reason, &before).await;
}

/// A job whose memory outgrows `training.max_memory_mib` is stopped at its next step.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_over_its_memory_budget_fails_alone() {
    long_job_fails_alone(
        "max_memory_mib = 2048",
        "max_memory_mib = 1",
        "big",
        "max_memory_mib = 1",
    )
    .await;
}

/// A job that trains past `training.max_job_secs` fails (the timeout also raises the cancel
/// flag, but the job is reported failed with the reason, not cancelled).
#[tokio::test(flavor = "multi_thread")]
async fn a_job_over_its_time_limit_fails_alone() {
    long_job_fails_alone(
        "max_job_secs = 21600",
        "max_job_secs = 2",
        "slow",
        "training.max_job_secs = 2",
    )
    .await;
}

fn plugin_config(trainer_lib: &str, kind: &str) -> String {
    let config = format!(
        r#"{}
[[plugins]]
name = "custom"
path = "{trainer_lib}"
kind = "{kind}"
"#,
        training_config(&[("trainer = \"builtin\"", "trainer = \"custom\"")])
    );
    with_plugin_dir(&config, &plugin_dir(&[trainer_lib]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_trainer_plugins_fail_jobs_and_the_server_keeps_serving() {
    // A trainer that panics mid-job: the job fails with the panic, nothing is published.
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        Some(&plugin_config(
            "libprefix_rft_test_panicky_trainer.so",
            "trainer",
        )),
        data.path(),
    );
    let api = Api::new(&server);
    api.create_adapter(ACME_KEY, "victim", 4).await;
    api.teach_greeting("victim", &TOPICS[..8], 1).await;
    let job = api.start_job(ACME_KEY, json!({"adapter": "victim"})).await;
    let job = api.wait_job(ACME_KEY, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(reason.contains("panick"), "{job}");
    assert!(job["version"].is_null(), "{job}");
    let adapter = api.ok("GET", "/adapters/victim", ACME_KEY, None).await;
    assert_eq!(adapter["current"], 1, "{adapter}");
    assert!(!api.answer(ACME_KEY, "victim", "Hi").await.is_empty());
    // The plugin is loaded and can be used again (another job fails the same way).
    let job = api.start_job(ACME_KEY, json!({"adapter": "victim"})).await;
    let job = api.wait_job(ACME_KEY, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    drop(server);

    // A library of another ABI version as the trainer: refused at load, jobs get 503 with the
    // reason, and inference is unaffected.
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(
        Some(&plugin_config("libprefix_rft_test_bad_abi.so", "trainer")),
        data.path(),
    );
    let api = Api::new(&server);
    api.create_adapter(ACME_KEY, "victim", 4).await;
    let (s, e) = api.post_job(ACME_KEY, json!({"adapter": "victim"})).await;
    assert_eq!(s, 503, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("custom"),
        "{e}"
    );
    let plugins = api.ok("GET", "/plugins", ADMIN_KEY, None).await;
    let reason = plugins["data"][0]["reason"].as_str().unwrap_or("");
    assert!(reason.to_lowercase().contains("abi"), "{plugins}");
    assert!(!api.answer(ACME_KEY, MODEL, "Hi").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewarded_adapters_train_with_rft_and_bad_reward_plugins_fail_their_jobs() {
    let config = format!(
        r#"{}
[[training.rewards]]
adapter = "acme/greeter"
plugin = "rules"
config = {{ rules = [{{ kind = "must_contain", text = "Hello" }}] }}

[[training.rewards]]
adapter = "acme/stuck"
plugin = "hang"

[[training.rewards]]
adapter = "acme/noise"
plugin = "garbage"

[[plugins]]
name = "rules"
path = "libprefix_rft_reward_rules.so"
kind = "reward"

[[plugins]]
name = "hang"
path = "libprefix_rft_test_hang.so"
kind = "reward"
timeout_secs = 2

[[plugins]]
name = "garbage"
path = "libprefix_rft_test_garbage.so"
kind = "reward"
"#,
        training_config(&[
            ("group = 4", "group = 3"),
            ("max_new_tokens = 32", "max_new_tokens = 8")
        ])
    );
    let libs = [
        "libprefix_rft_reward_rules.so",
        "libprefix_rft_test_hang.so",
        "libprefix_rft_test_garbage.so",
    ];
    let config = with_plugin_dir(&config, &plugin_dir(&libs));
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_in(Some(&config), data.path());
    let api = Api::new(&server);
    let one_step = |adapter: &str| json!({"adapter": adapter, "steps": 1, "batch_size": 8});
    for name in ["greeter", "stuck", "noise"] {
        api.create_adapter(ACME_KEY, name, 4).await;
        api.teach_greeting(name, &TOPICS[..8], 1).await;
    }

    // The rules plugin scores the rollouts: the prefix-guided one starts with the greeting.
    let job = api.start_job(ACME_KEY, one_step("greeter")).await;
    let job = api.wait_job(ACME_KEY, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let rewards: Vec<f64> = job["metrics"]["rft_rewards"]
        .as_array()
        .unwrap_or_else(|| panic!("no rft_rewards: {job}"))
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(rewards.len(), 1, "{job}");
    assert!(
        rewards[0] > 0.0 && rewards[0] < 1.0,
        "some rollouts greet, some not: {job}"
    );

    // A reward plugin that hangs: the call times out (2 s) and the job fails saying so.
    let job = api.start_job(ACME_KEY, one_step("stuck")).await;
    let job = api.wait_job(ACME_KEY, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("`hang`") && reason.contains("did not finish"),
        "{job}"
    );

    // One that answers garbage: the job fails naming it; nothing is published.
    let job = api.start_job(ACME_KEY, one_step("noise")).await;
    let job = api.wait_job(ACME_KEY, job["id"].as_str().unwrap()).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["reason"].as_str().unwrap_or("").contains("garbage"),
        "{job}"
    );
    for name in ["stuck", "noise"] {
        let adapter = api
            .ok("GET", &format!("/adapters/{name}"), ACME_KEY, None)
            .await;
        assert_eq!(adapter["current"], 1, "{adapter}");
    }
    assert!(!api.answer(ACME_KEY, "greeter", "Hi").await.is_empty());
}
