//! The OpenAPI 3.1 document served at `/openapi.json`, written by hand: the OpenAI routes
//! follow openai/openai-openapi, so their schemas here list the fields we honour rather than
//! re-deriving them from Rust types.

use serde_json::{json, Value};

/// The default model's id (config.toml), for the request examples.
const EXAMPLE_MODEL: &str = "smollm2-135m-instruct";

fn error_responses(codes: &[&str]) -> serde_json::Map<String, Value> {
    codes
        .iter()
        .map(|c| {
            (c.to_string(), json!({"description": describe(c), "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}))
        })
        .collect()
}

fn describe(code: &str) -> &'static str {
    match code {
        "400" => "Invalid request (param names the field); context_length_exceeded",
        "401" => "Missing or unknown API key",
        "403" => "Key may not act on this tenant",
        "404" => "Unknown model (code model_not_found), or unknown completion",
        "409" => "Name taken or compare-and-swap conflict",
        "413" => "Body (or a feedback correction/comment) over the size limit",
        "422" => "Adapter files that do not fit the base model",
        "429" => "Queue full; see Retry-After",
        "503" => "Loading or draining",
        _ => "Error",
    }
}

fn inference(summary: &str, request: &str, example: Value, response: &str, chunk: &str) -> Value {
    let mut responses = error_responses(&["400", "401", "403", "404", "413", "429", "503"]);
    responses.insert(
        "200".into(),
        json!({
            "description": "The completion, or a text/event-stream of chunks ending with `data: [DONE]` when `stream` is true",
            "headers": {"x-adapter-version": {"schema": {"type": "string"}, "description": "`base` or `<adapter>@<N>`"}},
            "content": {
                "application/json": {"schema": {"$ref": format!("#/components/schemas/{response}")}},
                "text/event-stream": {"schema": {"$ref": format!("#/components/schemas/{chunk}")}}
            }
        }),
    );
    json!({"post": {
        "summary": summary,
        "security": [{"bearer": []}],
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{request}")}, "example": example}}},
        "responses": responses
    }})
}

fn op(method: &str, summary: &str, codes: &[&str], ok: (&str, &str), body: Option<Value>) -> Value {
    let mut responses = error_responses(codes);
    responses.insert(ok.0.into(), json!({"description": ok.1}));
    let mut o = json!({"summary": summary, "security": [{"bearer": []}], "responses": responses});
    if let Some(schema) = body {
        let content = if method == "multipart" {
            json!({"multipart/form-data": {"schema": schema}})
        } else {
            json!({"application/json": {"schema": schema}})
        };
        o["requestBody"] = json!({"required": true, "content": content});
    }
    o
}

/// The adapter routes of API.md and the admin plugin list.
fn adapter_paths() -> serde_json::Map<String, Value> {
    let name =
        json!([{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let create = json!({"type": "object", "required": ["name", "kind"], "properties": {
        "name": {"type": "string"}, "kind": {"enum": ["lora", "prefix", "lora+prefix"]},
        "rank": {"type": "integer", "minimum": 1}, "alpha": {"type": "number"},
        "use_rslora": {"type": "boolean"},
        "target_modules": {"type": "array", "items": {"enum": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
        "num_virtual_tokens": {"type": "integer", "minimum": 1}, "init_text": {"type": "string"},
        "seed": {"type": "integer", "minimum": 0}}});
    let upload = json!({"type": "object", "required": ["adapter_config.json", "adapter_model.safetensors"], "properties": {
        "adapter_config.json": {"type": "string", "format": "binary"},
        "adapter_model.safetensors": {"type": "string", "format": "binary"},
        "activate": {"type": "string", "enum": ["true", "false"]},
        "expected_current": {"type": "string"}}});
    let activate = json!({"type": "object", "required": ["version"], "properties": {
        "version": {"type": "integer", "minimum": 1}, "expected_current": {"type": "integer", "minimum": 1}}});
    let load = json!({"type": "object", "required": ["lora_name", "lora_path"], "properties": {
        "lora_name": {"type": "string"}, "lora_path": {"type": "string"}, "load_inplace": {"type": "boolean"}}});
    let unload = json!({"type": "object", "required": ["lora_name"], "properties": {"lora_name": {"type": "string"}}});
    let mut list = json!({
        "get": op("get", "The tenant's adapters with their versions", &["400", "401"], ("200", "Adapters"), None),
        "post": op("post", "Create an adapter whose v1 is the identity (LoRA) or base activations of init_text (prefix)", &["400", "401", "409"], ("201", "Created"), Some(create)),
    });
    list["parameters"] = json!([]);
    let mut one = json!({
        "get": op("get", "One adapter", &["401", "404"], ("200", "The adapter"), None),
        "delete": op("delete", "Delete an adapter and its versions", &["401", "404"], ("204", "Deleted"), None),
    });
    one["parameters"] = name.clone();
    let mut versions = json!({"post": op("multipart", "A new version from PEFT files", &["400", "401", "404", "409", "413", "422"], ("201", "The new version"), Some(upload))});
    versions["parameters"] = name.clone();
    let mut act = json!({"post": op("post", "Make a version current (swap or rollback)", &["400", "401", "404", "409"], ("200", "Current and previous version"), Some(activate))});
    act["parameters"] = name.clone();
    let mut file = json!({"get": op("get", "A PEFT file of a version", &["401", "404"], ("200", "The file"), None)});
    file["parameters"] = json!([
        {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}},
        {"name": "version", "in": "path", "required": true, "schema": {"type": "integer"}},
        {"name": "file", "in": "path", "required": true, "schema": {"enum": ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]}}]);
    let mut out = serde_json::Map::new();
    out.insert("/v1/adapters".into(), list);
    out.insert("/v1/adapters/{name}".into(), one);
    out.insert("/v1/adapters/{name}/versions".into(), versions);
    out.insert("/v1/adapters/{name}/activate".into(), act);
    out.insert(
        "/v1/adapters/{name}/versions/{version}/files/{file}".into(),
        file,
    );
    out.insert("/v1/load_lora_adapter".into(), json!({"post": op("post", "vLLM-compatible: register PEFT files inside the store root (admin, X-Tenant)", &["400", "401", "403", "409", "422"], ("200", "Loaded"), Some(load))}));
    out.insert("/v1/unload_lora_adapter".into(), json!({"post": op("post", "vLLM-compatible: remove an adapter (admin, X-Tenant)", &["400", "401", "403", "404"], ("200", "Removed"), Some(unload))}));
    out.insert("/v1/plugins".into(), json!({"get": op("get", "Configured plugins: name, kind, ABI version, status (admin)", &["401", "403"], ("200", "Plugins"), None)}));
    out
}

/// The training job routes' path items.
fn training_paths() -> serde_json::Map<String, Value> {
    let create = json!({"type": "object", "required": ["adapter"], "additionalProperties": false, "properties": {
        "adapter": {"type": "string"},
        "steps": {"type": "integer", "minimum": 1}, "epochs": {"type": "integer", "minimum": 1},
        "batch_size": {"type": "integer", "minimum": 1},
        "lr": {"type": "number", "minimum": 0}, "learning_rate": {"type": "number", "minimum": 0},
        "beta": {"type": "number", "exclusiveMinimum": 0}, "sft_weight": {"type": "number", "minimum": 0},
        "seed": {"type": "integer", "minimum": 0}}});
    let id = json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut jobs = json!({
        "get": op("get", "Training jobs of the tenant (every tenant's for an admin key without X-Tenant), newest first", &["401"], ("200", "Jobs"), None),
        "post": op("post", "Queue a training job for an adapter (one unfinished job per adapter)", &["400", "401", "404", "409", "503"], ("202", "The queued job: id, status, progress, metrics, version, promoted, reason"), Some(create)),
    });
    jobs["parameters"] = json!([]);
    let mut one = json!({
        "get": op("get", "One job", &["401", "404"], ("200", "The job"), None),
        "delete": op("delete", "Cancel a job (queued: at once; running: at the trainer's next step)", &["401", "404"], ("200", "The job"), None),
    });
    one["parameters"] = id;
    let mut out = serde_json::Map::new();
    out.insert("/v1/training/jobs".into(), jobs);
    out.insert("/v1/training/jobs/{id}".into(), one);
    out
}

/// The feedback routes' path items.
fn feedback_paths() -> serde_json::Map<String, Value> {
    let adapter_param = json!([{"name": "adapter", "in": "query", "required": true, "schema": {"type": "string"}, "description": "Adapter name, `base` for the base model"}]);
    let mut submit = error_responses(&["400", "401", "404", "413", "503"]);
    for (code, what) in [("201", "Stored (durably) for the first time"), ("200", "Repeat of the same (completion_id, choice_index) or Idempotency-Key: the same id, rating updated")] {
        submit.insert(code.into(), json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Feedback"}}}}));
    }
    let mut stats = error_responses(&["400", "401", "503"]);
    stats.insert("200".into(), json!({"description": "Counts", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FeedbackStats"}}}}));
    let mut export = error_responses(&["400", "401", "503"]);
    export.insert("200".into(), json!({"description": "TRL preference rows, one JSON object per line: {prompt, chosen, rejected}", "content": {"application/jsonl": {"schema": {"type": "string"}}}}));
    let mut delete = error_responses(&["400", "401", "403", "503"]);
    delete.insert("200".into(), json!({"description": "What was removed", "content": {"application/json": {"schema": {"type": "object", "properties": {"tenant": {"type": "string"}, "adapter": {"type": "string"}, "completions": {"type": "integer"}, "feedback": {"type": "integer"}}}}}}));
    let mut paths = serde_json::Map::new();
    paths.insert("/v1/feedback".into(), json!({
        "post": {
            "summary": "Rate a completion choice (thumbs up/down, optional correction and comment)",
            "security": [{"bearer": []}],
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "maxLength": 255}}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}}},
            "responses": submit
        },
        "delete": {
            "summary": "Admin: delete a tenant's (X-Tenant) completions and feedback for one adapter",
            "security": [{"bearer": []}],
            "parameters": adapter_param.clone(),
            "responses": delete
        }
    }));
    paths.insert("/v1/feedback/stats".into(), json!({"get": {"summary": "Feedback and training-example counts for one adapter", "security": [{"bearer": []}], "parameters": adapter_param.clone(), "responses": stats}}));
    paths.insert("/v1/feedback/export".into(), json!({"get": {"summary": "Preference pairs of one adapter as TRL JSON Lines", "security": [{"bearer": []}], "parameters": adapter_param, "responses": export}}));
    paths
}

/// The document.
pub fn document() -> Value {
    let common = json!({
        "model": {"type": "string", "description": "Base model id, `<adapter>` or `<adapter>@<N>`"},
        "max_tokens": {"type": "integer", "minimum": 0},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer"},
        "min_p": {"type": "number"},
        "repetition_penalty": {"type": "number"},
        "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "n": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "user": {"type": "string"}
    });
    let mut chat_props = common.as_object().cloned().unwrap_or_default();
    chat_props.insert("messages".into(), json!({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string"}, "content": {"oneOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]}}}}));
    chat_props.insert(
        "max_completion_tokens".into(),
        json!({"type": "integer", "minimum": 1}),
    );
    chat_props.insert("logprobs".into(), json!({"type": "boolean"}));
    chat_props.insert(
        "top_logprobs".into(),
        json!({"type": "integer", "minimum": 0, "maximum": 20}),
    );
    let mut cmpl_props = common.as_object().cloned().unwrap_or_default();
    cmpl_props.insert("prompt".into(), json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1}, {"type": "array", "items": {"type": "integer"}}]}));
    cmpl_props.insert("echo".into(), json!({"type": "boolean"}));
    cmpl_props.insert(
        "logprobs".into(),
        json!({"type": "integer", "minimum": 0, "maximum": 20}),
    );
    let usage = json!({"type": "object", "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}});
    let mut models_responses = error_responses(&["401"]);
    models_responses.insert("200".into(), json!({"description": "The base model, then the tenant's adapters", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}}));
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "prefix-rft", "version": env!("CARGO_PKG_VERSION"), "description": "OpenAI-compatible serving with per-tenant Prefix-RFT adapters"},
        "paths": {
            "/v1/chat/completions": inference("Chat completion", "ChatCompletionRequest", json!({"model": EXAMPLE_MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}), "ChatCompletion", "ChatCompletionChunk"),
            "/v1/completions": inference("Text completion; `echo` with `logprobs` and `max_tokens: 0` scores a text", "CompletionRequest", json!({"model": EXAMPLE_MODEL, "prompt": "Once upon a time", "max_tokens": 8}), "Completion", "Completion"),
            "/v1/models": {"get": {"summary": "Models this key can use", "security": [{"bearer": []}], "responses": models_responses}},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "The process lives"}}}},
            "/ready": {"get": {"summary": "Readiness", "responses": {"200": {"description": "Model loaded"}, "503": {"description": "Loading or draining"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
                "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": chat_props},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": cmpl_props},
                "Usage": usage,
                "ChatCompletion": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": {"type": "string"}, "system_fingerprint": {"type": "string"}, "choices": {"type": "array"}, "usage": {"$ref": "#/components/schemas/Usage"}}},
                "ChatCompletionChunk": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "chat.completion.chunk"}, "choices": {"type": "array"}, "usage": {"oneOf": [{"$ref": "#/components/schemas/Usage"}, {"type": "null"}]}}},
                "Completion": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"}, "model": {"type": "string"}, "system_fingerprint": {"type": "string"}, "choices": {"type": "array"}, "usage": {"$ref": "#/components/schemas/Usage"}}},
                "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"}, "parent": {"type": "string"}, "version": {"type": "integer"}}}}}},
                "FeedbackRequest": {"type": "object", "required": ["completion_id", "rating"], "properties": {"completion_id": {"type": "string"}, "choice_index": {"type": "integer", "minimum": 0, "default": 0}, "rating": {"enum": ["up", "down"]}, "correction": {"type": ["string", "null"]}, "comment": {"type": ["string", "null"]}}},
                "Feedback": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "feedback"}, "completion_id": {"type": "string"}, "choice_index": {"type": "integer"}, "rating": {"enum": ["up", "down"]}, "created": {"type": "integer"}}},
                "FeedbackStats": {"type": "object", "properties": {"object": {"const": "feedback.stats"}, "adapter": {"type": "string"}, "up": {"type": "integer"}, "down": {"type": "integer"}, "corrections": {"type": "integer"}, "pairs": {"type": "integer"}, "demonstrations": {"type": "integer"}, "unpaired_negatives": {"type": "integer"}, "untrained": {"type": "integer"}}}
            }
        }
    });
    if let Some(paths) = doc["paths"].as_object_mut() {
        paths.extend(adapter_paths());
        paths.extend(feedback_paths());
        paths.extend(training_paths());
    }
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_describes_every_route() {
        let doc = super::document();
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
            "/health",
            "/ready",
            "/metrics",
            "/openapi.json",
            "/v1/adapters",
            "/v1/adapters/{name}",
            "/v1/adapters/{name}/versions",
            "/v1/adapters/{name}/activate",
            "/v1/adapters/{name}/versions/{version}/files/{file}",
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/v1/plugins",
            "/v1/feedback",
            "/v1/feedback/stats",
            "/v1/feedback/export",
            "/v1/training/jobs",
            "/v1/training/jobs/{id}",
        ] {
            assert!(doc["paths"][path].is_object(), "missing {path}");
        }
        assert_eq!(
            doc["paths"]["/v1/completions"]["post"]["responses"]["429"]["description"],
            "Queue full; see Retry-After"
        );
        assert!(doc["paths"]["/v1/feedback"]["delete"].is_object());
        assert!(doc["paths"]["/v1/feedback"]["post"]["responses"]["201"].is_object());
    }
}
