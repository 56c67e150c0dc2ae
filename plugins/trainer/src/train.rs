//! [`Trainer`]: the Prefix-RFT training loop over one adapter on the frozen base.
//!
//! Reference log-probabilities (parent version, or the bare base for a first version) are
//! computed once before the first step and cached per example; each example's prompt runs
//! once and its key/values are shared by every continuation scored after it (chosen and
//! rejected of a pair). One step: forward every example of the batch, sum the DPO, SFT and
//! KTO terms ([`crate::objective`]), backward, clip the global gradient norm, AdamW with a
//! linear warm-up then cosine learning rate. Shuffling is seeded, so a run is reproducible
//! bit for bit on the same machine. [`Trainer::batch_gradients`] and [`Trainer::pair_logps`]
//! give one batch's loss, gradient and log-probabilities without a step, so the objective can
//! be checked against TRL's `DPOTrainer` (tests/trl_dpo.rs). This module does no I/O: files
//! and JSON live in the plugin and the CLI.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use prefix_rft_engine::model::AdapterWeights;
use prefix_rft_engine::quant::{is_background_thread, num_threads, serial};
use prefix_rft_engine::train::{LoraConfig, PrefixConfig, TrainAdapter, TrainModel};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::TrainerError;
use crate::objective::{self, KtoParams};
use crate::rft::{self, Policy, Rewarder, RftParams};

/// A preference pair: the same prompt answered well (`chosen`) and badly (`rejected`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Prompt tokens (the chat template already applied).
    pub prompt: Vec<u32>,
    /// Preferred completion tokens.
    pub chosen: Vec<u32>,
    /// Dispreferred completion tokens.
    pub rejected: Vec<u32>,
}

/// A demonstration (a correction or a thumbs-up answer), trained with SFT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demonstration {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Completion tokens to imitate.
    pub completion: Vec<u32>,
}

/// An unpaired thumbs up or down, trained with KTO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpaired {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Completion tokens.
    pub completion: Vec<u32>,
    /// True for a thumbs up, false for a thumbs down.
    pub desirable: bool,
}

/// Tokenised training data of one adapter, plus the held-out pairs of the eval gate.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Preference pairs (DPO).
    pub pairs: Vec<Pair>,
    /// Demonstrations (SFT).
    pub demonstrations: Vec<Demonstration>,
    /// Unpaired thumbs (KTO).
    pub unpaired: Vec<Unpaired>,
    /// Held-out pairs, never trained on; when empty the training pairs are evaluated.
    pub eval_pairs: Vec<Pair>,
}

impl Dataset {
    /// Training examples of every kind.
    pub fn len(&self) -> usize {
        self.pairs.len() + self.demonstrations.len() + self.unpaired.len()
    }

    /// True when there is nothing to train on.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn validate(&self) -> Result<(), TrainerError> {
        if self.is_empty() {
            return Err(TrainerError::Data(
                "no pairs, demonstrations or unpaired examples".into(),
            ));
        }
        let check = |what: &str, i: usize, prompt: &[u32], completions: &[&[u32]]| {
            if prompt.is_empty() {
                return Err(TrainerError::Data(format!(
                    "{what} {i} has an empty prompt"
                )));
            }
            if completions.iter().any(|c| c.is_empty()) {
                return Err(TrainerError::Data(format!(
                    "{what} {i} has an empty completion"
                )));
            }
            Ok(())
        };
        for (i, p) in self.pairs.iter().enumerate() {
            check("pair", i, &p.prompt, &[&p.chosen, &p.rejected])?;
        }
        for (i, p) in self.eval_pairs.iter().enumerate() {
            check("eval pair", i, &p.prompt, &[&p.chosen, &p.rejected])?;
        }
        for (i, d) in self.demonstrations.iter().enumerate() {
            check("demonstration", i, &d.prompt, &[&d.completion])?;
        }
        for (i, u) in self.unpaired.iter().enumerate() {
            check("unpaired example", i, &u.prompt, &[&u.completion])?;
        }
        Ok(())
    }
}

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainParams {
    /// Optimiser steps; when unset, `epochs` passes over the data.
    pub steps: Option<usize>,
    /// Passes over the data (used when `steps` is unset).
    pub epochs: usize,
    /// Examples (of any kind) per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// DPO and KTO temperature β.
    pub beta: f64,
    /// SFT weight α.
    pub alpha: f64,
    /// KTO weight of a desirable example.
    pub kto_desirable_weight: f64,
    /// KTO weight of an undesirable example.
    pub kto_undesirable_weight: f64,
    /// Share of the steps spent warming the learning rate up linearly.
    pub warmup_ratio: f64,
    /// Global gradient-norm bound (0 disables clipping).
    pub max_grad_norm: f64,
    /// Seed of the shuffling.
    pub seed: u64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            steps: None,
            epochs: 1,
            batch_size: 4,
            lr: 5e-5,
            beta: 0.1,
            alpha: 1.0,
            kto_desirable_weight: 1.0,
            kto_undesirable_weight: 1.0,
            warmup_ratio: 0.1,
            max_grad_norm: 1.0,
            seed: 0,
            weight_decay: 0.0,
        }
    }
}

impl TrainParams {
    /// Refuses values no run can use.
    pub fn validate(&self) -> Result<(), TrainerError> {
        let bad = |m: String| Err(TrainerError::Params(m));
        if self.batch_size == 0 {
            return bad("batch_size must be positive".into());
        }
        if self.steps == Some(0) || (self.steps.is_none() && self.epochs == 0) {
            return bad("steps and epochs must be positive".into());
        }
        for (name, v) in [
            ("lr", self.lr),
            ("beta", self.beta),
            ("alpha", self.alpha),
            ("kto_desirable_weight", self.kto_desirable_weight),
            ("kto_undesirable_weight", self.kto_undesirable_weight),
            ("max_grad_norm", self.max_grad_norm),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} = {v} must be finite and non-negative"));
            }
        }
        if self.beta == 0.0 {
            return bad("beta must be positive".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup_ratio = {} must be in [0, 1)",
                self.warmup_ratio
            ));
        }
        Ok(())
    }

    /// Steps of a run over `examples` training examples.
    pub fn total_steps(&self, examples: usize) -> usize {
        self.steps
            .unwrap_or_else(|| self.epochs * examples.div_ceil(self.batch_size.max(1)))
    }

    /// The learning rate of 0-based `step` of `total`: linear warm-up over the first
    /// `⌈warmup_ratio · total⌉` steps (reaching the peak on the last of them), then a cosine
    /// decay towards 0 over the rest.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = (self.warmup_ratio * total as f64).ceil() as usize;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let rest = total.saturating_sub(warmup).max(1);
        let progress = (step - warmup) as f64 / rest as f64;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What the policy is compared against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// The bare base model (adapter off): a first version.
    Base,
    /// The adapter's own values before training: the parent version it was loaded from.
    Initial,
}

