//! Continuous batching over `Llama::forward`, on one dedicated thread that owns the model's
//! compute (the forward uses every compute thread itself, so it must never run on the async
//! runtime).
//!
//! Every step runs one forward over: one token of each decoding sequence, plus prefill chunks
//! of admitted prompts while the step's token budget lasts. New requests join at the next step
//! and finished or abandoned ones (their event receiver is gone) leave at the next step. A
//! prompt is cut into fixed `prefill_chunk` pieces, so it is prefilled the same way alone or
//! batched; every row of the forward is computed independently of the others, so a sequence's
//! output does not depend on what it is batched with. Each choice has its own `Sampler`
//! (seed + choice index), KV cache, detokenizer and stop matcher.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use prefix_rft_adapters::Lease;
use prefix_rft_engine::generate::FinishReason;
use prefix_rft_engine::model::{AdapterHook, KvCache, LogitsWanted, SeqStep};
use prefix_rft_engine::sampler::{log_softmax, top_k_indices, Sampled, Sampler};
use prefix_rft_engine::stop::{StopCheck, StopMatcher};
use prefix_rft_engine::tokenizer::IncrementalDecoder;
use prefix_rft_engine::LoadedModel;
use tokio::sync::mpsc::UnboundedSender;

use super::{GenerationEvent, GenerationRequest, TokenLogprob};
use crate::metrics::SchedulerMetrics;

/// How much one step may hold.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences (choices) decoded together.
    pub max_batch_size: usize,
    /// Tokens per step, decode plus prefill.
    pub step_token_budget: usize,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
}

/// A request handed to the scheduler thread.
pub struct Job {
    /// The validated request.
    pub req: GenerationRequest,
    /// Where its events go; closed when the client left.
    pub events: UnboundedSender<GenerationEvent>,
}

/// A request whose prompt is being prefilled (once, shared by all its choices).
struct Prefill {
    job: Job,
    cache: KvCache,
    done: usize,
    prompt_lps: Vec<TokenLogprob>,
}

/// One choice being decoded.
struct Seq<'m> {
    adapter: Option<Lease>,
    cache: KvCache,
    sampler: Sampler,
    next: [u32; 1],
    out: ChoiceOutput<'m>,
}

/// What one choice has said so far: turns sampled tokens into [`GenerationEvent`]s
/// (detokenizing, matching stop strings, counting against `max_tokens`). Shared by every
/// backend, so a choice ends the same way whichever forward produced its tokens.
pub struct ChoiceOutput<'m> {
    choice: usize,
    events: UnboundedSender<GenerationEvent>,
    decoder: IncrementalDecoder<'m>,
    stops: StopMatcher,
    generated: usize,
    max_tokens: usize,
    logprobs: bool,
    top_logprobs: usize,
}

/// Runs until every sender of `inbox` is gone. A panic inside a step fails the requests in
/// flight (their event streams end unfinished) and the loop starts again with a clean state.
pub fn run(
    model: &LoadedModel,
    inbox: Receiver<Job>,
    cfg: SchedulerConfig,
    metrics: SchedulerMetrics,
) {
    loop {
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| serve(model, &inbox, cfg, &metrics)));
        match outcome {
            Ok(()) => return,
            Err(_) => {
                tracing::error!("scheduler step panicked; requests in flight were failed");
                metrics.running.set(0);
                metrics.waiting.set(0);
            }
        }
    }
}

