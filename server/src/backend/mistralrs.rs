//! [`Backend`] over mistralrs (cargo feature `mistralrs`): mistralrs runs the forward, the KV
//! cache and the batching on the same GGUF; everything a client can observe about a token is
//! still decided here, so both backends honour a request the same way.
//!
//! - **Sampling** is ours. Each choice is its own mistralrs request whose custom logits
//!   processor receives the raw logits, samples with our [`Sampler`] (seed + choice index,
//!   penalties, top-k/top-p/min-p, natural-log log-probs) and hands mistralrs a distribution
//!   with all its mass on that token. mistralrs's own sampler has one RNG per engine (no
//!   per-request seed) and reports log-probs in base 10, so mapping the parameters onto it
//!   could not be faithful.
//! - **Text** is ours: the tokens go through the same detokenizer, stop-string matcher and
//!   token limit as on our engine ([`ChoiceOutput`]). When a choice ends early (a stop string,
//!   the client left) its processor forces the end-of-sequence token, so mistralrs frees the
//!   sequence at its next step.
//! - **Scoring** (prompt log-probs, `max_tokens = 0`), the eval gate's KL and prefix
//!   initialisation run on our engine, loaded from the same file: mistralrs has no prompt
//!   log-probs. That is a second copy of the base weights in memory.
//! - **One sequence at a time.** mistralrs 0.8.1 on the CPU mixes up concurrent sequences:
//!   eight requests in flight together all continue the last one's prompt, even with
//!   `max_num_seqs = 1` and different prompt lengths, while the same requests one after
//!   another are answered correctly (`examples/mistralrs_concurrency.rs` shows it). Each
//!   choice therefore waits for the previous one to finish before it is handed to mistralrs:
//!   answers are right, and concurrent requests queue.
//! - **Adapters**: mistralrs runs one adapter per model, so each adapter version a request
//!   asks for becomes its own mistralrs model, loaded from a copy of the GGUF with the LoRA
//!   merged in ([`merge_lora_into_gguf`]; the touched projections at f32, so it computes what
//!   our engine computes with the adapter on the side). A version is built on its first
//!   request (or ahead of an activation, [`Backend::prepare`]) and stays loaded while it is
//!   used; an activation or rollback therefore loads the new version, moves the alias, and the
//!   old one is dropped once its last request is done and room is needed. At most
//!   `[model] mistralrs_max_live` versions are loaded at once, those still finishing requests
//!   included; a request that needs another while all are busy gets 503. Prefix adapters have
//!   no merged form and are refused with 400. (mistralrs's own `GgufLoraModelBuilder` is not
//!   used: in the 0.8.1 source its merge computes the merged weights and drops them —
//!   `QLoraLinear::merge_weights` discards what `add_delta_w` returns — and it would
//!   requantize to the base's format, which rounds a small delta away.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use mistralrs::core::RequestMessage;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, NormalRequest, Request, Response,
    SamplingParams as MrsSampling, StopTokens,
};
use prefix_rft_adapters::registry::VersionKey;
use prefix_rft_adapters::Lease;
use prefix_rft_engine::chat_template::ChatMessage;
use prefix_rft_engine::generate::FinishReason;
use prefix_rft_engine::merge::merge_lora_into_gguf;
use prefix_rft_engine::model::{AdapterWeights, ModelConfig, PrefixWeights};
use prefix_rft_engine::sampler::{Sampled, Sampler};
use prefix_rft_engine::LoadedModel;
use prometheus::IntGauge;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::Semaphore;

use super::local::LocalBackend;
use super::scheduler::ChoiceOutput;
use super::{
    Admission, Backend, GenerationEvent, GenerationRequest, ModelInfo, PromptError, SubmitError,
};
use crate::config::LimitsSection;

/// Generation on mistralrs, everything else on our engine.
pub struct MistralrsBackend {
    local: LocalBackend,
    runner: Arc<mistralrs::Model>,
    runtime: tokio::runtime::Handle,
    slots: Arc<Semaphore>,
    capacity: usize,
    /// One mistralrs sequence at a time (see the module docs).
    gate: Arc<Semaphore>,
    /// Adapter versions as merged models.
    versions: Arc<Versions>,
}

/// How mistralrs loads a GGUF file: both the base and every merged version.
#[derive(Clone)]
struct Loader {
    max_seqs: usize,
    runtime: tokio::runtime::Handle,
}