/// One step's report to the progress callback.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps in the run.
    pub total: usize,
    /// This step's loss.
    pub loss: f64,
    /// This step's learning rate.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Preference pairs trained per second so far.
    pub pairs_per_s: f64,
    /// Training examples of any kind per second so far.
    pub examples_per_s: f64,
}

/// Preference metrics over pairs (the eval gate's inputs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalMetrics {
    /// Pairs evaluated.
    pub pairs: usize,
    /// Share of pairs with positive implicit reward margin `ρ_w − ρ_l`.
    pub reward_accuracy: f64,
    /// Mean `ρ_w − ρ_l`.
    pub reward_margin: f64,
    /// Share of pairs whose chosen answer is more likely than the rejected one.
    pub logp_accuracy: f64,
    /// Mean `log π(y_w) − log π(y_l)`.
    pub logp_margin: f64,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainMetrics {
    /// Steps run.
    pub steps: usize,
    /// Loss of every step.
    pub losses: Vec<f64>,
    /// Gradient norm (before clipping) of every step.
    pub grad_norms: Vec<f64>,
    /// Learning rate of every step.
    pub lrs: Vec<f64>,
    /// Preference metrics before the first step.
    pub eval_before: Option<EvalMetrics>,
    /// Preference metrics after the last step.
    pub eval_after: Option<EvalMetrics>,
    /// True when the eval used held-out pairs, false when it used the training pairs.
    pub eval_held_out: bool,
    /// Wall-clock seconds of the optimisation steps (reference and eval passes excluded).
    pub train_seconds: f64,
    /// Wall-clock seconds of the reference pass (every example's reference log-probabilities,
    /// computed once before the first step). A trainer that runs its reference inside each
    /// step (TRL's `DPOTrainer`) counts it in its step time: compare with the sum.
    pub reference_seconds: f64,
    /// Pairs per second over the run.
    pub pairs_per_s: f64,
    /// Training examples: pairs, demonstrations, unpaired.
    pub examples: (usize, usize, usize),
    /// Mean reward of the RFT rollouts of every step that had any (empty without a reward).
    pub rft_rewards: Vec<f64>,
}

/// A trained adapter and its metrics.
#[derive(Debug, Clone)]
pub struct TrainOutput {
    /// The trained weights, in the serving form.
    pub weights: AdapterWeights,
    /// What the run measured.
    pub metrics: TrainMetrics,
}

/// Summed completion log-probabilities `[continuations]` of `prompt` followed by each
/// continuation, with the prompt run once.
fn score(
    model: &TrainModel,
    prompt: &[u32],
    continuations: &[&[u32]],
    adapter: Option<&TrainAdapter>,
) -> Result<Tensor, TrainerError> {
    let cache = model.prompt_cache(prompt, adapter)?;
    let lp = model.continuation_logprobs(&cache, continuations, adapter)?;
    Ok(lp.sum(1)?)
}

/// The (chosen, rejected) values of `scores` `[2]`.
fn pair_values(scores: &Tensor) -> Result<(f64, f64), TrainerError> {
    let v = scores.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    match v.as_slice() {
        [w, l] => Ok((*w, *l)),
        _ => Err(TrainerError::Data(
            "a pair scored to the wrong shape".into(),
        )),
    }
}

/// Summed completion log-probabilities of `p`'s chosen and rejected answers.
fn score_pair(
    model: &TrainModel,
    p: &Pair,
    adapter: Option<&TrainAdapter>,
) -> Result<(f64, f64), TrainerError> {
    pair_values(&score(
        model,
        &p.prompt,
        &[&p.chosen, &p.rejected],
        adapter,
    )?)
}

/// A loss's value and its gradient for each of `vars` (detached; `None` where it has none).
fn loss_grads(loss: &Tensor, vars: &[Var]) -> Result<(f64, Vec<Option<Tensor>>), TrainerError> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let store = loss.backward()?;
    let grads = vars
        .iter()
        .map(|v| store.get(v.as_tensor()).map(Tensor::detach))
        .collect();
    Ok((value, grads))
}

/// What one pair's micro-batch contributes to a step.
struct PairOut {
    loss: f64,
    grads: Vec<Option<Tensor>>,
    /// The reference values its forward gave, when they were pending.
    filled: Option<(f64, f64)>,
}

/// The DPO loss of one pair (its share of a batch of `n_pairs`) and its gradients, given its
/// reference values or, when `pending` (first step, adapter still at the reference), taking
/// them from its own forward.
fn pair_grads(
    (model, adapter): (&TrainModel, &TrainAdapter),
    p: &Pair,
    ((rw, rl), pending): ((f64, f64), bool),
    (beta, n_pairs, at): (f64, usize, StepAt),
    vars: &[Var],
) -> Result<PairOut, TrainerError> {
    let s = score(model, &p.prompt, &[&p.chosen, &p.rejected], Some(adapter))?;
    let filled = if pending {
        if at.step != 0 {
            return Err(TrainerError::Data(format!(
                "a pair has no reference values at step {}",
                at.step
            )));
        }
        // Before the first update the adapter computes what the reference does: its scores
        // are the reference's.
        Some(pair_values(&s)?)
    } else {
        None
    };
    let (rw, rl) = filled.unwrap_or((rw, rl));
    let column = |v: f64| -> Result<Tensor, TrainerError> {
        Ok(Tensor::new(vec![v], model.device())?.to_dtype(model.dtype())?)
    };
    let loss = objective::dpo_losses(
        &s.narrow(0, 0, 1)?,
        &s.narrow(0, 1, 1)?,
        &column(rw)?,
        &column(rl)?,
        beta,
    )?;
    let (loss, grads) = loss_grads(&loss.sum_all()?.affine(1.0 / n_pairs as f64, 0.0)?, vars)?;
    Ok(PairOut {
        loss,
        grads,
        filled,
    })
}

/// `f` of every item, in item order. Outside a background thread (the server trains on one,
/// beside serving) the items are shared among [`num_threads`] threads, each running its items
/// with the compute pool's work inline: independent micro-batches then keep every core busy
/// through the serial parts of a forward and backward, where one batch at a time on the pool
/// leaves its second core waiting. Each item computes the same numbers either way.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    f: &(dyn Fn(&T) -> Result<R, TrainerError> + Sync),
) -> Result<Vec<R>, TrainerError> {
    let workers = if is_background_thread() {
        1
    } else {
        num_threads().min(items.len())
    };
    if workers <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<R, TrainerError>>>> =
        items.iter().map(|_| Mutex::new(None)).collect();
    let work = || {
        serial(|| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let r = f(item);
            *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        })
    };
    std::thread::scope(|s| -> Result<(), TrainerError> {
        let helpers = (1..workers)
            .map(|_| {
                std::thread::Builder::new()
                    .name("trainer".into())
                    .stack_size(WORKER_STACK)
                    .spawn_scoped(s, work)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrainerError::Data(format!("starting a trainer thread: {e}")))?;
        work();
        for h in helpers {
            h.join()
                .map_err(|_| TrainerError::Data("a trainer thread panicked".into()))?;
        }
        Ok(())
    })?;
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or_else(|| Err(TrainerError::Data("an item was not computed".into())))
        })
        .collect()
}

