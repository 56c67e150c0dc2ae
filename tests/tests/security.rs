//! The auth and isolation matrix of API.md "Auth and tenants", against the real binary: every
//! `/v1/*` route is called with no key, a wrong key, tenant A's key on tenant B's resources,
//! tenant B's own key, an admin key without `X-Tenant`, and an admin key acting on tenant B;
//! each cell's status is asserted. Tenant B (`globex`) owns an adapter, a completion, feedback
//! and a training job; tenant A (`acme`) must see none of them: a 404, exactly as if they did
//! not exist, and lists without them.

use prefix_rft_e2e::{shared, ACME_KEY, ADMIN_KEY, GLOBEX_KEY, MODEL};
use reqwest::Method;
use serde_json::{json, Value};

/// Who calls.
#[derive(Debug, Clone, Copy)]
enum Caller {
    NoKey,
    WrongKey,
    /// Tenant A on tenant B's resources.
    OtherTenant,
    /// Tenant B itself.
    Owner,
    AdminWithoutTenant,
    /// Admin with `X-Tenant: globex`.
    AdminAsOwner,
}

const CALLERS: [Caller; 6] = [
    Caller::NoKey,
    Caller::WrongKey,
    Caller::OtherTenant,
    Caller::Owner,
    Caller::AdminWithoutTenant,
    Caller::AdminAsOwner,
];

/// A cell that is not called (it would change what later rows rely on).
const SKIP: u16 = 0;

enum Body {
    Empty,
    Json(Value),
    /// A PEFT upload: `adapter_config.json` and `adapter_model.safetensors`.
    Upload(Vec<u8>, Vec<u8>),
}

