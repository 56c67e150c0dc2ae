//! `POST /v1/chat/completions` and `POST /v1/completions`: parse, validate, resolve the model,
//! build the prompt, submit to the backend, then answer with one JSON body or a server-sent
//! event stream. Every refusal happens before the first byte; once a stream has started, an
//! error is one `data: {"error": …}` frame followed by `data: [DONE]`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::{BoxStream, StreamExt};
use prefix_rft_engine::generate::FinishReason;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

use crate::auth::Principal;
use crate::backend::{
    Admission, Backend, GenerationEvent, GenerationRequest, PromptError, SubmitError, TokenLogprob,
};
use crate::error::ApiError;
use crate::openai::request::{parse, ChatFields, CompletionFields, PromptField};
use crate::openai::response::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, Completion, CompletionChoice,
    CompletionLogprobs, Usage,
};
use crate::quota::QuotaLease;
use crate::recorder::{CompletionRecord, RecordAck, RecordedChoice};
use crate::state::{AppState, ResolvedModel};
use crate::validation::{self, ValidParams};

/// Response header naming the adapter version that served a request.
pub const ADAPTER_VERSION_HEADER: &str = "x-adapter-version";
/// Events buffered between the generation task and a slow SSE client.
const SSE_BUFFER: usize = 64;

/// Marks a response whose request line was already logged by the handler.
#[derive(Debug, Clone, Copy)]
pub struct LoggedByHandler;

/// The adapter label a response was served with (for the request counter).
#[derive(Debug, Clone)]
pub struct AdapterLabel(pub String);

/// Which endpoint, with its output options.
#[derive(Debug, Clone)]
enum Endpoint {
    Chat {
        logprobs: bool,
    },
    Completions {
        /// Return the prompt before each completion.
        echo: bool,
        logprobs: Option<usize>,
    },
}

/// One prompt of a request: what the backend runs for it and, with `echo`, its text.
struct Part {
    req: GenerationRequest,
    echo: Option<String>,
}

/// A request ready to submit.
struct Prepared {
    endpoint: Endpoint,
    id: String,
    model: ResolvedModel,
    params: ValidParams,
    /// One per prompt (chat: one); prompt `i`'s choices are `i * n .. (i + 1) * n`.
    parts: Vec<Part>,
    record_request: serde_json::Value,
    backend: Arc<dyn Backend>,
}

impl Prepared {
    /// Choices per prompt.
    fn n(&self) -> usize {
        self.params.n
    }

    /// Prompt tokens over every prompt.
    fn prompt_tokens(&self) -> usize {
        self.parts.iter().map(|p| p.req.prompt.len()).sum()
    }

    /// The prompt that choice `index` (over the whole response) answers.
    fn part_of(&self, index: usize) -> &Part {
        &self.parts[index / self.n()]
    }
}

/// Every prompt's admitted events, tagged with the prompt index, and the queue slots they hold
/// until dropped (dropping also tells the scheduler the client is gone).
struct Events {
    stream: BoxStream<'static, (usize, GenerationEvent)>,
    _permits: Vec<OwnedSemaphorePermit>,
    _quota: QuotaLease,
}

impl Events {
    fn new(admissions: Vec<Admission>, quota: QuotaLease) -> Self {
        let mut permits = Vec::with_capacity(admissions.len());
        let mut streams = Vec::with_capacity(admissions.len());
        for (part, a) in admissions.into_iter().enumerate() {
            permits.push(a.permit);
            streams.push(UnboundedReceiverStream::new(a.events).map(move |ev| (part, ev)));
        }
        Events {
            stream: futures_util::stream::select_all(streams).boxed(),
            _permits: permits,
            _quota: quota,
        }
    }

    /// The next event of any prompt; `None` once every prompt's events ended.
    async fn next(&mut self) -> Option<(usize, GenerationEvent)> {
        self.stream.next().await
    }
}

/// Per-request facts for the log line, known as early as possible.
struct LogCtx {
    route: &'static str,
    tenant: String,
    model: String,
    started: Instant,
    created: u64,
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub(crate) fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::invalid_body(r.body_text())
        }
    })
}

pub(crate) fn parse_err((param, message): (Option<String>, String)) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param,
        code: None,
    }
}