/// Stack of a trainer thread (candle's backward walks the graph recursively).
const WORKER_STACK: usize = 16 << 20;

/// `examples` in a fresh random order, reversed: batches pop from the back, so they follow
/// the drawn order.
fn shuffled(examples: &[Example], rng: &mut ChaCha8Rng) -> Vec<Example> {
    let mut order = examples.to_vec();
    order.shuffle(rng);
    order.reverse();
    order
}

/// Preference metrics of `scores` (policy chosen, rejected) against their reference `refs`;
/// `None` for no pairs.
fn eval_metrics(scores: &[(f64, f64)], refs: &[(f64, f64)]) -> Option<EvalMetrics> {
    if scores.is_empty() {
        return None;
    }
    let (mut r_acc, mut r_margin, mut l_acc, mut l_margin) = (0usize, 0.0, 0usize, 0.0);
    for (&(w, l), &(rw, rl)) in scores.iter().zip(refs) {
        let reward = (w - rw) - (l - rl);
        r_acc += usize::from(reward > 0.0);
        r_margin += reward;
        l_acc += usize::from(w > l);
        l_margin += w - l;
    }
    let n = scores.len() as f64;
    Some(EvalMetrics {
        pairs: scores.len(),
        reward_accuracy: r_acc as f64 / n,
        reward_margin: r_margin / n,
        logp_accuracy: l_acc as f64 / n,
        logp_margin: l_margin / n,
    })
}

/// Summed completion log-probabilities of one preference pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairLogps {
    /// `log π(chosen | prompt)` under the adapter being trained.
    pub policy_chosen: f64,
    /// `log π(rejected | prompt)` under the adapter being trained.
    pub policy_rejected: f64,
    /// `log π_ref(chosen | prompt)`.
    pub reference_chosen: f64,
    /// `log π_ref(rejected | prompt)`.
    pub reference_rejected: f64,
}

/// The loss of one batch and its gradient, before any update.
#[derive(Debug, Clone)]
pub struct BatchGradients {
    /// The batch loss, as a step's [`Progress::loss`] reports it.
    pub loss: f64,
    /// The gradient of every trainable variable (before clipping), under its name and in the
    /// order of [`TrainAdapter::named_vars`].
    pub grads: Vec<(String, Tensor)>,
}

/// A training example, by kind and index into the [`Dataset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Example {
    Pair(usize),
    Demo(usize),
    Unpaired(usize),
}

impl Example {
    /// Every training example of `data`: pairs, then demonstrations, then unpaired.
    fn all(data: &Dataset) -> Vec<Example> {
        let mut out: Vec<Example> = (0..data.pairs.len()).map(Example::Pair).collect();
        out.extend((0..data.demonstrations.len()).map(Example::Demo));
        out.extend((0..data.unpaired.len()).map(Example::Unpaired));
        out
    }
}

/// Reference log-probabilities, computed once.
#[derive(Debug, Clone, Default)]
struct ReferenceCache {
    pairs: Vec<(f64, f64)>,
    /// Pairs of the first batch whose reference values the first step's forward gives (the
    /// adapter still equals the reference there), per pair.
    pending: Vec<bool>,
    eval_pairs: Vec<(f64, f64)>,
    unpaired: Vec<f64>,
}

/// A training run over one adapter.
pub struct Trainer<'m> {
    model: &'m TrainModel,
    adapter: TrainAdapter,
    reference: Reference,
    params: TrainParams,
    /// Prefix-guided RFT on demonstrations, when the adapter has a reward.
    rft: Option<(RftParams, &'m dyn Rewarder)>,
}

/// One batch's loss, its gradient per variable, and the rewards of its RFT rollouts.
struct BatchOut {
    loss: f64,
    grads: Vec<Tensor>,
    rewards: Vec<f64>,
}

/// Where a step is in its run (the RFT prefix schedule and rollout seeds depend on it).
#[derive(Debug, Clone, Copy)]
struct StepAt {
    step: usize,
    total: usize,
}

impl<'m> Trainer<'m> {
    /// A run over `adapter` (fresh, or already holding a parent's values) against `reference`.
    pub fn new(
        model: &'m TrainModel,
        adapter: TrainAdapter,
        reference: Reference,
        params: TrainParams,
    ) -> Result<Self, TrainerError> {
        params.validate()?;
        Ok(Trainer {
            model,
            adapter,
            reference,
            params,
            rft: None,
        })
    }

    /// Adds prefix-guided RFT ([`crate::rft`]) on every demonstration, scored by `rewarder`.
    pub fn with_rft(
        mut self,
        params: RftParams,
        rewarder: &'m dyn Rewarder,
    ) -> Result<Self, TrainerError> {
        params.validate()?;
        self.rft = Some((params, rewarder));
        Ok(self)
    }

    /// A first version: a freshly initialised adapter, compared against the bare base.
    pub fn fresh(
        model: &'m TrainModel,
        lora: Option<&LoraConfig>,
        prefix: Option<&PrefixConfig>,
        params: TrainParams,
    ) -> Result<Self, TrainerError> {
        let adapter =
            TrainAdapter::new(model.config(), lora, prefix, model.dtype(), model.device())?;
        Self::new(model, adapter, Reference::Base, params)
    }

    /// A next version: the parent's weights continue training and are the reference.
    pub fn from_parent(
        model: &'m TrainModel,
        parent: &AdapterWeights,
        params: TrainParams,
    ) -> Result<Self, TrainerError> {
        let adapter = adapter_from_weights(model, parent)?;
        Self::new(model, adapter, Reference::Initial, params)
    }

    /// The adapter being trained.
    pub fn adapter(&self) -> &TrainAdapter {
        &self.adapter
    }

    /// Summed completion log-probabilities `[continuations]` of `prompt` followed by each
    /// continuation, with the prompt run once.
    fn score(
        &self,
        prompt: &[u32],
        continuations: &[&[u32]],
        adapter: Option<&TrainAdapter>,
    ) -> Result<Tensor, TrainerError> {
        score(self.model, prompt, continuations, adapter)
    }

