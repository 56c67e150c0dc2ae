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
//! - **Adapters** are not served on this backend yet: a request for one is refused with 400.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use mistralrs::core::RequestMessage;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, NormalRequest, Request, Response,
    SamplingParams as MrsSampling, StopTokens,
};
use prefix_rft_engine::chat_template::ChatMessage;
use prefix_rft_engine::generate::FinishReason;
use prefix_rft_engine::model::{AdapterWeights, PrefixWeights};
use prefix_rft_engine::sampler::{Sampled, Sampler};
use prefix_rft_engine::LoadedModel;
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
}

/// Why mistralrs could not be started.
#[derive(Debug, thiserror::Error)]
#[error("mistralrs: {0}")]
pub struct MistralrsError(String);

impl MistralrsBackend {
    /// Loads `gguf` into mistralrs (CPU) beside `local`, which keeps serving scoring requests.
    /// Admission allows `max_batch_size + max_queue` choices, as on our engine; mistralrs gets
    /// them one at a time. Blocking: call it from a thread that may block on `runtime`.
    pub fn start(
        local: LocalBackend,
        gguf: &std::path::Path,
        limits: &LimitsSection,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, MistralrsError> {
        let max_seqs = limits.max_batch_size.max(1);
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
            std::path::Path::new(".")
        } else {
            dir
        };
        let builder = GgufModelBuilder::new(dir.to_string_lossy(), vec![file])
            .with_force_cpu()
            .with_token_source(mistralrs::core::TokenSource::None)
            .with_max_num_seqs(max_seqs)
            // Our scheduler does not reuse prompt caches across requests either; keep the two
            // backends comparable.
            .with_prefix_cache_n(None);
        let runner = runtime
            .block_on(builder.build())
            .map_err(|e| MistralrsError(format!("{e:#}")))?;
        let capacity = max_seqs + limits.max_queue;
        Ok(MistralrsBackend {
            local,
            runner: Arc::new(runner),
            runtime,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            gate: Arc::new(Semaphore::new(1)),
        })
    }

    fn model(&self) -> &Arc<LoadedModel> {
        self.local.model()
    }
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
        if req.adapter.is_some() {
            return Err(SubmitError::Unsupported(
                "adapters are not served on the mistralrs backend yet; ask for the base model \
                 or run the server with [model] backend = \"engine\""
                    .into(),
            ));
        }
        let n = u32::try_from(req.n).map_err(|_| SubmitError::Overloaded)?;
        let permit = Arc::clone(&self.slots)
            .try_acquire_many_owned(n)
            .map_err(|_| SubmitError::Overloaded)?;
        let inner = self.runner.inner();
        let (events, rx) = unbounded_channel();
        let (tx, mut inbox) = unbounded_channel::<Msg>();
        let stop_token = *self.info().stop_tokens.first().ok_or_else(|| {
            SubmitError::Unsupported("the model has no end-of-sequence token".into())
        })?;
        let mut done = Vec::with_capacity(req.n);
        for choice in 0..req.n {
            let sender = inner.get_sender(None).map_err(|_| SubmitError::Stopped)?;
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
            let (response, mut answer) = tokio::sync::mpsc::channel(4);
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
            let request = plain_request(
                inner.next_request_id(),
                RequestMessage::CompletionTokens(req.prompt.clone()),
                sampling,
                response,
                Some(vec![Arc::new(processor)]),
            );
            let tx = tx.clone();
            let gate = Arc::clone(&self.gate);
            let listener = events.clone();
            self.runtime.spawn(async move {
                // Held until mistralrs answers: its sequences run one after another.
                let Ok(_turn) = gate.acquire_owned().await else {
                    let _ = tx.send(Msg::Ended {
                        choice,
                        outcome: Err("mistralrs is not running".into()),
                    });
                    return;
                };
                if listener.is_closed() {
                    // The client left while this choice waited its turn.
                    let _ = tx.send(Msg::Ended {
                        choice,
                        outcome: Ok(()),
                    });
                    return;
                }
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
                let _ = tx.send(Msg::Ended { choice, outcome });
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