fn prompt_err(e: PromptError, param: &str) -> ApiError {
    match e {
        PromptError::Refused(m) => ApiError::invalid(param, m),
        PromptError::NoTemplate => ApiError::invalid(param, e.to_string()),
        PromptError::Failed(m) => ApiError::Internal(m),
    }
}

/// Runs blocking prompt work (template, tokenizer) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("prompt task failed: {e}")))
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = LogCtx {
        route: "/v1/chat/completions",
        tenant: principal.tenant_label().to_string(),
        model: String::new(),
        started: Instant::now(),
        created: crate::unix_now(),
    };
    match prepare_chat(&state, &principal, body, &mut log).await {
        Ok(p) => respond(state, p, log).await,
        Err(e) => refuse(&state, e, &log),
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut log = LogCtx {
        route: "/v1/completions",
        tenant: principal.tenant_label().to_string(),
        model: String::new(),
        started: Instant::now(),
        created: crate::unix_now(),
    };
    match prepare_completion(&state, &principal, body, &mut log).await {
        Ok(p) => respond(state, p, log).await,
        Err(e) => refuse(&state, e, &log),
    }
}

fn refuse(state: &AppState, e: ApiError, log: &LogCtx) -> Response {
    let status = e.status();
    let _ = state;
    tracing::info!(
        target: "prefix_rft::request",
        route = log.route,
        tenant = %log.tenant,
        model = %log.model,
        status = status.as_u16(),
        error = %e.object().message,
        duration_ms = log.started.elapsed().as_millis() as u64,
        "request refused"
    );
    let mut r = e.into_response();
    r.extensions_mut().insert(LoggedByHandler);
    r
}

