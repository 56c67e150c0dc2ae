//! Single-sequence generation and teacher-forced scoring on top of the forward: what the CLI
//! and the reference tests use. The server's scheduler batches many sequences through the
//! same `Llama::forward`.

use crate::error::EngineError;
use crate::loader::LoadedModel;
use crate::model::{AdapterHook, KvCache, LogitsWanted, SeqStep};
use crate::sampler::{log_softmax, Sampled, Sampler, SamplingParams};
use crate::stop::{StopCheck, StopMatcher};

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (including a final stop token, if any).
    pub tokens: Vec<u32>,
    /// Text, without stop strings.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Per-token log-probabilities.
    pub logprobs: Vec<Sampled>,
}

/// Generates from `prompt`, calling `on_text` with each piece of text as it becomes final.
pub fn generate(
    m: &LoadedModel,
    prompt: &[u32],
    cfg: &GenerationConfig,
    adapter: Option<&dyn AdapterHook>,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let context = m.model.config().max_position_embeddings;
    let mut cache = KvCache::with_adapter(m.model.config(), adapter);
    if cache.len() + prompt.len() + cfg.max_tokens > context {
        return Err(EngineError::ContextLength {
            prompt: prompt.len(),
            max_tokens: cfg.max_tokens,
            context,
        });
    }
    cache.reserve(prompt.len() + cfg.max_tokens);
    let mut sampler = Sampler::new(cfg.sampling.clone(), prompt);
    let mut stops = StopMatcher::new(cfg.stop.clone());
    let mut decoder = m.tokenizer.decoder(true);
    let eos = m.tokenizer.eos_ids();
    let mut out = Generation {
        tokens: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        logprobs: Vec::new(),
    };
    let mut input: Vec<u32> = prompt.to_vec();
    while out.tokens.len() < cfg.max_tokens {
        let mut step = [SeqStep {
            tokens: &input,
            cache: &mut cache,
            adapter,
            logits: LogitsWanted::Last,
        }];
        let logits = m.model.forward(&mut step)?;
        let mut row = logits.last_of(0).map(<[f32]>::to_vec).unwrap_or_default();
        let sampled = sampler.sample(&mut row);
        let token = sampled.token;
        out.tokens.push(token);
        out.logprobs.push(sampled);
        if !cfg.ignore_eos && eos.contains(&token) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if let Some(piece) = decoder.push(token)? {
            match stops.push(&piece) {
                StopCheck::Continue { emit } => {
                    on_text(&emit);
                    out.text.push_str(&emit);
                }
                StopCheck::Stopped { emit, .. } => {
                    on_text(&emit);
                    out.text.push_str(&emit);
                    out.finish_reason = FinishReason::Stop;
                    return Ok(out);
                }
            }
        }
        input.clear();
        input.push(token);
    }
    let rest = stops.finish();
    on_text(&rest);
    out.text.push_str(&rest);
    Ok(out)
}

/// Teacher-forced log-probabilities: entry `i` is `log p(tokens[i+1] | tokens[..=i])`, plus the
/// arg-max token at each position.
pub fn score(
    m: &LoadedModel,
    tokens: &[u32],
    adapter: Option<&dyn AdapterHook>,
) -> Result<(Vec<f32>, Vec<u32>), EngineError> {
    if tokens.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let mut cache = KvCache::with_adapter(m.model.config(), adapter);
    let mut step = [SeqStep {
        tokens,
        cache: &mut cache,
        adapter,
        logits: LogitsWanted::All,
    }];
    let logits = m.model.forward(&mut step)?;
    let mut lp = vec![0f32; logits.vocab];
    let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
    let mut top1 = Vec::with_capacity(tokens.len().saturating_sub(1));
    for i in 0..tokens.len() - 1 {
        let row = logits.row(i);
        log_softmax(row, &mut lp);
        out.push(lp[tokens[i + 1] as usize]);
        let best = row
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (j, &v)| {
                if v > b.1 {
                    (j, v)
                } else {
                    b
                }
            });
        top1.push(best.0 as u32);
    }
    Ok((out, top1))
}

/// Per-position KL divergence of the adapted model from the base, `KL(p_adapter || p_base)`
/// in nats, teacher-forced on `tokens`: entry `i` compares the two next-token distributions
/// after `tokens[..=i]`. The eval gate's drift measure.
pub fn kl_to_base(
    m: &LoadedModel,
    tokens: &[u32],
    adapter: &dyn AdapterHook,
) -> Result<Vec<f32>, EngineError> {
    if tokens.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let all_logits = |adapter: Option<&dyn AdapterHook>| {
        let mut cache = KvCache::with_adapter(m.model.config(), adapter);
        m.model.forward(&mut [SeqStep {
            tokens,
            cache: &mut cache,
            adapter,
            logits: LogitsWanted::All,
        }])
    };
    let adapted = all_logits(Some(adapter))?;
    let base = all_logits(None)?;
    let mut lp = vec![0f32; adapted.vocab];
    let mut lq = vec![0f32; base.vocab];
    let mut out = Vec::with_capacity(tokens.len());
    for i in 0..tokens.len() {
        log_softmax(adapted.row(i), &mut lp);
        log_softmax(base.row(i), &mut lq);
        let kl: f64 = lp
            .iter()
            .zip(&lq)
            .map(|(&p, &q)| {
                let pp = f64::from(p).exp();
                if pp > 0.0 {
                    pp * f64::from(p - q)
                } else {
                    0.0
                }
            })
            .sum();
        out.push(kl.max(0.0) as f32);
    }
    Ok(out)
}