fn serve(
    model: &LoadedModel,
    inbox: &Receiver<Job>,
    cfg: SchedulerConfig,
    metrics: &SchedulerMetrics,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut prefilling: Vec<Prefill> = Vec::new();
    let mut decoding: Vec<Seq<'_>> = Vec::new();
    let mcfg = model.model.config();
    loop {
        if waiting.is_empty() && prefilling.is_empty() && decoding.is_empty() {
            metrics.running.set(0);
            metrics.waiting.set(0);
            match inbox.recv_timeout(Duration::from_secs(1)) {
                Ok(job) => waiting.push_back(job),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(job) = inbox.try_recv() {
            waiting.push_back(job);
        }
        // Clients that left free their slots now.
        waiting.retain(|j| !j.events.is_closed());
        prefilling.retain(|p| !p.job.events.is_closed());
        decoding.retain(|s| !s.out.events.is_closed());

        let mut running: usize =
            decoding.len() + prefilling.iter().map(|p| p.job.req.n).sum::<usize>();
        while let Some(front) = waiting.front() {
            if running > 0 && running + front.req.n > cfg.max_batch_size {
                break;
            }
            let Some(job) = waiting.pop_front() else {
                break;
            };
            running += job.req.n;
            let mut cache = KvCache::with_adapter(mcfg, hook(&job.req.adapter));
            cache.reserve(job.req.prompt.len() + job.req.max_tokens);
            prefilling.push(Prefill {
                job,
                cache,
                done: 0,
                prompt_lps: Vec::new(),
            });
        }
        metrics.running.set(running as i64);
        metrics.waiting.set(waiting.len() as i64);
        if decoding.is_empty() && prefilling.is_empty() {
            continue;
        }

        let remaining: Vec<usize> = prefilling
            .iter()
            .map(|p| p.job.req.prompt.len() - p.done)
            .collect();
        let chunks = plan_prefill(decoding.len(), &remaining, cfg);

        let logits = {
            let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(decoding.len() + chunks.len());
            for s in decoding.iter_mut() {
                steps.push(SeqStep {
                    tokens: &s.next,
                    cache: &mut s.cache,
                    adapter: hook(&s.adapter),
                    logits: LogitsWanted::Last,
                });
            }
            let mut chosen = chunks.iter().peekable();
            for (i, p) in prefilling.iter_mut().enumerate() {
                let Some(&&(ci, len)) = chosen.peek() else {
                    break;
                };
                if ci != i {
                    continue;
                }
                chosen.next();
                let end = p.done + len;
                let wanted = if p.job.req.prompt_logprobs {
                    LogitsWanted::All
                } else if end == p.job.req.prompt.len() {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                };
                steps.push(SeqStep {
                    tokens: &p.job.req.prompt[p.done..end],
                    cache: &mut p.cache,
                    adapter: hook(&p.job.req.adapter),
                    logits: wanted,
                });
            }
            metrics.batch_size.observe(steps.len() as f64);
            model.model.forward(&mut steps)
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // The whole step failed: fail everyone in it, keep the rest.
                let message = format!("engine error: {e}");
                tracing::error!(%message, "forward failed");
                for s in decoding.drain(..) {
                    let _ = s.out.events.send(GenerationEvent::Failed(message.clone()));
                }
                let failed: Vec<usize> = chunks.iter().map(|&(i, _)| i).collect();
                for &i in failed.iter().rev() {
                    let p = prefilling.remove(i);
                    let _ = p.job.events.send(GenerationEvent::Failed(message.clone()));
                }
                continue;
            }
        };

        let mut row = vec![0f32; logits.vocab];
        let mut k = 0usize;
        decoding.retain_mut(|s| {
            let keep = match logits.last_of(k) {
                Some(r) => {
                    row.copy_from_slice(r);
                    let sampled = s.sampler.sample(&mut row);
                    s.next = [sampled.token];
                    s.out.emit(model, sampled)
                }
                None => false,
            };
            k += 1;
            keep
        });

        let mut finished_prefills = Vec::new();
        for (ci, &(i, len)) in chunks.iter().enumerate() {
            let seq_index = k + ci;
            let p = &mut prefilling[i];
            let start = p.done;
            p.done += len;
            if p.job.req.prompt_logprobs {
                let rows = logits.rows_of.get(seq_index).cloned().unwrap_or(0..0);
                let mut lp = vec![0f32; logits.vocab];
                for (j, r) in rows.enumerate() {
                    let pos = start + j;
                    let Some(&next) = p.job.req.prompt.get(pos + 1) else {
                        break;
                    };
                    log_softmax(logits.row(r), &mut lp);
                    let top = top_k_indices(&lp, p.job.req.sampling.top_logprobs);
                    p.prompt_lps.push(TokenLogprob {
                        token: next,
                        logprob: lp.get(next as usize).copied().unwrap_or(f32::NEG_INFINITY),
                        top,
                    });
                }
            }
            if p.done == p.job.req.prompt.len() {
                let last = logits.last_of(seq_index).map(<[f32]>::to_vec);
                finished_prefills.push((i, last));
            }
        }
        for (i, last) in finished_prefills.into_iter().rev() {
            let p = prefilling.remove(i);
            start_choices(model, p, last, &mut decoding);
        }
    }
}

/// The engine's view of a request's adapter.
fn hook(lease: &Option<Lease>) -> Option<&dyn AdapterHook> {
    lease.as_ref().map(|l| l as &dyn AdapterHook)
}

/// Which prefills run a chunk this step, as (index, length): the first waiting prompt always
/// (progress), then more while the budget left after one token per decoding sequence lasts.
/// Chunks are at most `prefill_chunk` long, so decoding sequences wait at most one chunk.
fn plan_prefill(decoding: usize, remaining: &[usize], cfg: SchedulerConfig) -> Vec<(usize, usize)> {
    let mut budget = cfg.step_token_budget.saturating_sub(decoding);
    let mut chunks = Vec::new();
    for (i, &left) in remaining.iter().enumerate() {
        let len = left.min(cfg.prefill_chunk);
        if !chunks.is_empty() && len > budget {
            break;
        }
        budget = budget.saturating_sub(len);
        chunks.push((i, len));
    }
    chunks
}

/// A finished prefill becomes `n` decoding choices sharing its prompt cache.
fn start_choices<'m>(
    model: &'m LoadedModel,
    p: Prefill,
    last: Option<Vec<f32>>,
    decoding: &mut Vec<Seq<'m>>,
) {
    let Prefill {
        job,
        cache,
        prompt_lps,
        ..
    } = p;
    let req = &job.req;
    if req.prompt_logprobs {
        let _ = job.events.send(GenerationEvent::PromptLogprobs(prompt_lps));
    }
    let Some(last) = last.filter(|_| req.max_tokens > 0) else {
        for choice in 0..req.n {
            let _ = job.events.send(GenerationEvent::Finished {
                choice,
                reason: FinishReason::Length,
                text: String::new(),
            });
        }
        return;
    };
    let mut cache = Some(cache);
    for choice in 0..req.n {
        let mut params = req.sampling.clone();
        params.seed = params.seed.map(|s| s.wrapping_add(choice as u64));
        let top_logprobs = params.top_logprobs;
        let mut sampler = Sampler::new(params, &req.prompt);
        let mut row = last.clone();
        let sampled = sampler.sample(&mut row);
        let c = if choice + 1 == req.n {
            cache.take()
        } else {
            cache.clone()
        };
        let Some(c) = c else { break };
        let mut s = Seq {
            adapter: req.adapter.clone(),
            cache: c,
            sampler,
            next: [sampled.token],
            out: ChoiceOutput::new(model, choice, job.events.clone(), req, top_logprobs),
        };
        if s.out.emit(model, sampled) {
            decoding.push(s);
        }
    }
}