async fn prepare_chat(
    state: &AppState,
    principal: &Principal,
    body: Result<Bytes, BytesRejection>,
    log: &mut LogCtx,
) -> Result<Prepared, ApiError> {
    let limits = &state.config.limits;
    let bytes = body_bytes(body, limits.max_body_bytes)?;
    let p = parse::<ChatFields>(&bytes).map_err(parse_err)?;
    log.model = p.common.model.clone();
    let model = state.resolve_model(principal, &p.common.model).await?;
    let backend = state.backend()?;
    let max_tokens = match p.fields.max_completion_tokens {
        Some(v) => (Some(v), "max_completion_tokens"),
        None => (p.common.max_tokens, "max_tokens"),
    };
    let mut params = validation::common(&p.common, max_tokens, 1, limits)?;
    let logprobs = p.fields.logprobs.unwrap_or(false);
    let top = p
        .fields
        .top_logprobs
        .map(|v| validation::top_logprobs("top_logprobs", v))
        .transpose()?
        .unwrap_or(0);
    if top > 0 && !logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` requires `logprobs: true`",
        ));
    }
    params.sampling.top_logprobs = top;
    let messages = validation::messages(&p.fields.messages)?;
    let record_request = serde_json::to_value(&messages).unwrap_or_default();
    let b = Arc::clone(&backend);
    let prompt = blocking(move || b.render_chat(&messages).and_then(|text| b.encode(&text)))
        .await?
        .map_err(|e| prompt_err(e, "messages"))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the conversation renders to an empty prompt",
        ));
    }
    let max_tokens = validation::fit_context(
        prompt.len(),
        params.max_tokens,
        context_left(backend.as_ref(), &model),
        limits,
        "messages",
    )?;
    let req = generation_request(prompt, max_tokens, &params, &model, logprobs, false);
    Ok(Prepared {
        endpoint: Endpoint::Chat { logprobs },
        id: crate::random_id("chatcmpl-"),
        model,
        params,
        parts: vec![Part { req, echo: None }],
        record_request,
        backend,
    })
}

async fn prepare_completion(
    state: &AppState,
    principal: &Principal,
    body: Result<Bytes, BytesRejection>,
    log: &mut LogCtx,
) -> Result<Prepared, ApiError> {
    let limits = &state.config.limits;
    let bytes = body_bytes(body, limits.max_body_bytes)?;
    let p = parse::<CompletionFields>(&bytes).map_err(parse_err)?;
    log.model = p.common.model.clone();
    let model = state.resolve_model(principal, &p.common.model).await?;
    let backend = state.backend()?;
    let mut params = validation::common(&p.common, (p.common.max_tokens, "max_tokens"), 0, limits)?;
    let logprobs = p
        .fields
        .logprobs
        .map(|v| validation::top_logprobs("logprobs", v))
        .transpose()?;
    params.sampling.top_logprobs = logprobs.unwrap_or(0);
    let echo = p.fields.echo.unwrap_or(false);
    if p.fields.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` is not supported by this model",
        ));
    }
    let (prompts, record_request) = prompts_of(p.fields.prompt, limits.max_prompts)?;
    if prompts.len() * params.n > limits.max_batch_size {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts × n = {} makes {} sequences; at most {} run together",
                prompts.len(),
                params.n,
                prompts.len() * params.n,
                limits.max_batch_size
            ),
        ));
    }
    let many = prompts.len() > 1;
    let vocab = backend.info().vocab_size;
    let b = Arc::clone(&backend);
    let encoded = blocking(move || {
        prompts
            .into_iter()
            .enumerate()
            .map(|(i, one)| {
                let param = |rest: &str| match many {
                    true => format!("prompt[{i}]{rest}"),
                    false => format!("prompt{rest}"),
                };
                match one {
                    One::Text(text) => b
                        .encode(&text)
                        .map(|ids| (ids, text))
                        .map_err(|e| prompt_err(e, &param(""))),
                    One::Ids(raw) => {
                        let ids = raw
                            .iter()
                            .enumerate()
                            .map(|(j, &id)| match u32::try_from(id) {
                                Ok(v) if (v as usize) < vocab => Ok(v),
                                _ => Err(ApiError::invalid(
                                    param(&format!("[{j}]")),
                                    format!("token id {id} is outside the vocabulary of {vocab}"),
                                )),
                            })
                            .collect::<Result<Vec<u32>, ApiError>>()?;
                        let text = b.decode(&ids).map_err(|e| prompt_err(e, &param("")))?;
                        Ok((ids, text))
                    }
                }
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await??;
    let context = context_left(backend.as_ref(), &model);
    let mut parts = Vec::with_capacity(encoded.len());
    for (i, (prompt, text)) in encoded.into_iter().enumerate() {
        let param = match many {
            true => format!("prompt[{i}]"),
            false => "prompt".to_string(),
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid(param, "a prompt must not be empty"));
        }
        let max_tokens =
            validation::fit_context(prompt.len(), params.max_tokens, context, limits, &param)?;
        let req = generation_request(
            prompt,
            max_tokens,
            &params,
            &model,
            logprobs.is_some(),
            echo && logprobs.is_some(),
        );
        parts.push(Part {
            req,
            echo: echo.then_some(text),
        });
    }
    Ok(Prepared {
        endpoint: Endpoint::Completions { echo, logprobs },
        id: crate::random_id("cmpl-"),
        model,
        params,
        parts,
        record_request,
        backend,
    })
}

/// Context tokens a prompt and its completion may use: the model's, less the adapter's prefix.
fn context_left(backend: &dyn Backend, model: &ResolvedModel) -> usize {
    let context = backend.info().context_length;
    context - model.prefix_len().min(context)
}

/// What the backend runs for one prompt.
fn generation_request(
    prompt: Vec<u32>,
    max_tokens: usize,
    params: &ValidParams,
    model: &ResolvedModel,
    logprobs: bool,
    prompt_logprobs: bool,
) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        n: params.n,
        sampling: params.sampling.clone(),
        stop: params.stop.clone(),
        logprobs,
        prompt_logprobs,
        adapter: model.adapter.clone(),
    }
}

/// One prompt of `/v1/completions` as sent.
enum One {
    Text(String),
    Ids(Vec<i64>),
}

/// The prompts of a `prompt` field (1..=`max`), and what the record keeps of them: the one
/// prompt itself, or the list as sent.
fn prompts_of(field: PromptField, max: usize) -> Result<(Vec<One>, serde_json::Value), ApiError> {
    let (prompts, record) = match field {
        PromptField::Text(t) => {
            let record = serde_json::json!(&t);
            (vec![One::Text(t)], record)
        }
        PromptField::Tokens(ids) => {
            let record = serde_json::json!(&ids);
            (vec![One::Ids(ids)], record)
        }
        PromptField::Texts(v) => {
            let record = match v.as_slice() {
                [one] => serde_json::json!(one),
                _ => serde_json::json!(v),
            };
            (v.into_iter().map(One::Text).collect(), record)
        }
        PromptField::TokenLists(v) => {
            let record = match v.as_slice() {
                [one] => serde_json::json!(one),
                _ => serde_json::json!(v),
            };
            (v.into_iter().map(One::Ids).collect(), record)
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "`prompt` must not be an empty list",
        ));
    }
    if prompts.len() > max {
        return Err(ApiError::invalid(
            "prompt",
            format!("at most {max} prompts per request, got {}", prompts.len()),
        ));
    }
    Ok((prompts, record))
}