impl Loader {
    /// Loads `gguf` into a mistralrs model of its own (CPU). Blocking.
    fn load(&self, gguf: &Path) -> Result<mistralrs::Model, MistralrsError> {
        let (dir, file) = match (gguf.parent(), gguf.file_name().and_then(|f| f.to_str())) {
            (Some(dir), Some(file)) if gguf.is_file() => (dir, file),
            _ => {
                return Err(MistralrsError(format!(
                    "{} is not a GGUF file; the mistralrs backend loads GGUF only",
                    gguf.display()
                )))
            }
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let builder = GgufModelBuilder::new(dir.to_string_lossy(), vec![file])
            .with_force_cpu()
            .with_token_source(mistralrs::core::TokenSource::None)
            .with_max_num_seqs(self.max_seqs)
            // Our scheduler does not reuse prompt caches across requests either; keep the two
            // backends comparable.
            .with_prefix_cache_n(None);
        self.runtime
            .block_on(builder.build())
            .map_err(|e| MistralrsError(format!("{e:#}")))
    }
}

/// Adapter versions loaded as merged mistralrs models (see the module docs).
struct Versions {
    loader: Loader,
    base: PathBuf,
    cfg: ModelConfig,
    /// Where merged files are written while mistralrs loads them.
    dir: PathBuf,
    max_live: usize,
    /// Loaded or loading versions by key.
    slots: Mutex<HashMap<VersionKey, Arc<Slot>>>,
    /// Versions loaded or loading, those dropped from `slots` but still finishing included
    /// (the `mistralrs_versions_live` gauge).
    live: IntGauge,
    clock: AtomicU64,
    files: AtomicU64,
}

/// One version: loaded once, by whichever request (or activation) needs it first. It holds
/// its place in `Versions::live` for as long as it exists: in the map, or held by a request
/// from admission to its last token.
struct Slot {
    model: tokio::sync::OnceCell<Arc<mistralrs::Model>>,
    _live: LiveToken,
    last_used: AtomicU64,
}

/// One unit of `Versions::live`, given back when dropped.
struct LiveToken(IntGauge);

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Versions {
    /// The slot of `lease`'s version, making room for it if it is new: idle versions are
    /// dropped, least recently used first, until fewer than `max_live` remain.
    fn slot(&self, lease: &Lease) -> Result<Arc<Slot>, SubmitError> {
        let key = lease.key();
        let now = self.clock.fetch_add(1, Ordering::SeqCst);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(key) {
            slot.last_used.store(now, Ordering::SeqCst);
            return Ok(Arc::clone(slot));
        }
        while self.live.get() >= self.max_live as i64 {
            // Idle: loaded, and held by nothing but this map (every request holds its slot
            // from admission to its last token, whether its model is loaded yet or not).
            let victim = slots
                .iter()
                .filter(|(_, s)| s.model.initialized() && Arc::strong_count(s) == 1)
                .min_by_key(|(_, s)| s.last_used.load(Ordering::SeqCst))
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                return Err(SubmitError::Busy(format!(
                    "all {} adapter versions the mistralrs backend may hold at once \
                     ([model] mistralrs_max_live) are serving requests; retry shortly",
                    self.max_live
                )));
            };
            tracing::info!(tenant = %victim.0, adapter = %victim.1, version = victim.2,
                "mistralrs: dropping an idle merged adapter version to make room");
            slots.remove(&victim);
        }
        self.live.inc();
        let slot = Arc::new(Slot {
            model: tokio::sync::OnceCell::new(),
            _live: LiveToken(self.live.clone()),
            last_used: AtomicU64::new(now),
        });
        slots.insert(key.clone(), Arc::clone(&slot));
        Ok(slot)
    }