struct Reply {
    status: u16,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

async fn call(caller: Caller, method: Method, path: &str, body: &Body) -> Reply {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", shared().base));
    req = match caller {
        Caller::NoKey => req,
        Caller::WrongKey => req.bearer_auth("sk-not-a-key"),
        Caller::OtherTenant => req.bearer_auth(ACME_KEY),
        Caller::Owner => req.bearer_auth(GLOBEX_KEY),
        Caller::AdminWithoutTenant => req.bearer_auth(ADMIN_KEY),
        Caller::AdminAsOwner => req.bearer_auth(ADMIN_KEY).header("X-Tenant", "globex"),
    };
    req = match body {
        // A missing or wrong key, or an admin key without a tenant, is refused before the
        // upload is read, and a client still writing a large body may then fail before it reads
        // the answer. The caller alone decides those cells: they send the small config file.
        Body::Upload(config, _)
            if matches!(
                caller,
                Caller::NoKey | Caller::WrongKey | Caller::AdminWithoutTenant
            ) =>
        {
            req.multipart(reqwest::multipart::Form::new().part(
                "adapter_config.json",
                reqwest::multipart::Part::bytes(config.clone()).file_name("adapter_config.json"),
            ))
        }
        Body::Empty => req,
        Body::Json(v) => req.json(v),
        Body::Upload(config, weights) => req.multipart(
            reqwest::multipart::Form::new()
                .part(
                    "adapter_config.json",
                    reqwest::multipart::Part::bytes(config.clone())
                        .file_name("adapter_config.json"),
                )
                .part(
                    "adapter_model.safetensors",
                    reqwest::multipart::Part::bytes(weights.clone())
                        .file_name("adapter_model.safetensors"),
                ),
        ),
    };
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    Reply { status, text }
}

/// What tenant `globex` owns for the matrix to aim at.
struct Owned {
    adapter: String,
    completion: String,
    job: String,
    config: Vec<u8>,
    weights: Vec<u8>,
}

async fn setup() -> Owned {
    let adapter = format!("vault-{}", std::process::id());
    let created = call(
        Caller::Owner,
        Method::POST,
        "/v1/adapters",
        &Body::Json(json!({"name": adapter, "kind": "lora", "rank": 2})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let file = |name: &str| format!("/v1/adapters/{adapter}/versions/1/files/{name}");
    let config = call(
        Caller::Owner,
        Method::GET,
        &file("adapter_config.json"),
        &Body::Empty,
    )
    .await;
    assert_eq!(config.status, 200, "{}", config.text);
    let weights = reqwest::Client::new()
        .get(format!(
            "{}{}",
            shared().base,
            file("adapter_model.safetensors")
        ))
        .bearer_auth(GLOBEX_KEY)
        .send()
        .await
        .expect("weights")
        .bytes()
        .await
        .expect("bytes")
        .to_vec();
    // A job before any feedback: it fails for want of data, but it exists.
    let job = call(
        Caller::Owner,
        Method::POST,
        "/v1/training/jobs",
        &Body::Json(json!({"adapter": adapter, "steps": 1})),
    )
    .await;
    assert_eq!(job.status, 202, "{}", job.text);
    let completion = call(
        Caller::Owner,
        Method::POST,
        "/v1/chat/completions",
        &Body::Json(json!({"model": adapter, "max_tokens": 2, "temperature": 0,
                           "messages": [{"role": "user", "content": "A secret?"}]})),
    )
    .await;
    assert_eq!(completion.status, 200, "{}", completion.text);
    Owned {
        completion: completion.json()["id"].as_str().expect("id").to_string(),
        job: job.json()["id"].as_str().expect("job id").to_string(),
        adapter,
        config: config.text.into_bytes(),
        weights,
    }
}

#[tokio::test]
async fn every_route_answers_each_caller_as_api_md_says() {
    let o = setup().await;
    let a = &o.adapter;
    let chat =
        json!({"model": a, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
    let completion = json!({"model": a, "max_tokens": 1, "prompt": "hi"});
    let feedback = json!({"completion_id": o.completion, "choice_index": 0, "rating": "up"});
    // Columns: no key, wrong key, other tenant, owner, admin without X-Tenant, admin as owner.
    #[rustfmt::skip]
    let rows: Vec<(Method, String, Body, [u16; 6])> = vec![
        (Method::POST, "/v1/chat/completions".into(), Body::Json(chat), [401, 401, 404, 200, 404, 200]),
        (Method::POST, "/v1/completions".into(), Body::Json(completion), [401, 401, 404, 200, 404, 200]),
        (Method::GET, "/v1/models".into(), Body::Empty, [401, 401, 200, 200, 200, 200]),
        (Method::GET, "/v1/adapters".into(), Body::Empty, [401, 401, 200, 200, 400, 200]),
        (Method::GET, format!("/v1/adapters/{a}"), Body::Empty, [401, 401, 404, 200, 400, 200]),
        (Method::POST, format!("/v1/adapters/{a}/versions"), Body::Upload(o.config.clone(), o.weights.clone()), [401, 401, 404, 201, 400, 201]),
        (Method::POST, format!("/v1/adapters/{a}/activate"), Body::Json(json!({"version": 1})), [401, 401, 404, 200, 400, 200]),
        (Method::GET, format!("/v1/adapters/{a}/versions/1/files/adapter_config.json"), Body::Empty, [401, 401, 404, 200, 400, 200]),
        (Method::GET, "/v1/plugins".into(), Body::Empty, [401, 401, 403, 403, 200, 200]),
        (Method::POST, "/v1/load_lora_adapter".into(), Body::Json(json!({"lora_name": "x", "lora_path": "/etc"})), [401, 401, 403, 403, 400, 400]),
        (Method::POST, "/v1/unload_lora_adapter".into(), Body::Json(json!({"lora_name": "no-such-adapter"})), [401, 401, 403, 403, 400, 404]),
        (Method::POST, "/v1/feedback".into(), Body::Json(feedback), [401, 401, 404, 201, 400, 200]),
        (Method::GET, format!("/v1/feedback/stats?adapter={a}"), Body::Empty, [401, 401, 200, 200, 400, 200]),
        (Method::GET, format!("/v1/feedback/export?adapter={a}"), Body::Empty, [401, 401, 200, 200, 400, 200]),
        (Method::GET, "/v1/training/jobs".into(), Body::Empty, [401, 401, 200, 200, 200, 200]),
        (Method::POST, "/v1/training/jobs".into(), Body::Json(json!({"adapter": a, "steps": 1})), [401, 401, 404, SKIP, 400, SKIP]),
        (Method::GET, format!("/v1/training/jobs/{}", o.job), Body::Empty, [401, 401, 404, 200, 200, 200]),
        (Method::DELETE, format!("/v1/training/jobs/{}", o.job), Body::Empty, [401, 401, 404, SKIP, SKIP, SKIP]),
        (Method::DELETE, format!("/v1/feedback?adapter={a}"), Body::Empty, [401, 401, 403, 403, 400, SKIP]),
        (Method::DELETE, format!("/v1/adapters/{a}"), Body::Empty, [401, 401, 404, SKIP, 400, SKIP]),
        (Method::GET, "/health".into(), Body::Empty, [200, 200, 200, 200, 200, 200]),
        (Method::GET, "/ready".into(), Body::Empty, [200, 200, 200, 200, 200, 200]),
        (Method::GET, "/metrics".into(), Body::Empty, [200, 200, 200, 200, 200, 200]),
        (Method::GET, "/openapi.json".into(), Body::Empty, [200, 200, 200, 200, 200, 200]),
        (Method::GET, "/console".into(), Body::Empty, [200, 200, 200, 200, 200, 200]),
    ];
    let mut wrong = Vec::new();
    for (method, path, body, expected) in &rows {
        for (caller, &want) in CALLERS.iter().zip(expected) {
            if want == SKIP {
                continue;
            }
            let r = call(*caller, method.clone(), path, body).await;
            if r.status != want {
                wrong.push(format!(
                    "{method} {path} as {caller:?}: {} (expected {want}): {}",
                    r.status, r.text
                ));
            } else if r.status >= 400 && path.starts_with("/v1/") {
                // Every refusal is an OpenAI error body.
                let e = &r.json()["error"];
                assert!(
                    e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(),
                    "{method} {path} as {caller:?}: {}",
                    r.text
                );
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cells differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Lists and counts as the other tenant show nothing of the owner's.
    let leaks = [
        ("/v1/models".to_string(), a.clone()),
        ("/v1/adapters".to_string(), a.clone()),
        ("/v1/training/jobs".to_string(), o.job.clone()),
        (
            format!("/v1/feedback/export?adapter={a}"),
            "A secret?".to_string(),
        ),
    ];
    for (path, secret) in leaks {
        let r = call(Caller::OtherTenant, Method::GET, &path, &Body::Empty).await;
        assert!(
            !r.text.contains(&secret),
            "{path} shows `{secret}` to another tenant: {}",
            r.text
        );
    }
    let stats = call(
        Caller::OtherTenant,
        Method::GET,
        &format!("/v1/feedback/stats?adapter={a}"),
        &Body::Empty,
    )
    .await
    .json();
    assert_eq!(stats["up"], 0, "{stats}");
    // Nothing the other tenant tried changed the owner's adapter.
    let owner_view = call(
        Caller::Owner,
        Method::GET,
        &format!("/v1/adapters/{a}"),
        &Body::Empty,
    )
    .await;
    assert_eq!(owner_view.status, 200, "{}", owner_view.text);
}

#[tokio::test]
async fn the_base_model_is_served_to_every_key_and_no_other() {
    let body = Body::Json(json!({"model": MODEL, "max_tokens": 1, "prompt": "hi"}));
    for (caller, want) in CALLERS.iter().zip([401, 401, 200, 200, 200, 200]) {
        let r = call(*caller, Method::POST, "/v1/completions", &body).await;
        assert_eq!(r.status, want, "{caller:?}: {}", r.text);
    }
}

/// Opens a streaming chat as `key` and returns the response once its first chunk arrived.
async fn open_stream(base: &str, key: &str) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(
            &json!({"model": MODEL, "stream": true, "max_tokens": 400, "temperature": 0.7,
                      "messages": [{"role": "user", "content": "Tell me a very long story."}]}),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    r.chunk().await.expect("first chunk").expect("a chunk");
    r
}

#[tokio::test]
async fn a_tenant_over_its_limit_gets_429_while_another_is_served() {
    let config = prefix_rft_e2e::repo_config()
        .replacen("tenant_max_sequences = 64", "tenant_max_sequences = 2", 1)
        .replacen("max_n = 8", "max_n = 2", 1);
    assert!(config.contains("tenant_max_sequences = 2") && config.contains("max_n = 2"));
    let data = tempfile::tempdir().expect("tmp");
    let server = prefix_rft_e2e::Server::start_in(Some(&config), data.path());
    let base = &server.base;
    let streams = [
        open_stream(base, ACME_KEY).await,
        open_stream(base, ACME_KEY).await,
    ];
    let body = json!({"model": MODEL, "max_tokens": 2, "prompt": "hi"});
    let post = |key: &'static str| {
        let body = body.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{base}/v1/completions"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("request")
        }
    };
    let over = post(ACME_KEY).await;
    assert_eq!(over.status(), 429);
    assert!(over.headers().contains_key("retry-after"));
    let e: Value = over.json().await.expect("json");
    assert_eq!(e["error"]["code"], "tenant_limit_exceeded", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("acme"),
        "{e}"
    );
    // Another tenant is admitted meanwhile.
    assert_eq!(post(GLOBEX_KEY).await.status(), 200);
    // Closing the streams gives the slots back.
    drop(streams);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = post(ACME_KEY).await.status();
        if s == 200 {
            break;
        }
        assert_eq!(s, 429);
        assert!(
            std::time::Instant::now() < deadline,
            "acme's slots never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