/// One choice as it accumulates.
#[derive(Debug, Default, Clone)]
struct ChoiceAcc {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    last_token_at: Option<Instant>,
}

/// Applies backend events to the choices and feeds the latency metrics.
struct Collector {
    /// Every prompt's choices, prompt by prompt.
    choices: Vec<ChoiceAcc>,
    /// Choices per prompt.
    n: usize,
    /// Per prompt, once prefilled (with `echo` and `logprobs`).
    prompt_lps: Vec<Option<Vec<TokenLogprob>>>,
    first_token_at: Option<Instant>,
    started: Instant,
    state: Arc<AppState>,
}

impl Collector {
    fn new(p: &Prepared, started: Instant, state: Arc<AppState>) -> Self {
        Collector {
            choices: vec![ChoiceAcc::default(); p.parts.len() * p.n()],
            n: p.n(),
            prompt_lps: vec![None; p.parts.len()],
            first_token_at: None,
            started,
            state,
        }
    }

    /// Applies one event of prompt `part`; an `Err` is a failure inside the engine.
    fn apply(&mut self, part: usize, ev: &GenerationEvent) -> Result<(), String> {
        let index = |choice: usize| match choice < self.n {
            true => Ok(part * self.n + choice),
            false => Err("event for an unknown choice".to_string()),
        };
        match ev {
            GenerationEvent::PromptLogprobs(lps) => {
                let slot = self
                    .prompt_lps
                    .get_mut(part)
                    .ok_or("event for an unknown prompt")?;
                *slot = Some(lps.clone());
            }
            GenerationEvent::Token {
                choice,
                token,
                text,
                logprob,
            } => {
                let now = Instant::now();
                if self.first_token_at.is_none() {
                    self.first_token_at = Some(now);
                    self.state
                        .metrics
                        .ttft
                        .observe((now - self.started).as_secs_f64());
                }
                let c = self
                    .choices
                    .get_mut(index(*choice)?)
                    .ok_or("event for an unknown choice")?;
                if let Some(prev) = c.last_token_at {
                    self.state
                        .metrics
                        .inter_token
                        .observe((now - prev).as_secs_f64());
                }
                c.last_token_at = Some(now);
                c.tokens.push(*token);
                c.text.push_str(text);
                if let Some(lp) = logprob {
                    c.logprobs.push(lp.clone());
                }
            }
            GenerationEvent::Finished {
                choice,
                reason,
                text,
            } => {
                let c = self
                    .choices
                    .get_mut(index(*choice)?)
                    .ok_or("event for an unknown choice")?;
                c.text.push_str(text);
                c.finish = Some(*reason);
            }
            GenerationEvent::Failed(m) => return Err(m.clone()),
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens.len()).sum()
    }