    /// Drops every version of `tenant`'s adapter `name` from the map (it was deleted): an idle
    /// one gives its place and memory back now, one still serving when its last request ends.
    fn forget(&self, tenant: &str, name: &str) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|(t, n, _), _| !(t == tenant && n == name));
    }

    /// `lease`'s version as a mistralrs model, merging and loading it on first use. A failed
    /// load leaves the slot empty, so the next request tries again.
    async fn model(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        lease: &Lease,
    ) -> Result<Arc<mistralrs::Model>, String> {
        let model = slot
            .model
            .get_or_try_init(|| {
                let this = Arc::clone(self);
                let lease = lease.clone();
                async move {
                    tokio::task::spawn_blocking(move || this.build(&lease))
                        .await
                        .map_err(|e| format!("loading the adapter version panicked: {e}"))?
                }
            })
            .await;
        match model {
            Ok(model) => Ok(Arc::clone(model)),
            Err(e) => {
                // Forget the failed slot (and the place it holds in `live`) unless a newer one
                // replaced it already.
                let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
                if slots.get(lease.key()).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                    slots.remove(lease.key());
                }
                Err(e)
            }
        }
    }

    /// Merges `lease`'s LoRA into a copy of the base file and loads it. Blocking.
    fn build(&self, lease: &Lease) -> Result<Arc<mistralrs::Model>, String> {
        let started = std::time::Instant::now();
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("{}: cannot create: {e}", self.dir.display()))?;
        let file = self.dir.join(format!(
            "merged-{}-{}.gguf",
            std::process::id(),
            self.files.fetch_add(1, Ordering::SeqCst)
        ));
        let merged = merge_lora_into_gguf(&self.base, &self.cfg, lease.weights(), &file);
        let loaded = merged
            .map_err(|e| e.to_string())
            .and_then(|_| self.loader.load(&file).map_err(|e| e.to_string()));
        // mistralrs reads the tensors into memory; the file is not needed once loaded.
        let _ = std::fs::remove_file(&file);
        let model = loaded.map_err(|e| format!("loading {} on mistralrs: {e}", lease.label()))?;
        tracing::info!(adapter = %lease.label(), tenant = lease.tenant(),
            secs = started.elapsed().as_secs_f64(), "mistralrs: loaded a merged adapter version");
        Ok(Arc::new(model))
    }
}

/// How the backend serves adapter versions.
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// Versions loaded at once (`[model] mistralrs_max_live`; 0 refuses adapters).
    pub max_live: usize,
    /// Where merged files are written while mistralrs loads them.
    pub merge_dir: PathBuf,
    /// Counts the versions held (`Metrics::mistralrs_versions_live`).
    pub live: IntGauge,
}

/// Why mistralrs could not be started.
#[derive(Debug, thiserror::Error)]
#[error("mistralrs: {0}")]
pub struct MistralrsError(String);