impl<'m> ChoiceOutput<'m> {
    /// Output of choice `choice` of `req`, reporting `top_logprobs` alternatives per token.
    pub fn new(
        model: &'m LoadedModel,
        choice: usize,
        events: UnboundedSender<GenerationEvent>,
        req: &GenerationRequest,
        top_logprobs: usize,
    ) -> Self {
        ChoiceOutput {
            choice,
            events,
            decoder: model.tokenizer.decoder(true),
            stops: StopMatcher::new(req.stop.clone()),
            generated: 0,
            max_tokens: req.max_tokens,
            logprobs: req.logprobs,
            top_logprobs,
        }
    }

    /// True when nobody listens any more (the client left).
    pub fn abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// Sends the sampled token; returns whether the choice goes on.
    pub fn emit(&mut self, model: &'m LoadedModel, sampled: Sampled) -> bool {
        let token = sampled.token;
        self.generated += 1;
        let logprob = self.logprobs.then(|| TokenLogprob {
            token,
            logprob: sampled.logprob,
            top: sampled
                .top_logprobs
                .into_iter()
                .take(self.top_logprobs)
                .collect(),
        });
        if model.tokenizer.eos_ids().contains(&token) {
            let _ = self.events.send(GenerationEvent::Token {
                choice: self.choice,
                token,
                text: String::new(),
                logprob,
            });
            return self.finish(model, FinishReason::Stop);
        }
        let text = match self.decoder.push(token) {
            Ok(piece) => piece.unwrap_or_default(),
            Err(e) => {
                let _ = self
                    .events
                    .send(GenerationEvent::Failed(format!("detokenizer: {e}")));
                return false;
            }
        };
        match self.stops.push(&text) {
            StopCheck::Continue { emit } => {
                let _ = self.events.send(GenerationEvent::Token {
                    choice: self.choice,
                    token,
                    text: emit,
                    logprob,
                });
            }
            StopCheck::Stopped { emit, .. } => {
                let _ = self.events.send(GenerationEvent::Token {
                    choice: self.choice,
                    token,
                    text: emit,
                    logprob,
                });
                let _ = self.events.send(GenerationEvent::Finished {
                    choice: self.choice,
                    reason: FinishReason::Stop,
                    text: String::new(),
                });
                return false;
            }
        }
        if self.generated >= self.max_tokens {
            return self.finish(model, FinishReason::Length);
        }
        true
    }

    /// Releases held-back text (an incomplete character, a partial stop string) and ends.
    pub fn finish(&mut self, model: &'m LoadedModel, mut reason: FinishReason) -> bool {
        let decoder = std::mem::replace(&mut self.decoder, model.tokenizer.decoder(true));
        let mut text = String::new();
        if let Ok(Some(tail)) = decoder.finish() {
            match self.stops.push(&tail) {
                StopCheck::Continue { emit } => text.push_str(&emit),
                StopCheck::Stopped { emit, .. } => {
                    text.push_str(&emit);
                    reason = FinishReason::Stop;
                }
            }
        }
        text.push_str(&self.stops.finish());
        let _ = self.events.send(GenerationEvent::Finished {
            choice: self.choice,
            reason,
            text,
        });
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: SchedulerConfig = SchedulerConfig {
        max_batch_size: 32,
        step_token_budget: 256,
        prefill_chunk: 128,
    };

    #[test]
    fn a_long_prompt_is_prefilled_in_chunks() {
        assert_eq!(plan_prefill(4, &[1000], CFG), [(0, 128)]);
    }

    #[test]
    fn short_prompts_share_one_step_within_the_budget() {
        // 256 - 6 decoding = 250: 100 + 128 fit, the next 128-chunk does not.
        assert_eq!(plan_prefill(6, &[100, 500, 500], CFG), [(0, 100), (1, 128)]);
    }

    #[test]
    fn the_first_prompt_progresses_even_when_decoding_fills_the_budget() {
        assert_eq!(plan_prefill(300, &[50, 10], CFG), [(0, 50)]);
    }
}