    fn ttft_secs(&self) -> f64 {
        self.first_token_at
            .map(|t| (t - self.started).as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// Submits and answers, streaming or not.
async fn respond(state: Arc<AppState>, p: Prepared, log: LogCtx) -> Response {
    // The tenant's own limits first, then the shared queue.
    let sequences = p.parts.len() * p.n();
    let tokens: usize = p
        .parts
        .iter()
        .map(|part| (part.req.prompt.len() + part.req.max_tokens) * p.n())
        .sum();
    let quota = match state.quotas.try_admit(&log.tenant, sequences, tokens) {
        Ok(q) => q,
        Err(e) => {
            return refuse(
                &state,
                ApiError::TenantLimit {
                    message: e.to_string(),
                    retry_after_secs: state.config.limits.retry_after_secs,
                },
                &log,
            )
        }
    };
    // All prompts or none: a refusal drops the admissions made so far, freeing their slots.
    let mut admissions = Vec::with_capacity(p.parts.len());
    for part in &p.parts {
        match p.backend.submit(part.req.clone()) {
            Ok(a) => admissions.push(a),
            Err(SubmitError::Overloaded) => {
                return refuse(
                    &state,
                    ApiError::Overloaded {
                        retry_after_secs: state.config.limits.retry_after_secs,
                    },
                    &log,
                )
            }
            Err(SubmitError::Stopped) => {
                return refuse(
                    &state,
                    ApiError::Unavailable("the scheduler is not running".into()),
                    &log,
                )
            }
            Err(SubmitError::Busy(message)) => {
                return refuse(&state, ApiError::Unavailable(message), &log)
            }
            Err(SubmitError::Unsupported(message)) => {
                return refuse(
                    &state,
                    ApiError::InvalidRequest {
                        message,
                        param: Some("model".into()),
                        code: None,
                    },
                    &log,
                )
            }
        }
    }
    let events = Events::new(admissions, quota);
    state.metrics.prompt_tokens.inc_by(p.prompt_tokens() as u64);
    let version = p.model.version_label.clone();
    let mut response = if p.params.stream {
        stream(state, p, log, events).into_response()
    } else {
        whole(state, p, log, events).await
    };
    if let Ok(v) = HeaderValue::from_str(&version) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(ADAPTER_VERSION_HEADER), v);
    }
    response.extensions_mut().insert(LoggedByHandler);
    response.extensions_mut().insert(AdapterLabel(version));
    response
}

/// Logs the request line, feeds the end-of-request metrics and records a finished completion;
/// the returned acknowledgement (only for a recorded completion) resolves once it is durable.
fn finish_request(
    state: &AppState,
    p: &Prepared,
    log: &LogCtx,
    c: &Collector,
    status: u16,
    error: Option<&str>,
) -> Option<RecordAck> {
    let duration = log.started.elapsed().as_secs_f64();
    let completion_tokens = c.completion_tokens();
    state.metrics.e2e.observe(duration);
    state
        .metrics
        .generation_tokens
        .inc_by(completion_tokens as u64);
    tracing::info!(
        target: "prefix_rft::request",
        route = log.route,
        id = %p.id,
        tenant = %log.tenant,
        model = %log.model,
        adapter = %p.model.version_label,
        status,
        prompt_tokens = p.prompt_tokens(),
        completion_tokens,
        ttft_ms = (c.ttft_secs() * 1000.0) as u64,
        duration_ms = (duration * 1000.0) as u64,
        error = error.unwrap_or(""),
        "request done"
    );
    if status != 200 || !c.done() {
        return None;
    }
    let endpoint = match p.endpoint {
        Endpoint::Chat { .. } => "chat.completions",
        Endpoint::Completions { .. } => "completions",
    };
    let s = &p.params.sampling;
    Some(state.recorder.record(CompletionRecord {
        id: p.id.clone(),
        tenant: log.tenant.clone(),
        model: p.model.requested.clone(),
        adapter_version: p.model.version_label.clone(),
        endpoint,
        request: p.record_request.clone(),
        params: serde_json::json!({
            "max_tokens": p.parts.iter().map(|part| part.req.max_tokens).max(), "n": p.n(),
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed,
            "stop": p.params.stop, "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty, "repetition_penalty": s.repetition_penalty,
        }),
        prompt_tokens: p.parts.iter().map(|part| part.req.prompt.clone()).collect(),
        choices: c
            .choices
            .iter()
            .enumerate()
            .map(|(index, ch)| RecordedChoice {
                index,
                prompt_index: index / p.n(),
                text: ch.text.clone(),
                token_ids: ch.tokens.clone(),
                finish_reason: ch.finish.map(finish_str).unwrap_or("length").to_string(),
            })
            .collect(),
        user: p.params.user.clone(),
        created: log.created,
        ttft_secs: c.ttft_secs(),
        duration_secs: duration,
    }))
}

/// Waits until the completion is durably recorded: feedback may refer to it from then on.
async fn recorded(ack: Option<RecordAck>) -> Result<(), ApiError> {
    match ack {
        Some(ack) => ack.await.map_err(|e| ApiError::Internal(e.to_string())),
        None => Ok(()),
    }
}

/// Collects everything, then answers with one JSON body.
async fn whole(state: Arc<AppState>, p: Prepared, log: LogCtx, mut events: Events) -> Response {
    let mut c = Collector::new(&p, log.started, Arc::clone(&state));
    let mut failure = None;
    while let Some((part, ev)) = events.next().await {
        if let Err(m) = c.apply(part, &ev) {
            failure = Some(m);
            break;
        }
        if c.done() {
            break;
        }
    }
    if failure.is_none() && !c.done() {
        failure = Some("generation ended unexpectedly".to_string());
    }
    if let Some(m) = failure {
        finish_request(&state, &p, &log, &c, 500, Some(&m));
        let mut r = ApiError::Internal(m).into_response();
        r.extensions_mut().insert(LoggedByHandler);
        return r;
    }
    if let Err(e) = recorded(finish_request(&state, &p, &log, &c, 200, None)).await {
        let mut r = e.into_response();
        r.extensions_mut().insert(LoggedByHandler);
        return r;
    }
    let usage = Usage::new(p.prompt_tokens(), c.completion_tokens());
    let fingerprint = p.model.version_label.clone();
    match &p.endpoint {
        Endpoint::Chat { logprobs } => {
            let choices = c
                .choices
                .iter()
                .enumerate()
                .map(|(index, ch)| ChatChoice {
                    index,
                    message: ChatMessageOut {
                        role: "assistant",
                        content: ch.text.clone(),
                    },
                    logprobs: logprobs.then(|| chat_logprobs(p.backend.as_ref(), &ch.logprobs)),
                    finish_reason: ch.finish.map(finish_str).unwrap_or("length"),
                })
                .collect();
            Json(ChatCompletion {
                id: p.id.clone(),
                object: "chat.completion",
                created: log.created,
                model: p.model.requested.clone(),
                system_fingerprint: fingerprint,
                choices,
                usage,
            })
            .into_response()
        }
        Endpoint::Completions { echo, logprobs } => {
            let choices = c
                .choices
                .iter()
                .enumerate()
                .map(|(index, ch)| {
                    let part = p.part_of(index);
                    let lps = logprobs.map(|_| {
                        let mut out = CompletionLogprobs::default();
                        let mut offset = 0;
                        if *echo {
                            if let Some(prompt_lps) = &c.prompt_lps[index / p.n()] {
                                push_prompt_logprobs(
                                    p.backend.as_ref(),
                                    &part.req.prompt,
                                    prompt_lps,
                                    &mut out,
                                    &mut offset,
                                );
                            }
                        }
                        for lp in &ch.logprobs {
                            push_legacy(p.backend.as_ref(), lp, &mut out, &mut offset);
                        }
                        out
                    });
                    let text = match &part.echo {
                        Some(prompt) => format!("{prompt}{}", ch.text),
                        None => ch.text.clone(),
                    };
                    CompletionChoice {
                        index,
                        text,
                        logprobs: lps,
                        finish_reason: Some(ch.finish.map(finish_str).unwrap_or("length")),
                    }
                })
                .collect();
            Json(Completion {
                id: p.id.clone(),
                object: "text_completion",
                created: log.created,
                model: p.model.requested.clone(),
                system_fingerprint: fingerprint,
                choices,
                usage: Some(Some(usage)),
            })
            .into_response()
        }
    }
}

fn token_text(backend: &dyn Backend, id: u32) -> (String, Vec<u8>) {
    let bytes = backend.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_logprobs(backend: &dyn Backend, lps: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: lps
            .iter()
            .map(|lp| {
                let (token, bytes) = token_text(backend, lp.token);
                ChatTokenLogprob {
                    token,
                    logprob: lp.logprob,
                    bytes,
                    top_logprobs: lp
                        .top
                        .iter()
                        .map(|&(id, logprob)| {
                            let (token, bytes) = token_text(backend, id);
                            ChatTopLogprob {
                                token,
                                logprob,
                                bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

fn top_map(backend: &dyn Backend, top: &[(u32, f32)]) -> BTreeMap<String, f32> {
    top.iter()
        .map(|&(id, lp)| (token_text(backend, id).0, lp))
        .collect()
}

fn push_legacy(
    backend: &dyn Backend,
    lp: &TokenLogprob,
    out: &mut CompletionLogprobs,
    offset: &mut usize,
) {
    let text = token_text(backend, lp.token).0;
    out.text_offset.push(*offset);
    *offset += text.chars().count();
    out.tokens.push(text);
    out.token_logprobs.push(Some(lp.logprob));
    out.top_logprobs.push(Some(top_map(backend, &lp.top)));
}

/// The prompt's tokens in legacy shape: the first has `null` log-prob and alternatives.
fn push_prompt_logprobs(
    backend: &dyn Backend,
    prompt: &[u32],
    lps: &[TokenLogprob],
    out: &mut CompletionLogprobs,
    offset: &mut usize,
) {
    if let Some(&first) = prompt.first() {
        let text = token_text(backend, first).0;
        out.text_offset.push(*offset);
        *offset += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(None);
        out.top_logprobs.push(None);
    }
    for lp in lps {
        push_legacy(backend, lp, out, offset);
    }
}

fn sse_json<T: Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|_| "{}".into()))
}

/// Starts the stream task and returns the SSE response.
fn stream(
    state: Arc<AppState>,
    p: Prepared,
    log: LogCtx,
    events: Events,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(SSE_BUFFER);
    tokio::spawn(drive_stream(state, p, log, events, tx));
    Sse::new(ReceiverStream::new(rx))
}

/// Turns backend events into chunks until every choice finished, the engine failed, or the
/// client went away (then the admission drops and the scheduler frees the slot).
async fn drive_stream(
    state: Arc<AppState>,
    p: Prepared,
    log: LogCtx,
    mut events: Events,
    tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut c = Collector::new(&p, log.started, Arc::clone(&state));
    let chunks = ChunkMaker {
        p: &p,
        created: log.created,
    };
    let mut failure: Option<String> = None;
    let mut gone = false;
    let send = |ev: Event| {
        let tx = tx.clone();
        async move { tx.send(Ok(ev)).await.is_ok() }
    };
    for ev in chunks.opening() {
        if !send(ev).await {
            gone = true;
        }
    }
    while !gone {
        let Some((part, ev)) = events.next().await else {
            failure = Some("generation ended unexpectedly".into());
            break;
        };
        if let Err(m) = c.apply(part, &ev) {
            failure = Some(m);
            break;
        }
        if let Some(out) = chunks.for_event(part, &ev) {
            if !send(out).await {
                gone = true;
                break;
            }
        }
        if c.done() {
            break;
        }
    }
    if gone {
        finish_request(&state, &p, &log, &c, 499, Some("client closed the stream"));
        return;
    }
    if let Some(m) = &failure {
        finish_request(&state, &p, &log, &c, 500, Some(m));
        tracing::error!(detail = %m, "generation failed inside a stream");
        let _ = send(sse_json(&ApiError::Internal(m.clone()).body())).await;
        let _ = send(Event::default().data("[DONE]")).await;
        return;
    }
    if let Err(e) = recorded(finish_request(&state, &p, &log, &c, 200, None)).await {
        let _ = send(sse_json(&e.body())).await;
        let _ = send(Event::default().data("[DONE]")).await;
        return;
    }
    if p.params.include_usage {
        let _ = send(chunks.usage(Usage::new(p.prompt_tokens(), c.completion_tokens()))).await;
    }
    let _ = send(Event::default().data("[DONE]")).await;
    drop(events);
}

/// Builds the stream's chunks for one request.
struct ChunkMaker<'a> {
    p: &'a Prepared,
    created: u64,
}

impl ChunkMaker<'_> {
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.p.params.include_usage.then_some(None)
    }

    fn chat(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>) -> Event {
        sse_json(&ChatCompletionChunk {
            id: self.p.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.p.model.requested.clone(),
            system_fingerprint: self.p.model.version_label.clone(),
            choices,
            usage,
        })
    }

    fn completion(&self, choices: Vec<CompletionChoice>, usage: Option<Option<Usage>>) -> Event {
        sse_json(&Completion {
            id: self.p.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.p.model.requested.clone(),
            system_fingerprint: self.p.model.version_label.clone(),
            choices,
            usage,
        })
    }

    /// Chat: the `role` chunk of every choice. Completions: the echoed prompt (unless its
    /// log-probs are wanted, then it comes with them after prefill).
    fn opening(&self) -> Vec<Event> {
        match &self.p.endpoint {
            Endpoint::Chat { .. } => (0..self.p.n())
                .map(|index| {
                    self.chat(
                        vec![ChatChunkChoice {
                            index,
                            delta: ChatDelta {
                                role: Some("assistant"),
                                content: Some(String::new()),
                            },
                            logprobs: None,
                            finish_reason: None,
                        }],
                        self.usage_field(),
                    )
                })
                .collect(),
            Endpoint::Completions {
                echo: true,
                logprobs: None,
            } => (0..self.p.parts.len() * self.p.n())
                .map(|index| {
                    self.completion(
                        vec![CompletionChoice {
                            index,
                            text: self.p.part_of(index).echo.clone().unwrap_or_default(),
                            logprobs: None,
                            finish_reason: None,
                        }],
                        self.usage_field(),
                    )
                })
                .collect(),
            Endpoint::Completions { .. } => Vec::new(),
        }
    }

    /// The chunk for event `ev` of prompt `part`, if it shows anything.
    fn for_event(&self, part: usize, ev: &GenerationEvent) -> Option<Event> {
        let backend = self.p.backend.as_ref();
        let n = self.p.n();
        // Choice indices run over the whole response, prompt by prompt.
        let index = |choice: &usize| part * n + choice;
        match (&self.p.endpoint, ev) {
            (Endpoint::Completions { echo: true, .. }, GenerationEvent::PromptLogprobs(lps)) => {
                let this = &self.p.parts[part];
                let mut out = CompletionLogprobs::default();
                let mut offset = 0;
                push_prompt_logprobs(backend, &this.req.prompt, lps, &mut out, &mut offset);
                let choices = (part * n..(part + 1) * n)
                    .map(|index| CompletionChoice {
                        index,
                        text: this.echo.clone().unwrap_or_default(),
                        logprobs: Some(out.clone()),
                        finish_reason: None,
                    })
                    .collect();
                Some(self.completion(choices, self.usage_field()))
            }
            (_, GenerationEvent::PromptLogprobs(_)) | (_, GenerationEvent::Failed(_)) => None,
            (
                Endpoint::Chat { logprobs },
                GenerationEvent::Token {
                    choice,
                    text,
                    logprob,
                    ..
                },
            ) => {
                if text.is_empty() && !logprobs {
                    return None;
                }
                let lps = logprob
                    .as_ref()
                    .filter(|_| *logprobs)
                    .map(|lp| chat_logprobs(backend, std::slice::from_ref(lp)));
                Some(self.chat(
                    vec![ChatChunkChoice {
                        index: index(choice),
                        delta: ChatDelta {
                            role: None,
                            content: Some(text.clone()),
                        },
                        logprobs: lps,
                        finish_reason: None,
                    }],
                    self.usage_field(),
                ))
            }
            (
                Endpoint::Chat { .. },
                GenerationEvent::Finished {
                    choice,
                    reason,
                    text,
                },
            ) => Some(self.chat(
                vec![ChatChunkChoice {
                    index: index(choice),
                    delta: ChatDelta {
                        role: None,
                        content: (!text.is_empty()).then(|| text.clone()),
                    },
                    logprobs: None,
                    finish_reason: Some(finish_str(*reason)),
                }],
                self.usage_field(),
            )),
            (
                Endpoint::Completions { logprobs, .. },
                GenerationEvent::Token {
                    choice,
                    text,
                    logprob,
                    ..
                },
            ) => {
                if text.is_empty() && logprobs.is_none() {
                    return None;
                }
                let lps = logprob.as_ref().filter(|_| logprobs.is_some()).map(|lp| {
                    let mut out = CompletionLogprobs::default();
                    let mut offset = 0;
                    push_legacy(backend, lp, &mut out, &mut offset);
                    out
                });
                Some(self.completion(
                    vec![CompletionChoice {
                        index: index(choice),
                        text: text.clone(),
                        logprobs: lps,
                        finish_reason: None,
                    }],
                    self.usage_field(),
                ))
            }
            (
                Endpoint::Completions { .. },
                GenerationEvent::Finished {
                    choice,
                    reason,
                    text,
                },
            ) => Some(self.completion(
                vec![CompletionChoice {
                    index: index(choice),
                    text: text.clone(),
                    logprobs: None,
                    finish_reason: Some(finish_str(*reason)),
                }],
                self.usage_field(),
            )),
        }
    }

    fn usage(&self, usage: Usage) -> Event {
        match self.p.endpoint {
            Endpoint::Chat { .. } => self.chat(Vec::new(), Some(Some(usage))),
            Endpoint::Completions { .. } => self.completion(Vec::new(), Some(Some(usage))),
        }
    }
}
