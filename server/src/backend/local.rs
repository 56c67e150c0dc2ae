//! [`Backend`] over our own engine: the model is shared read-only (tokenizer and chat template
//! are used from request tasks), and its forward runs on the scheduler thread alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use prefix_rft_engine::chat_template::{ChatMessage, ChatTemplateError};
use prefix_rft_engine::model::{AdapterWeights, KvCache, LogitsWanted, PrefixWeights, SeqStep};
use prefix_rft_engine::LoadedModel;
use tokio::sync::Semaphore;

use super::scheduler::{self, Job, SchedulerConfig};
use super::{Admission, Backend, GenerationRequest, ModelInfo, PromptError, SubmitError};
use crate::config::LimitsSection;
use crate::metrics::SchedulerMetrics;

/// The engine backend: a scheduler thread plus the admission semaphore in front of it.
pub struct LocalBackend {
    model: Arc<LoadedModel>,
    info: ModelInfo,
    inbox: Sender<Job>,
    slots: Arc<Semaphore>,
    capacity: usize,
    stopped: Arc<AtomicBool>,
}

impl LocalBackend {
    /// Starts the scheduler thread for `model`. Capacity (running plus queued sequences) is
    /// `max_batch_size + max_queue`.
    pub fn start(
        model: LoadedModel,
        id: String,
        limits: &LimitsSection,
        metrics: SchedulerMetrics,
    ) -> std::io::Result<Self> {
        let model = Arc::new(model);
        let cfg = model.model.config();
        let info = ModelInfo {
            id,
            context_length: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size.min(model.tokenizer.vocab_size().max(1)),
            stop_tokens: model.tokenizer.eos_ids().to_vec(),
            created: crate::unix_now(),
        };
        let sched_cfg = SchedulerConfig {
            max_batch_size: limits.max_batch_size,
            step_token_budget: limits.step_token_budget,
            prefill_chunk: limits.prefill_chunk,
        };
        let (inbox, rx) = mpsc::channel();
        let stopped = Arc::new(AtomicBool::new(false));
        let thread_model = Arc::clone(&model);
        let thread_stopped = Arc::clone(&stopped);
        std::thread::Builder::new()
            .name("scheduler".into())
            .spawn(move || {
                scheduler::run(&thread_model, rx, sched_cfg, metrics);
                thread_stopped.store(true, Ordering::SeqCst);
            })?;
        let capacity = limits.max_batch_size + limits.max_queue;
        Ok(LocalBackend {
            model,
            info,
            inbox,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            stopped,
        })
    }

    /// The loaded model (tokenizer, chat template, weights).
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }
}

impl Backend for LocalBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, PromptError> {
        let template = self
            .model
            .chat_template
            .as_ref()
            .ok_or(PromptError::NoTemplate)?;
        template.render(messages, true).map_err(|e| match e {
            ChatTemplateError::Raised(msg) => PromptError::Refused(msg),
            other => PromptError::Failed(other.to_string()),
        })
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        self.model
            .tokenizer
            .encode(text, true)
            .map_err(|e| PromptError::Failed(e.to_string()))
    }

    fn encode_answer(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let mut ids = self
            .model
            .tokenizer
            .encode(text, false)
            .map_err(|e| PromptError::Failed(e.to_string()))?;
        ids.extend(self.model.tokenizer.eos_ids().first());
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.model
            .tokenizer
            .decode(ids, false)
            .map_err(|e| PromptError::Failed(e.to_string()))
    }

    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.model.tokenizer.token_bytes(id).unwrap_or_default()
    }

    fn submit(&self, req: GenerationRequest) -> Result<Admission, SubmitError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(SubmitError::Stopped);
        }
        let n = u32::try_from(req.n).map_err(|_| SubmitError::Overloaded)?;
        let permit = Arc::clone(&self.slots)
            .try_acquire_many_owned(n)
            .map_err(|_| SubmitError::Overloaded)?;
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        self.inbox
            .send(Job { req, events })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(Admission { events: rx, permit })
    }

    fn idle(&self) -> bool {
        self.slots.available_permits() == self.capacity
    }

    fn prefix_from_text(
        &self,
        text: &str,
        num_virtual_tokens: usize,
    ) -> Result<PrefixWeights, PromptError> {
        let ids = self.encode(text)?;
        if ids.is_empty() {
            return Err(PromptError::Refused("init_text has no tokens".into()));
        }
        let tokens: Vec<u32> = ids
            .iter()
            .copied()
            .cycle()
            .take(num_virtual_tokens)
            .collect();
        let cfg = self.model.model.config();
        let mut cache = KvCache::new(cfg);
        // Runs beside the scheduler: the compute pool serialises concurrent forwards.
        self.model
            .model
            .forward(&mut [SeqStep {
                tokens: &tokens,
                cache: &mut cache,
                adapter: None,
                logits: LogitsWanted::None,
            }])
            .map_err(|e| PromptError::Failed(e.to_string()))?;
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let (k, v) = cache.layer(l);
                (k.to_vec(), v.to_vec())
            })
            .collect();
        Ok(PrefixWeights {
            layers,
            num_virtual_tokens,
        })
    }

    fn kl_to_base(
        &self,
        probes: &[Vec<u32>],
        adapter: &AdapterWeights,
    ) -> Result<f64, PromptError> {
        let (mut sum, mut n) = (0f64, 0usize);
        for tokens in probes {
            // Runs beside the scheduler, like prefix_from_text.
            let kl = prefix_rft_engine::generate::kl_to_base(&self.model, tokens, adapter)
                .map_err(|e| PromptError::Failed(e.to_string()))?;
            sum += kl.iter().map(|&x| f64::from(x)).sum::<f64>();
            n += kl.len();
        }
        if n == 0 {
            return Err(PromptError::Refused("no probe tokens".into()));
        }
        Ok(sum / n as f64)
    }
}