    fn score_f64(
        &self,
        prompt: &[u32],
        continuations: &[&[u32]],
        adapter: Option<&TrainAdapter>,
    ) -> Result<Vec<f64>, TrainerError> {
        let s = self.score(prompt, continuations, adapter)?.detach();
        Ok(s.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    fn reference_adapter(&self) -> Option<&TrainAdapter> {
        match self.reference {
            Reference::Base => None,
            Reference::Initial => Some(&self.adapter),
        }
    }

    /// Reference log-probabilities of every pair and unpaired example, except the pairs
    /// `deferred` (left pending for the first step); must run before the first update when the
    /// reference is the adapter's initial values.
    fn reference_cache(
        &self,
        data: &Dataset,
        deferred: &[usize],
    ) -> Result<ReferenceCache, TrainerError> {
        let r = self.reference_adapter();
        let mut pending = vec![false; data.pairs.len()];
        for &i in deferred {
            if let Some(p) = pending.get_mut(i) {
                *p = true;
            }
        }
        let model = self.model;
        let todo: Vec<(&Pair, bool)> = data.pairs.iter().zip(pending.iter().copied()).collect();
        let pairs = parallel_map(&todo, &|&(p, skip)| {
            if skip {
                Ok((f64::NAN, f64::NAN))
            } else {
                score_pair(model, p, r)
            }
        })?;
        let eval_pairs = parallel_map(&data.eval_pairs, &|p| score_pair(model, p, r))?;
        let unpaired = data
            .unpaired
            .iter()
            .map(|u| {
                let s = self.score_f64(&u.prompt, &[&u.completion], r)?;
                s.first()
                    .copied()
                    .ok_or_else(|| TrainerError::Data("empty score".into()))
            })
            .collect::<Result<Vec<_>, TrainerError>>()?;
        Ok(ReferenceCache {
            pairs,
            pending,
            eval_pairs,
            unpaired,
        })
    }

    /// Preference metrics of the current adapter over `pairs` given their reference
    /// log-probabilities.
    fn evaluate(
        &self,
        pairs: &[Pair],
        refs: &[(f64, f64)],
    ) -> Result<Option<EvalMetrics>, TrainerError> {
        let (model, adapter) = (self.model, &self.adapter);
        let scores = parallel_map(pairs, &|p| score_pair(model, p, Some(adapter)))?;
        Ok(eval_metrics(&scores, refs))
    }

    /// Whether the adapter as it is now computes exactly what the reference computes: the
    /// reference is its own initial values, or it is the bare base and the adapter a LoRA
    /// whose `B` factors are all zero (a fresh one adds exact zeros). Its metrics before the
    /// first step then follow from the reference pass without another pass.
    fn policy_is_reference(&self) -> Result<bool, TrainerError> {
        match self.reference {
            Reference::Initial => Ok(true),
            Reference::Base => {
                if self.adapter.prefix_len() > 0 {
                    return Ok(false);
                }
                for (_, l) in self.adapter.lora_layers() {
                    let b = l.b.as_tensor();
                    let nonzero = b.ne(&b.zeros_like()?)?.to_dtype(DType::F32)?.sum_all()?;
                    if nonzero.to_scalar::<f32>()? > 0.0 {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
        }
    }

    /// The loss of one batch and its gradient for each of `vars`, accumulated over
    /// micro-batches so that only one example's graph is alive at a time: each pair and each
    /// demonstration is its own micro-batch (the DPO mean and the token-normalised SFT term
    /// split exactly), the unpaired examples one more (KTO's reference point is a batch
    /// statistic). The sum equals the whole batch's loss and gradient.
    fn batch_grads(
        &self,
        data: &Dataset,
        refs: &mut ReferenceCache,
        batch: &[Example],
        vars: &[Var],
        at: StepAt,
    ) -> Result<BatchOut, TrainerError> {
        let mut rewards = Vec::new();
        let a = Some(&self.adapter);
        let device = self.model.device();
        let dtype = self.model.dtype();
        let column = |v: Vec<f64>| -> Result<Tensor, TrainerError> {
            Ok(Tensor::new(v, device)?.to_dtype(dtype)?)
        };
        let n_pairs = batch
            .iter()
            .filter(|e| matches!(e, Example::Pair(_)))
            .count();
        let demo_tokens: usize = batch
            .iter()
            .map(|e| match e {
                Example::Demo(i) => data.demonstrations[*i].completion.len(),
                _ => 0,
            })
            .sum();
        let n_demos = batch
            .iter()
            .filter(|e| matches!(e, Example::Demo(_)))
            .count();
        // Pairs are independent micro-batches: they run on threads of their own, and their
        // losses and gradients are added below in batch order (the same sums as one by one).
        let pair_items: Vec<usize> = batch
            .iter()
            .filter_map(|e| match e {
                Example::Pair(i) => Some(*i),
                _ => None,
            })
            .collect();
        let (model, adapter, beta) = (self.model, &self.adapter, self.params.beta);
        let cache: &ReferenceCache = refs;
        let mut pair_outs = parallel_map(&pair_items, &|&i| {
            pair_grads(
                (model, adapter),
                &data.pairs[i],
                (cache.pairs[i], cache.pending[i]),
                (beta, n_pairs, at),
                vars,
            )
        })?
        .into_iter();
        let mut total = 0.0;
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut add = |value: f64, gs: Vec<Option<Tensor>>| -> Result<(), TrainerError> {
            total += value;
            for (acc, g) in grads.iter_mut().zip(gs) {
                if let Some(g) = g {
                    *acc = Some(match acc.take() {
                        Some(prev) => (prev + g)?,
                        None => g,
                    });
                }
            }
            Ok(())
        };

        let (mut un, mut un_ref, mut un_desirable) = (vec![], vec![], vec![]);
        for &ex in batch {
            match ex {
                Example::Pair(i) => {
                    let out = pair_outs
                        .next()
                        .ok_or_else(|| TrainerError::Data(format!("pair {i} was not computed")))?;
                    if let Some(filled) = out.filled {
                        refs.pairs[i] = filled;
                        refs.pending[i] = false;
                    }
                    add(out.loss, out.grads)?;
                }
                Example::Demo(i) => {
                    let d = &data.demonstrations[i];
                    if self.params.alpha > 0.0 {
                        let s = self.score(&d.prompt, &[&d.completion], a)?;
                        let sft = objective::sft_loss(&s, demo_tokens)?;
                        let (v, gs) = loss_grads(&sft.affine(self.params.alpha, 0.0)?, vars)?;
                        add(v, gs)?;
                    }
                    if let Some(group) = self.rft_group(d, i, at)? {
                        rewards.extend(&group.rewards);
                        if let Some(loss) = group.loss {
                            let weight = self.rft.as_ref().map_or(0.0, |(p, _)| p.weight);
                            let (v, gs) =
                                loss_grads(&loss.affine(weight / n_demos as f64, 0.0)?, vars)?;
                            add(v, gs)?;
                        }
                    }
                }
                Example::Unpaired(i) => {
                    let u = &data.unpaired[i];
                    un.push(self.score(&u.prompt, &[&u.completion], a)?);
                    un_ref.push(refs.unpaired[i]);
                    un_desirable.push(u.desirable);
                }
            }
        }
        if !un.is_empty() {
            let rho = (Tensor::cat(&un, 0)? - column(un_ref)?)?;
            let z0 = objective::kto_reference_point(&rho)?;
            let kto = KtoParams {
                beta: self.params.beta,
                desirable_weight: self.params.kto_desirable_weight,
                undesirable_weight: self.params.kto_undesirable_weight,
            };
            let kto = objective::kto_losses(&rho, &un_desirable, z0, kto)?.mean_all()?;
            let (v, gs) = loss_grads(&kto, vars)?;
            add(v, gs)?;
        }
        let grads = grads
            .into_iter()
            .zip(vars)
            .map(|(g, v)| match g {
                Some(g) => Ok(g),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<Vec<_>, TrainerError>>()?;
        Ok(BatchOut {
            loss: total,
            grads,
            rewards,
        })
    }

    /// The scored RFT group of demonstration `index` at `at`, when the run has a reward: the
    /// rollouts are seeded by the run's seed, the step and the example, so a run repeats.
    fn rft_group(
        &self,
        d: &Demonstration,
        index: usize,
        at: StepAt,
    ) -> Result<Option<rft::GroupLoss>, TrainerError> {
        let Some((params, rewarder)) = &self.rft else {
            return Ok(None);
        };
        let seed = self.params.seed ^ ((at.step as u64) << 32) ^ index as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let lower = params.lower_at(at.step, at.total);
        let prefix = params.prefix_len(d.completion.len(), lower, &mut rng);
        let policy = Policy {
            model: self.model,
            adapter: &self.adapter,
        };
        let rollouts =
            rft::sample_group(policy, &d.prompt, &d.completion, prefix, params, &mut rng)?;
        let tokens: Vec<Vec<u32>> = rollouts.iter().map(|r| r.tokens.clone()).collect();
        let rewards = rewarder
            .score(&d.prompt, &tokens)
            .map_err(TrainerError::Reward)?;
        if rewards.len() != tokens.len() {
            return Err(TrainerError::Reward(format!(
                "{} scores for {} completions",
                rewards.len(),
                tokens.len()
            )));
        }
        if let Some(bad) = rewards.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            return Err(TrainerError::Reward(format!(
                "score {bad} is outside [0, 1]"
            )));
        }
        Ok(Some(rft::group_loss(
            policy, &d.prompt, &rollouts, rewards, params,
        )?))
    }

    /// Summed completion log-probabilities of `pair` under the adapter as it is now and under
    /// the reference.
    pub fn pair_logps(&self, pair: &Pair) -> Result<PairLogps, TrainerError> {
        let (policy_chosen, policy_rejected) = score_pair(self.model, pair, Some(&self.adapter))?;
        let (reference_chosen, reference_rejected) =
            score_pair(self.model, pair, self.reference_adapter())?;
        Ok(PairLogps {
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
        })
    }

    /// The loss of every training example of `data` taken as one batch, and its gradient,
    /// with the adapter as it is now and nothing updated: what the first step of
    /// [`Trainer::run`] optimises (before clipping) when its batch is the whole data set. It
    /// lets the objective be checked against another implementation on the same batch.
    pub fn batch_gradients(&self, data: &Dataset) -> Result<BatchGradients, TrainerError> {
        data.validate()?;
        let mut refs = self.reference_cache(data, &[])?;
        let (names, vars): (Vec<String>, Vec<Var>) = self.adapter.named_vars().into_iter().unzip();
        let at = StepAt { step: 0, total: 1 };
        let BatchOut { loss, grads, .. } =
            self.batch_grads(data, &mut refs, &Example::all(data), &vars, at)?;
        Ok(BatchGradients {
            loss,
            grads: names.into_iter().zip(grads).collect(),
        })
    }

    /// Runs the whole training. `on_progress` is called after every step; `cancelled` is
    /// polled before every step and stops the run with [`TrainerError::Cancelled`].
    pub fn run(
        self,
        data: &Dataset,
        on_progress: &mut dyn FnMut(&Progress),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<TrainOutput, TrainerError> {
        data.validate()?;
        let total = self.params.total_steps(data.len());
        let examples = Example::all(data);
        let mut rng = ChaCha8Rng::seed_from_u64(self.params.seed);
        // The first epoch's order is drawn before the reference pass (the generator serves
        // nothing else), so the first batch is known: while the adapter equals its reference,
        // the first step's forward gives those pairs' reference values, and the pass skips
        // them.
        let mut order = shuffled(&examples, &mut rng);
        let at_reference = self.policy_is_reference()?;
        let deferred: Vec<usize> = if at_reference && total > 0 {
            order
                .iter()
                .rev()
                .take(self.params.batch_size)
                .filter_map(|e| match e {
                    Example::Pair(i) => Some(*i),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        let reference_start = Instant::now();
        let mut refs = self.reference_cache(data, &deferred)?;
        let reference_seconds = reference_start.elapsed().as_secs_f64();
        let (eval_set, held_out) = if data.eval_pairs.is_empty() {
            (&data.pairs, false)
        } else {
            (&data.eval_pairs, true)
        };
        // At the reference, the metrics follow from its values (once the first step has
        // filled them in).
        let eval_before = if at_reference {
            None
        } else {
            let eval_refs = if held_out {
                &refs.eval_pairs
            } else {
                &refs.pairs
            };
            Some(self.evaluate(eval_set, eval_refs)?)
        };

        let vars = self.adapter.vars();
        let mut opt = AdamW::new(&vars, self.params.weight_decay)?;
        let (mut losses, mut norms, mut lrs, mut rft_rewards) = (vec![], vec![], vec![], vec![]);
        let (mut pairs_done, mut examples_done) = (0usize, 0usize);
        let start = Instant::now();
        for step in 0..total {
            if cancelled() {
                return Err(TrainerError::Cancelled { step, total });
            }
            let mut batch = Vec::with_capacity(self.params.batch_size);
            while batch.len() < self.params.batch_size {
                if order.is_empty() {
                    order = shuffled(&examples, &mut rng);
                }
                // A batch is never larger than the data.
                if batch.len() >= examples.len() {
                    break;
                }
                if let Some(ex) = order.pop() {
                    batch.push(ex);
                }
            }
            let at = StepAt { step, total };
            let BatchOut {
                loss: loss_value,
                mut grads,
                rewards,
            } = self.batch_grads(data, &mut refs, &batch, &vars, at)?;
            if !rewards.is_empty() {
                rft_rewards.push(rewards.iter().sum::<f64>() / rewards.len() as f64);
            }
            if !loss_value.is_finite() {
                return Err(TrainerError::Diverged {
                    step,
                    loss: loss_value,
                });
            }
            let norm = clip_grad_norm(&mut grads, self.params.max_grad_norm)?;
            if !norm.is_finite() {
                return Err(TrainerError::Diverged {
                    step,
                    loss: loss_value,
                });
            }
            let lr = self.params.lr_at(step, total);
            opt.step(&vars, &grads, lr)?;

            pairs_done += batch
                .iter()
                .filter(|e| matches!(e, Example::Pair(_)))
                .count();
            examples_done += batch.len();
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            losses.push(loss_value);
            norms.push(norm);
            lrs.push(lr);
            on_progress(&Progress {
                step: step + 1,
                total,
                loss: loss_value,
                lr,
                grad_norm: norm,
                pairs_per_s: pairs_done as f64 / secs,
                examples_per_s: examples_done as f64 / secs,
            });
        }
        let train_seconds = start.elapsed().as_secs_f64();
        if refs.pending.iter().any(|&p| p) {
            return Err(TrainerError::Data(
                "the first step left reference values unfilled".into(),
            ));
        }
        let eval_refs = if held_out {
            &refs.eval_pairs
        } else {
            &refs.pairs
        };
        let eval_before = match eval_before {
            Some(m) => m,
            None => eval_metrics(eval_refs, eval_refs),
        };
        let eval_after = self.evaluate(eval_set, eval_refs)?;
        let weights = self.adapter.to_weights(self.model.config())?;
        Ok(TrainOutput {
            weights,
            metrics: TrainMetrics {
                steps: total,
                losses,
                grad_norms: norms,
                lrs,
                eval_before,
                eval_after,
                eval_held_out: held_out,
                train_seconds,
                reference_seconds,
                pairs_per_s: pairs_done as f64 / train_seconds.max(1e-9),
                examples: (
                    data.pairs.len(),
                    data.demonstrations.len(),
                    data.unpaired.len(),
                ),
                rft_rewards,
            },
        })
    }
}

/// Builds a trainable adapter shaped like `weights` (same rank, scale, targets, virtual
/// tokens) and holding its values, to continue training a parent version.
pub fn adapter_from_weights(
    model: &TrainModel,
    weights: &AdapterWeights,
) -> Result<TrainAdapter, TrainerError> {
    let mut lora_cfg = None;
    if let Some((_, first)) = weights.lora().next() {
        if weights
            .lora()
            .any(|(_, l)| l.rank != first.rank || l.scale != first.scale)
        {
            return Err(TrainerError::Parent(
                "LoRA pairs of different ranks or scales".into(),
            ));
        }
        lora_cfg = Some(LoraConfig {
            rank: first.rank,
            alpha: first.scale as f64 * first.rank as f64,
            rslora: false,
            targets: weights.targets(),
            seed: 0,
        });
    }
    let prefix_cfg = weights.prefix().map(|p| PrefixConfig {
        num_virtual_tokens: p.num_virtual_tokens,
        init_std: 0.0,
        seed: 0,
    });
    let adapter = TrainAdapter::new(
        model.config(),
        lora_cfg.as_ref(),
        prefix_cfg.as_ref(),
        model.dtype(),
        model.device(),
    )?;
    load_weights(&adapter, weights)?;
    Ok(adapter)
}

/// Sets every `Var` of `adapter` from `weights`, which must have the same shapes. LoRA pairs
/// `weights` lacks are zeroed (B = 0 is "no delta", as the serving side reads a missing pair).
pub fn load_weights(adapter: &TrainAdapter, weights: &AdapterWeights) -> Result<(), TrainerError> {
    let set = |var: &Var, values: &[f32], what: &str| -> Result<(), TrainerError> {
        let t = var.as_tensor();
        if t.elem_count() != values.len() {
            return Err(TrainerError::Parent(format!(
                "{what}: {} values for a tensor of shape {:?}",
                values.len(),
                t.dims()
            )));
        }
        let new = Tensor::from_slice(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
        var.set(&new)?;
        Ok(())
    };
    for (&(layer, proj), l) in weights.lora() {
        let target = adapter.lora(layer, proj).ok_or_else(|| {
            TrainerError::Parent(format!(
                "LoRA on layer {layer} {} is not in the adapter",
                proj.module_name()
            ))
        })?;
        let what = format!("layer {layer} {}", proj.module_name());
        set(&target.a, &l.a, &what)?;
        set(&target.b, &l.b, &what)?;
    }
    for (&(layer, proj), l) in adapter.lora_layers() {
        if !weights.lora().any(|(&k, _)| k == (layer, proj)) {
            l.b.set(&l.b.as_tensor().zeros_like()?)?;
        }
    }
    match (weights.prefix(), adapter.prefix_len()) {
        (None, 0) => {}
        (Some(p), n) if p.num_virtual_tokens == n => {
            for (layer, (k, v)) in p.layers.iter().enumerate() {
                let target = adapter.prefix(layer).ok_or_else(|| {
                    TrainerError::Parent(format!("prefix layer {layer} is not in the adapter"))
                })?;
                set(&target.k, k, &format!("prefix keys of layer {layer}"))?;
                set(&target.v, v, &format!("prefix values of layer {layer}"))?;
            }
        }
        (p, n) => {
            return Err(TrainerError::Parent(format!(
                "the weights have {} virtual tokens, the adapter {n}",
                p.map_or(0, |p| p.num_virtual_tokens)
            )))
        }
    }
    Ok(())
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (0 disables) and
/// returns the norm before clipping, as `torch.nn.utils.clip_grad_norm_` does.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainerError> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = g.affine(scale, 0.0)?;
        }
    }
    Ok(norm)
}

/// AdamW (Loshchilov & Hutter; the update of `torch.optim.AdamW`): moments with β = (0.9,
/// 0.999), ε = 1e-8, bias correction, and weight decay applied to the parameter directly
/// (`θ ← θ − lr·λ·θ`) rather than through the gradient. Our own rather than candle-nn's so
/// the learning rate changes per step and clipped gradients go in without a `GradStore`.
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
    weight_decay: f64,
}

const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

impl AdamW {
    fn new(vars: &[Var], weight_decay: f64) -> Result<Self, TrainerError> {
        let zeros = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AdamW {
            m: zeros.clone(),
            v: zeros,
            t: 0,
            weight_decay,
        })
    }

    fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<(), TrainerError> {
        self.t += 1;
        let c1 = 1.0 - ADAM_BETA1.powi(self.t);
        let c2 = 1.0 - ADAM_BETA2.powi(self.t);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * ADAM_BETA1)? + (g * (1.0 - ADAM_BETA1))?)?;
            let v = ((&self.v[i] * ADAM_BETA2)? + (g.sqr()? * (1.0 - ADAM_BETA2))?)?;
            let theta = var.as_tensor().detach();
            let decayed = (&theta * (1.0 - lr * self.weight_decay))?;
            let denom = ((&v / c2)?.sqrt()? + ADAM_EPS)?;
            let update = ((&m / c1)? / denom)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use prefix_rft_engine::model::Proj;
    use prefix_rft_engine::quant::GgmlDType;
    use prefix_rft_engine::testing::{load_tiny_gguf, TinySpec};
    use prefix_rft_engine::train::TrainOptions;
    use std::cell::Cell;

    fn tiny() -> TrainModel {
        let dir = tempfile::tempdir().expect("tempdir");
        let llama = load_tiny_gguf(dir.path(), &TinySpec::default(), GgmlDType::Q8_0);
        let opts = TrainOptions {
            dtype: DType::F32,
            quantized_base: true,
        };
        TrainModel::from_llama(&llama, &Device::Cpu, opts).expect("train model")
    }

    fn lora(rank: usize) -> LoraConfig {
        LoraConfig {
            rank,
            alpha: 2.0 * rank as f64,
            rslora: false,
            targets: Proj::ALL.to_vec(),
            seed: 11,
        }
    }

    /// Pairs whose chosen answers use tokens 10..20 and rejected ones 50..60.
    fn synthetic_pairs(n: usize, seed: u64) -> Vec<Pair> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let mut draw = |lo: u32, hi: u32, len: usize| -> Vec<u32> {
                    (0..len)
                        .map(|_| rand::Rng::gen_range(&mut rng, lo..hi))
                        .collect()
                };
                Pair {
                    prompt: draw(20, 50, 5),
                    chosen: draw(10, 20, 4),
                    rejected: draw(50, 60, 4),
                }
            })
            .collect()
    }

    fn params(steps: usize) -> TrainParams {
        TrainParams {
            steps: Some(steps),
            batch_size: 4,
            lr: 5e-3,
            beta: 0.5,
            warmup_ratio: 0.1,
            seed: 3,
            ..TrainParams::default()
        }
    }

    fn train(model: &TrainModel, data: &Dataset, p: TrainParams) -> TrainOutput {
        Trainer::fresh(model, Some(&lora(4)), None, p)
            .expect("trainer")
            .run(data, &mut |_| {}, &|| false)
            .expect("run")
    }

    #[test]
    fn dpo_training_raises_margin_and_lowers_loss() {
        let model = tiny();
        let pairs = synthetic_pairs(8, 1);
        let data = Dataset {
            pairs: pairs.clone(),
            ..Dataset::default()
        };
        let mut seen = Vec::new();
        let out = Trainer::fresh(&model, Some(&lora(4)), None, params(30))
            .expect("trainer")
            .run(&data, &mut |p| seen.push(p.clone()), &|| false)
            .expect("run");
        let m = &out.metrics;
        assert_eq!(m.losses.len(), 30);
        assert_eq!(seen.len(), 30);
        assert_eq!(seen.last().map(|p| (p.step, p.total)), Some((30, 30)));
        let first = m.losses[0];
        let last4: f64 = m.losses[26..].iter().sum::<f64>() / 4.0;
        assert!(last4 < 0.5 * first, "loss {first} -> {last4}");
        let before = m.eval_before.clone().expect("eval before");
        let after = m.eval_after.clone().expect("eval after");
        assert!(!m.eval_held_out);
        // The reference is the policy at step 0 (LoRA B = 0): no margin yet.
        assert_eq!(before.reward_margin, 0.0);
        assert_eq!(before.reward_accuracy, 0.0);
        assert!(after.reward_margin > 1.0, "{after:?}");
        assert_eq!(after.reward_accuracy, 1.0, "{after:?}");
        assert!(after.logp_margin > before.logp_margin);
        println!(
            "train pairs: loss {first:.4} -> {last4:.4}, margin {:.3} -> {:.3}, {:.1} pairs/s",
            before.reward_margin, after.reward_margin, m.pairs_per_s
        );

        // Held-out pairs of the same kind move the same way, less strongly.
        let held = Dataset {
            pairs,
            eval_pairs: synthetic_pairs(6, 2),
            ..Dataset::default()
        };
        let out = train(&model, &held, params(30));
        let after = out.metrics.eval_after.expect("eval after");
        assert!(out.metrics.eval_held_out);
        assert!(after.reward_margin > 0.0, "{after:?}");
        assert!(after.reward_accuracy >= 0.5, "{after:?}");
        println!("held-out after: {after:?}");
    }

    /// The first batch's reference values come from the first step's forward (the pass skips
    /// them); they are the values the pass would have computed, for a fresh adapter against
    /// the base and for a child against its parent.
    #[test]
    fn first_step_fills_the_reference_values_the_pass_skipped() {
        let model = tiny();
        let data = Dataset {
            pairs: synthetic_pairs(6, 5),
            ..Dataset::default()
        };
        let expected = |t: &Trainer| -> (f64, usize) {
            let (mut margin, mut wins) = (0.0, 0);
            for p in &data.pairs {
                let l = t.pair_logps(p).expect("logps");
                margin += l.reference_chosen - l.reference_rejected;
                wins += usize::from(l.reference_chosen > l.reference_rejected);
            }
            (margin / data.pairs.len() as f64, wins)
        };
        let fresh = || Trainer::fresh(&model, Some(&lora(4)), None, params(3)).expect("trainer");
        let parent = train(&model, &data, params(4)).weights;
        let child = || Trainer::from_parent(&model, &parent, params(3)).expect("trainer");
        for (name, want, trainer) in [
            ("fresh", expected(&fresh()), fresh()),
            ("child", expected(&child()), child()),
        ] {
            let out = trainer.run(&data, &mut |_| {}, &|| false).expect("run");
            let before = out.metrics.eval_before.expect("eval before");
            assert_eq!(before.logp_margin, want.0, "{name}");
            assert_eq!(
                before.logp_accuracy,
                want.1 as f64 / data.pairs.len() as f64,
                "{name}"
            );
            assert_eq!(before.reward_margin, 0.0, "{name}");
            assert!((out.metrics.losses[0] - std::f64::consts::LN_2).abs() < 1e-6);
        }
    }

    #[test]
    fn parallel_map_keeps_item_order_and_reports_errors() {
        let items: Vec<usize> = (0..17).collect();
        let doubled = parallel_map(&items, &|&i| Ok(i * 2)).expect("map");
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let failed = parallel_map(&items, &|&i| {
            if i == 11 {
                Err(TrainerError::Data("eleven".into()))
            } else {
                Ok(i)
            }
        });
        assert!(matches!(failed, Err(TrainerError::Data(m)) if m == "eleven"));
        assert!(parallel_map(&[] as &[usize], &|&i| Ok(i))
            .expect("empty")
            .is_empty());
    }

    #[test]
    fn fresh_lora_starts_at_ln2() {
        let model = tiny();
        let data = Dataset {
            pairs: synthetic_pairs(4, 5),
            ..Dataset::default()
        };
        let out = train(&model, &data, params(1));
        let want = std::f64::consts::LN_2;
        assert!(
            (out.metrics.losses[0] - want).abs() < 1e-6,
            "{}",
            out.metrics.losses[0]
        );
    }

    #[test]
    fn same_seed_gives_identical_weights() {
        let model = tiny();
        let data = Dataset {
            pairs: synthetic_pairs(6, 7),
            demonstrations: vec![Demonstration {
                prompt: vec![21, 22, 23],
                completion: vec![12, 13, 14],
            }],
            unpaired: vec![
                Unpaired {
                    prompt: vec![30, 31],
                    completion: vec![55, 56],
                    desirable: false,
                },
                Unpaired {
                    prompt: vec![32, 33],
                    completion: vec![15, 16],
                    desirable: true,
                },
            ],
            ..Dataset::default()
        };
        let a = train(&model, &data, params(6));
        let b = train(&model, &data, params(6));
        assert_eq!(a.metrics.losses, b.metrics.losses);
        let flat = |w: &AdapterWeights| -> Vec<u32> {
            w.lora()
                .flat_map(|(_, l)| l.a.iter().chain(&l.b).map(|x| x.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(flat(&a.weights), flat(&b.weights));
        let c = train(
            &model,
            &data,
            TrainParams {
                seed: 4,
                ..params(6)
            },
        );
        assert_ne!(
            a.metrics.losses, c.metrics.losses,
            "the seed changes the order"
        );
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let dev = Device::Cpu;
        let mut grads = vec![
            Tensor::new(&[3f32, 0.0], &dev).expect("t"),
            Tensor::new(&[[0f32, 4.0]], &dev).expect("t"),
        ];
        let norm = clip_grad_norm(&mut grads, 1.0).expect("clip");
        assert!((norm - 5.0).abs() < 1e-9);
        let after = clip_grad_norm(&mut grads.clone(), 0.0).expect("norm");
        assert!(after <= 1.0 && after > 0.999, "{after}");
        let mut small = vec![Tensor::new(&[0.3f32], &dev).expect("t")];
        assert!((clip_grad_norm(&mut small, 1.0).expect("clip") - 0.3).abs() < 1e-6);
        assert_eq!(small[0].to_vec1::<f32>().expect("v"), vec![0.3]);
    }

    #[test]
    fn training_clips_gradients_at_max_norm() {
        let model = tiny();
        let data = Dataset {
            pairs: synthetic_pairs(4, 9),
            ..Dataset::default()
        };
        // Same run with and without a tiny bound: the first step's raw norm is the same, and
        // the clipped gradients (far below Adam's ε) barely move the adapter, which shows the
        // optimiser gets the clipped values.
        let tight = train(
            &model,
            &data,
            TrainParams {
                max_grad_norm: 1e-10,
                ..params(3)
            },
        );
        let loose = train(
            &model,
            &data,
            TrainParams {
                max_grad_norm: 0.0,
                ..params(3)
            },
        );
        assert_eq!(tight.metrics.grad_norms[0], loose.metrics.grad_norms[0]);
        assert!(tight.metrics.grad_norms[0] > 1e-3);
        let moved = |o: &TrainOutput| o.metrics.eval_after.clone().expect("eval").reward_margin;
        assert!(
            moved(&tight).abs() < 0.01 * moved(&loose).abs(),
            "{} vs {}",
            moved(&tight),
            moved(&loose)
        );
    }

    #[test]
    fn cancellation_stops_early() {
        let model = tiny();
        let data = Dataset {
            pairs: synthetic_pairs(4, 9),
            ..Dataset::default()
        };
        let steps = Cell::new(0);
        let err = Trainer::fresh(&model, Some(&lora(4)), None, params(10))
            .expect("trainer")
            .run(&data, &mut |p| steps.set(p.step), &|| steps.get() >= 2)
            .err();
        match err {
            Some(TrainerError::Cancelled { step: 2, total: 10 }) => {}
            other => panic!("expected cancellation at step 2, got {other:?}"),
        }
    }

    #[test]
    fn continues_from_parent_with_parent_as_reference() {
        let model = tiny();
        let data = Dataset {
            pairs: synthetic_pairs(4, 12),
            ..Dataset::default()
        };
        let parent = train(&model, &data, params(5)).weights;
        let child = Trainer::from_parent(&model, &parent, params(1)).expect("trainer");
        let copy = child.adapter().to_weights(model.config()).expect("weights");
        for ((k1, a), (k2, b)) in parent.lora().zip(copy.lora()) {
            assert_eq!(k1, k2);
            assert_eq!(a, b);
        }
        let out = child.run(&data, &mut |_| {}, &|| false).expect("run");
        // Policy == reference (the parent) at step 0.
        assert!((out.metrics.losses[0] - std::f64::consts::LN_2).abs() < 1e-6);
        assert_eq!(out.metrics.eval_before.expect("eval").reward_margin, 0.0);
    }

    #[test]
    fn prefix_adapter_trains() {
        let model = tiny();
        let data = Dataset {
            pairs: synthetic_pairs(6, 13),
            ..Dataset::default()
        };
        let prefix = PrefixConfig {
            num_virtual_tokens: 3,
            init_std: 0.1,
            seed: 2,
        };
        let p = TrainParams {
            batch_size: 6,
            lr: 2e-2,
            ..params(20)
        };
        let out = Trainer::fresh(&model, None, Some(&prefix), p)
            .expect("trainer")
            .run(&data, &mut |_| {}, &|| false)
            .expect("run");
        let m = out.metrics;
        assert!(m.losses[19] < m.losses[0], "{:?}", m.losses);
        assert!(
            m.eval_after.expect("after").reward_margin
                > m.eval_before.expect("before").reward_margin
        );
        assert_eq!(out.weights.prefix().map(|p| p.num_virtual_tokens), Some(3));
    }

    #[test]
    fn rejects_bad_data_and_params() {
        let model = tiny();
        let mut p = synthetic_pairs(1, 1);
        p[0].chosen.clear();
        let data = Dataset {
            pairs: p,
            ..Dataset::default()
        };
        let t = Trainer::fresh(&model, Some(&lora(2)), None, params(1)).expect("trainer");
        assert!(matches!(
            t.run(&data, &mut |_| {}, &|| false),
            Err(TrainerError::Data(_))
        ));
        let bad = TrainParams {
            lr: f64::NAN,
            ..params(1)
        };
        assert!(matches!(
            Trainer::fresh(&model, Some(&lora(2)), None, bad),
            Err(TrainerError::Params(_))
        ));
    }

    #[test]
    fn schedule_warms_up_then_decays_by_cosine() {
        let p = TrainParams {
            lr: 1.0,
            warmup_ratio: 0.2,
            ..TrainParams::default()
        };
        let lrs: Vec<f64> = (0..10).map(|s| p.lr_at(s, 10)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert!((lrs[2] - 1.0).abs() < 1e-12);
        assert!((lrs[6] - 0.5).abs() < 1e-12, "{lrs:?}");
        assert!(lrs.windows(2).skip(1).all(|w| w[1] <= w[0]));
        assert!(lrs[9] > 0.0);
    }
}