impl MistralrsBackend {
    /// Loads `gguf` into mistralrs (CPU) beside `local`, which keeps serving scoring requests.
    /// Admission allows `max_batch_size + max_queue` choices, as on our engine; mistralrs gets
    /// them one at a time. Adapter versions are loaded when first needed. Blocking: call it
    /// from a thread that may block on `runtime`.
    pub fn start(
        local: LocalBackend,
        gguf: &Path,
        limits: &LimitsSection,
        adapters: AdapterOptions,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, MistralrsError> {
        let max_seqs = limits.max_batch_size.max(1);
        let loader = Loader { max_seqs, runtime };
        let runner = loader.load(gguf)?;
        let capacity = max_seqs + limits.max_queue;
        // Merged files of an earlier run that died while loading one.
        if let Ok(entries) = std::fs::read_dir(&adapters.merge_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with("merged-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let versions = Arc::new(Versions {
            loader: loader.clone(),
            base: gguf.to_path_buf(),
            cfg: local.model().model.config().clone(),
            dir: adapters.merge_dir,
            max_live: adapters.max_live,
            slots: Mutex::new(HashMap::new()),
            live: adapters.live,
            clock: AtomicU64::new(0),
            files: AtomicU64::new(0),
        });
        Ok(MistralrsBackend {
            local,
            runner: Arc::new(runner),
            runtime: loader.runtime,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            gate: Arc::new(Semaphore::new(1)),
            versions,
        })
    }

    /// The slot of `adapter`'s version, or why this backend cannot serve it.
    fn version_slot(&self, adapter: &Lease) -> Result<Arc<Slot>, SubmitError> {
        if adapter.weights().prefix().is_some() {
            return Err(SubmitError::Unsupported(format!(
                "{} is a prefix-tuning adapter; the mistralrs backend serves LoRA adapters only \
                 (merged into the weights), so run the server with [model] backend = \"engine\" \
                 for this one",
                adapter.label()
            )));
        }
        if self.versions.max_live == 0 {
            return Err(SubmitError::Unsupported(
                "adapters are off on this server's mistralrs backend ([model] mistralrs_max_live \
                 = 0); ask for the base model"
                    .into(),
            ));
        }
        self.versions.slot(adapter)
    }

    fn model(&self) -> &Arc<LoadedModel> {
        self.local.model()
    }
}

/// The mistralrs model a choice runs on, held until its request is answered, with its
/// adapter version's slot (which keeps the version counted as busy until then).
struct Runner {
    model: Arc<mistralrs::Model>,
    _slot: Option<Arc<Slot>>,
}

/// What a choice's processor and its mistralrs request report to the request's emitter.
enum Msg {
    /// Choice `choice` sampled a token.
    Sampled { choice: usize, sampled: Sampled },
    /// mistralrs finished choice `choice`'s request (`Err` with its message if it failed).
    Ended {
        choice: usize,
        outcome: Result<(), String>,
    },
}

/// One choice's sampler inside mistralrs's sampling step.
struct ChoiceSampler {
    choice: usize,
    sampler: Mutex<Sampler>,
    /// Set once the choice's output ended: from then on only `stop_token` is allowed.
    done: Arc<AtomicBool>,
    stop_token: u32,
    tx: UnboundedSender<Msg>,
}

impl CustomLogitsProcessor for ChoiceSampler {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let vocab = logits.elem_count();
        let token = if self.done.load(Ordering::SeqCst) {
            self.stop_token
        } else {
            let mut row: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let sampled = match self.sampler.lock() {
                Ok(mut s) => s.sample(&mut row),
                Err(_) => return Err(candle_core::Error::Msg("sampler poisoned".into())),
            };
            let token = sampled.token;
            let choice = self.choice;
            if self.tx.send(Msg::Sampled { choice, sampled }).is_err() {
                self.done.store(true, Ordering::SeqCst);
            }
            token
        };
        let mut forced = vec![f32::NEG_INFINITY; vocab];
        if let Some(slot) = forced.get_mut(token as usize) {
            *slot = 0.0;
        }
        Tensor::from_vec(forced, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

/// A non-streaming text request to mistralrs with none of its extras (tools, grammar, web
/// search): what this backend, `mistralrs-bench` and the concurrency example send.
pub fn plain_request(
    id: usize,
    messages: RequestMessage,
    sampling_params: MrsSampling,
    response: tokio::sync::mpsc::Sender<Response>,
    logits_processors: Option<Vec<Arc<dyn CustomLogitsProcessor>>>,
) -> NormalRequest {
    NormalRequest {
        messages,
        sampling_params,
        response,
        return_logprobs: false,
        is_streaming: false,
        id,
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors,
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    }
}

impl Backend for MistralrsBackend {
    fn info(&self) -> &ModelInfo {
        self.local.info()
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, PromptError> {
        self.local.render_chat(messages)
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.local.encode(text)
    }

    fn encode_answer(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.local.encode_answer(text)
    }

    fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.local.decode(ids)
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.local.token_bytes(id)
    }

    fn submit(&self, req: GenerationRequest) -> Result<Admission, SubmitError> {
        if req.prompt_logprobs || req.max_tokens == 0 {
            // Scoring: mistralrs has no prompt log-probs.
            return self.local.submit(req);
        }
        let stop_token = *self.info().stop_tokens.first().ok_or_else(|| {
            SubmitError::Unsupported("the model has no end-of-sequence token".into())
        })?;
        let n = u32::try_from(req.n).map_err(|_| SubmitError::Overloaded)?;
        let permit = Arc::clone(&self.slots)
            .try_acquire_many_owned(n)
            .map_err(|_| SubmitError::Overloaded)?;
        // After admission: a slot taken for a request that is then turned away would hold its
        // place in `live` with nothing to load it.
        let version = match &req.adapter {
            Some(lease) => Some((self.version_slot(lease)?, lease.clone())),
            None => None,
        };
        let (events, rx) = unbounded_channel();
        let (tx, mut inbox) = unbounded_channel::<Msg>();
        let mut done = Vec::with_capacity(req.n);
        for choice in 0..req.n {
            let mut params = req.sampling.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(choice as u64));
            let flag = Arc::new(AtomicBool::new(false));
            done.push(Arc::clone(&flag));
            let processor = ChoiceSampler {
                choice,
                sampler: Mutex::new(Sampler::new(params, &req.prompt)),
                done: flag,
                stop_token,
                tx: tx.clone(),
            };
            let sampling = MrsSampling {
                // The processor leaves one token with all the mass; any sampler takes it.
                temperature: None,
                top_k: None,
                top_p: None,
                min_p: None,
                top_n_logprobs: 0,
                // Penalties would run before the processor and change the logits it sees.
                frequency_penalty: None,
                presence_penalty: None,
                repetition_penalty: None,
                stop_toks: Some(StopTokens::Ids(self.info().stop_tokens.clone())),
                max_len: Some(req.max_tokens),
                logits_bias: None,
                n_choices: 1,
                dry_params: None,
            };
            let prompt = req.prompt.clone();
            let tx = tx.clone();
            let gate = Arc::clone(&self.gate);
            let listener = events.clone();
            let base = Arc::clone(&self.runner);
            let versions = Arc::clone(&self.versions);
            let version = version.clone();
            self.runtime.spawn(async move {
                let ended = |outcome| {
                    let _ = tx.send(Msg::Ended { choice, outcome });
                };
                // The adapter's merged model, loaded first if this is its first request.
                let runner = match version {
                    None => Runner {
                        model: base,
                        _slot: None,
                    },
                    Some((slot, lease)) => match versions.model(&slot, &lease).await {
                        Ok(model) => Runner {
                            model,
                            _slot: Some(slot),
                        },
                        Err(e) => return ended(Err(e)),
                    },
                };
                // Held until mistralrs answers: its sequences run one after another.
                let Ok(_turn) = gate.acquire_owned().await else {
                    return ended(Err("mistralrs is not running".into()));
                };
                if listener.is_closed() {
                    // The client left while this choice waited its turn.
                    return ended(Ok(()));
                }
                let inner = runner.model.inner();
                let Ok(sender) = inner.get_sender(None) else {
                    return ended(Err("mistralrs is not running".into()));
                };
                let (response, mut answer) = tokio::sync::mpsc::channel(4);
                let request = plain_request(
                    inner.next_request_id(),
                    RequestMessage::CompletionTokens(prompt),
                    sampling,
                    response,
                    Some(vec![Arc::new(processor)]),
                );
                let outcome = if sender
                    .send(Request::Normal(Box::new(request)))
                    .await
                    .is_err()
                {
                    Err("mistralrs is not running".to_string())
                } else {
                    match answer.recv().await {
                        Some(Response::CompletionDone(_)) => Ok(()),
                        Some(Response::CompletionModelError(e, _)) => Err(e),
                        Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                            Err(e.to_string())
                        }
                        Some(_) => Err("mistralrs answered with an unexpected response".into()),
                        None => Err("mistralrs dropped the request".into()),
                    }
                };
                ended(outcome);
            });
        }
        drop(tx);
        let model = Arc::clone(self.model());
        let top_logprobs = req.sampling.top_logprobs;
        self.runtime.spawn(async move {
            let model = model;
            let mut outs: Vec<Option<ChoiceOutput<'_>>> = (0..req.n)
                .map(|c| {
                    Some(ChoiceOutput::new(
                        &model,
                        c,
                        events.clone(),
                        &req,
                        top_logprobs,
                    ))
                })
                .collect();
            let mut ended = 0;
            while ended < req.n {
                let Some(msg) = inbox.recv().await else { break };
                match msg {
                    Msg::Sampled { choice, sampled } => {
                        let Some(out) = outs.get_mut(choice).and_then(Option::as_mut) else {
                            continue;
                        };
                        if !out.emit(&model, sampled) || out.abandoned() {
                            outs[choice] = None;
                            done[choice].store(true, Ordering::SeqCst);
                        }
                    }
                    Msg::Ended { choice, outcome } => {
                        ended += 1;
                        let Some(mut out) = outs.get_mut(choice).and_then(Option::take) else {
                            continue;
                        };
                        match outcome {
                            // mistralrs stopped first (its token limit): the same as ours.
                            Ok(()) => {
                                out.finish(&model, FinishReason::Length);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "mistralrs request failed");
                                let _ =
                                    events.send(GenerationEvent::Failed(format!("mistralrs: {e}")));
                            }
                        }
                    }
                }
            }
        });
        Ok(Admission { events: rx, permit })
    }

    fn prepare(&self, adapter: &Lease) -> Result<(), SubmitError> {
        let slot = self.version_slot(adapter)?;
        self.runtime
            .block_on(self.versions.model(&slot, adapter))
            .map(drop)
            .map_err(SubmitError::Busy)
    }

    fn forget_adapter(&self, tenant: &str, name: &str) {
        self.versions.forget(tenant, name);
    }

    fn idle(&self) -> bool {
        self.local.idle() && self.slots.available_permits() == self.capacity
    }

    fn prefix_from_text(
        &self,
        text: &str,
        num_virtual_tokens: usize,
    ) -> Result<PrefixWeights, PromptError> {
        self.local.prefix_from_text(text, num_virtual_tokens)
    }

    fn kl_to_base(
        &self,
        probes: &[Vec<u32>],
        adapter: &AdapterWeights,
    ) -> Result<f64, PromptError> {
        self.local.kl_to_base(probes, adapter)
    }
}
