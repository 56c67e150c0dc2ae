//! Prefix-guided reinforcement fine-tuning (Huang et al. 2025, "Blending Supervised and
//! Reinforcement Fine-Tuning with Prefix Sampling"), the reward term of the Prefix-RFT
//! objective, used for demonstrations when the adapter has a reward plugin.
//!
//! For a prompt `x` with a demonstration `y*`: draw a prefix ratio `l ~ U[lower, upper]`, where
//! `lower` decays by cosine from `lower_start` to `lower_end` over the run, force the first
//! `⌊l·|y*|⌋` tokens of `y*` and let the policy continue: the hybrid rollout. Sample `group − 1`
//! free rollouts beside it, score all of them with the [`Rewarder`], take the advantage
//! `reward − group mean`, and minimise the PPO-clip surrogate over the rollouts' tokens. The
//! hybrid's forced prefix is off-policy: only its top `prefix_entropy_share` tokens by policy
//! entropy (the forks where the demonstration teaches most) receive gradient.
//!
//! Rollouts are sampled from the adapter as it is at that step, so the PPO ratio is 1 and the
//! clip inactive on the one update each group gets; the surrogate is kept in its PPO form so a
//! later change to several updates per group stays correct.

use candle_core::{DType, Tensor, D};
use prefix_rft_engine::train::{TrainAdapter, TrainModel};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::TrainerError;

/// Scores completions of one prompt, each in `[0, 1]`; an `Err` fails the run with its reason.
pub trait Rewarder {
    /// One score per completion of `prompt` (token ids, the chat template applied).
    fn score(&self, prompt: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f64>, String>;
}

/// Hyper-parameters of the RFT term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RftParams {
    /// Weight of the RFT loss beside DPO, SFT and KTO.
    pub weight: f64,
    /// Rollouts per demonstration, the hybrid one included (at least 2).
    pub group: usize,
    /// Most tokens a rollout samples (after the hybrid's forced prefix).
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts.
    pub temperature: f64,
    /// PPO clip range ε.
    pub clip: f64,
    /// Share of the forced prefix's tokens, by policy entropy, that receive gradient.
    pub prefix_entropy_share: f64,
    /// Lower bound of the prefix ratio at the first step.
    pub lower_start: f64,
    /// Lower bound of the prefix ratio at the last step.
    pub lower_end: f64,
    /// Upper bound of the prefix ratio.
    pub upper: f64,
    /// Tokens that end a rollout (the model's end-of-turn tokens); kept in the rollout.
    pub stop_tokens: Vec<u32>,
}

impl Default for RftParams {
    fn default() -> Self {
        RftParams {
            weight: 1.0,
            group: 4,
            max_new_tokens: 32,
            temperature: 1.0,
            clip: 0.2,
            prefix_entropy_share: 0.2,
            lower_start: 0.95,
            lower_end: 0.05,
            upper: 0.95,
            stop_tokens: Vec::new(),
        }
    }
}

impl RftParams {
    /// Refuses values no run can use.
    pub fn validate(&self) -> Result<(), TrainerError> {
        let bad = |m: String| Err(TrainerError::Params(format!("rft.{m}")));
        if self.group < 2 {
            return bad(format!("group = {} must be at least 2", self.group));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be positive".into());
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return bad(format!(
                "weight = {} must be finite and non-negative",
                self.weight
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature = {} must be positive",
                self.temperature
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.clip < 1.0) {
            return bad(format!("clip = {} must be in (0, 1)", self.clip));
        }
        for (name, v) in [
            ("prefix_entropy_share", self.prefix_entropy_share),
            ("lower_start", self.lower_start),
            ("lower_end", self.lower_end),
            ("upper", self.upper),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} = {v} must be in [0, 1]"));
            }
        }
        if self.lower_start > self.upper || self.lower_end > self.upper {
            return bad("lower_start and lower_end must not exceed upper".into());
        }
        Ok(())
    }

    /// The prefix ratio's lower bound at 0-based `step` of `total`: a cosine from
    /// `lower_start` to `lower_end`.
    pub fn lower_at(&self, step: usize, total: usize) -> f64 {
        let progress = step as f64 / total.saturating_sub(1).max(1) as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        self.lower_end + (self.lower_start - self.lower_end) * cos
    }

    /// Tokens of a `demo_len`-token demonstration forced into the hybrid rollout: `⌊l·len⌋`
    /// with `l ~ U[lower, upper]`.
    pub fn prefix_len(&self, demo_len: usize, lower: f64, rng: &mut impl Rng) -> usize {
        let l = if self.upper > lower {
            rng.gen_range(lower..=self.upper)
        } else {
            self.upper
        };
        ((l * demo_len as f64).floor() as usize).min(demo_len)
    }
}

/// The policy being trained: the frozen base with the adapter as it is at this step.
#[derive(Clone, Copy)]
pub struct Policy<'a> {
    /// The base model.
    pub model: &'a TrainModel,
    /// The adapter being trained.
    pub adapter: &'a TrainAdapter,
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// Completion tokens (after the prompt).
    pub tokens: Vec<u32>,
    /// How many leading tokens were forced from the demonstration (0 for a free rollout).
    pub forced: usize,
}

/// A scored group of rollouts and its loss.
#[derive(Debug, Clone)]
pub struct GroupLoss {
    /// The PPO-clip surrogate to minimise (a scalar in the autograd graph); `None` when every
    /// rollout scored the same (no advantage, nothing to learn).
    pub loss: Option<Tensor>,
    /// The rollouts' rewards.
    pub rewards: Vec<f64>,
}

/// `reward − group mean` for each rollout.
pub fn advantages(rewards: &[f64]) -> Vec<f64> {
    let mean = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
    rewards.iter().map(|r| r - mean).collect()
}

/// Indices (into `entropies`) of the top `share` of positions by entropy, at least one when
/// there is any position and `share > 0`, in ascending order.
pub fn top_entropy(entropies: &[f64], share: f64) -> Vec<usize> {
    if entropies.is_empty() || share <= 0.0 {
        return Vec::new();
    }
    let k = ((share * entropies.len() as f64).ceil() as usize).clamp(1, entropies.len());
    let mut idx: Vec<usize> = (0..entropies.len()).collect();
    idx.sort_by(|&a, &b| entropies[b].total_cmp(&entropies[a]).then(a.cmp(&b)));
    let mut top = idx[..k].to_vec();
    top.sort_unstable();
    top
}

/// Samples a group for `prompt` and its demonstration `demo`: the hybrid rollout first (the
/// first `prefix` tokens of `demo` forced), then `group − 1` free ones, each until a stop
/// token or `max_new_tokens` sampled tokens.
pub fn sample_group(
    policy: Policy<'_>,
    prompt: &[u32],
    demo: &[u32],
    prefix: usize,
    params: &RftParams,
    rng: &mut impl Rng,
) -> Result<Vec<Rollout>, TrainerError> {
    let forced = prefix.min(demo.len());
    let mut rollouts: Vec<Rollout> = (0..params.group)
        .map(|i| {
            let forced = if i == 0 { forced } else { 0 };
            Rollout {
                tokens: demo[..forced].to_vec(),
                forced,
            }
        })
        .collect();
    let mut live: Vec<usize> = (0..rollouts.len()).collect();
    let context = policy.model.config().max_position_embeddings;
    for _ in 0..params.max_new_tokens {
        live.retain(|&i| {
            let r = &rollouts[i];
            let ended = r.tokens.len() > r.forced
                && r.tokens
                    .last()
                    .is_some_and(|t| params.stop_tokens.contains(t));
            !ended && prompt.len() + r.tokens.len() < context
        });
        if live.is_empty() {
            break;
        }
        let seqs: Vec<Vec<u32>> = live
            .iter()
            .map(|&i| [prompt, &rollouts[i].tokens].concat())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let logits = policy.model.forward(&refs, Some(policy.adapter))?.detach();
        for (row, &i) in live.iter().enumerate() {
            let last = seqs[row].len() - 1;
            let l: Vec<f32> = logits
                .get(row)?
                .get(last)?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let token = sample(&l, params.temperature, rng)?;
            rollouts[i].tokens.push(token);
        }
    }
    Ok(rollouts)
}

/// Draws a token from `softmax(logits / temperature)`.
fn sample(logits: &[f32], temperature: f64, rng: &mut impl Rng) -> Result<u32, TrainerError> {
    let t = temperature as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Err(TrainerError::Data(
            "the policy's logits are not finite".into(),
        ));
    }
    let weights: Vec<f64> = logits
        .iter()
        .map(|&x| f64::from(((x - max) / t).exp()))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen_range(0.0..total);
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return Ok(i as u32);
        }
        u -= w;
    }
    Ok((weights.len() - 1) as u32)
}

/// Policy entropy (nats) of the next-token distribution before each of the hybrid's forced
/// tokens.
fn forced_entropies(
    policy: Policy<'_>,
    prompt: &[u32],
    hybrid: &Rollout,
) -> Result<Vec<f64>, TrainerError> {
    if hybrid.forced == 0 {
        return Ok(Vec::new());
    }
    let seq = [prompt, &hybrid.tokens[..hybrid.forced]].concat();
    let logits = policy
        .model
        .forward(&[&seq], Some(policy.adapter))?
        .detach();
    // Positions prompt_len − 1 .. prompt_len − 1 + forced predict the forced tokens.
    let rows = logits
        .get(0)?
        .narrow(0, prompt.len() - 1, hybrid.forced)?
        .to_dtype(DType::F32)?;
    let logp = candle_nn_log_softmax(&rows)?;
    let ent = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
    Ok(ent.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// `log_softmax` over the last dimension, numerically stable.
fn candle_nn_log_softmax(x: &Tensor) -> Result<Tensor, TrainerError> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The PPO-clip loss of a scored group: `−mean over trained tokens of min(r·A, clip(r)·A)`,
/// where `r = π / π_old` (1 in value, the policy gradient in derivative) and `A` the rollout's
/// advantage. Free rollouts train every token; the hybrid trains its sampled continuation and
/// the top-entropy share of its forced prefix.
pub fn group_loss(
    policy: Policy<'_>,
    prompt: &[u32],
    rollouts: &[Rollout],
    rewards: Vec<f64>,
    params: &RftParams,
) -> Result<GroupLoss, TrainerError> {
    let adv = advantages(&rewards);
    if adv.iter().all(|a| a.abs() < 1e-12) {
        return Ok(GroupLoss {
            loss: None,
            rewards,
        });
    }
    let seqs: Vec<Vec<u32>> = rollouts
        .iter()
        .map(|r| [prompt, &r.tokens].concat())
        .collect();
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    if t < 2 || rollouts.iter().any(|r| r.tokens.is_empty()) {
        return Err(TrainerError::Data("a rollout has no tokens".into()));
    }
    let mut weights = vec![0f32; rollouts.len() * (t - 1)];
    let mut trained = 0usize;
    for (i, r) in rollouts.iter().enumerate() {
        let keep_forced = match r.forced {
            0 => Vec::new(),
            _ => top_entropy(
                &forced_entropies(policy, prompt, r)?,
                params.prefix_entropy_share,
            ),
        };
        for j in 0..r.tokens.len() {
            if j < r.forced && keep_forced.binary_search(&j).is_err() {
                continue;
            }
            // Column of `log π(tokens[j] | prompt, tokens[..j])` in `token_logprobs`.
            weights[i * (t - 1) + prompt.len() - 1 + j] = adv[i] as f32;
            trained += 1;
        }
    }
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let lp = policy.model.token_logprobs(&refs, Some(policy.adapter))?;
    let a = Tensor::from_vec(weights.clone(), (rollouts.len(), t - 1), lp.device())?
        .to_dtype(lp.dtype())?;
    let mask = Tensor::from_vec(
        weights
            .iter()
            .map(|&w| f32::from(w != 0.0))
            .collect::<Vec<_>>(),
        (rollouts.len(), t - 1),
        lp.device(),
    )?
    .to_dtype(lp.dtype())?;
    let ratio = (&lp - lp.detach())?.exp()?;
    let surr1 = (&ratio * &a)?;
    let surr2 = (ratio.clamp(1.0 - params.clip, 1.0 + params.clip)? * &a)?;
    let surrogate = (surr1.minimum(&surr2)? * mask)?.sum_all()?;
    let loss = surrogate.affine(-1.0 / trained.max(1) as f64, 0.0)?;
    Ok(GroupLoss {
        loss: Some(loss),
        rewards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn lower_bound_decays_by_cosine_from_start_to_end() {
        let p = RftParams::default();
        assert!((p.lower_at(0, 11) - 0.95).abs() < 1e-12);
        assert!((p.lower_at(5, 11) - 0.5).abs() < 1e-12);
        assert!((p.lower_at(10, 11) - 0.05).abs() < 1e-12);
        assert!(
            (p.lower_at(0, 1) - 0.95).abs() < 1e-12,
            "a one-step run starts at the top"
        );
    }

    #[test]
    fn prefix_length_stays_between_the_bounds() {
        let p = RftParams::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let n = p.prefix_len(20, 0.5, &mut rng);
            assert!((10..=19).contains(&n), "{n}");
        }
        assert_eq!(p.prefix_len(20, 0.95, &mut rng), 19);
        assert_eq!(p.prefix_len(0, 0.5, &mut rng), 0);
    }

    #[test]
    fn advantages_are_centred() {
        let a = advantages(&[1.0, 0.0, 0.5, 0.5]);
        assert_eq!(a, vec![0.5, -0.5, 0.0, 0.0]);
        assert!(advantages(&[0.3; 4]).iter().all(|x| *x == 0.0));
    }

    #[test]
    fn top_entropy_keeps_the_highest_share_in_order() {
        let e = [0.1, 2.0, 0.5, 3.0, 0.2, 0.0, 1.0, 0.3, 0.4, 0.6];
        assert_eq!(top_entropy(&e, 0.2), vec![1, 3]);
        assert_eq!(top_entropy(&e[..3], 0.2), vec![1], "at least one");
        assert!(top_entropy(&e, 0.0).is_empty());
        assert!(top_entropy(&[], 0.2).is_empty());
    }

    #[test]
    fn sampling_follows_the_distribution_and_temperature() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let n = 4000;
        let ones = (0..n)
            .filter(|_| sample(&logits, 1.0, &mut rng).expect("sample") == 1)
            .count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        let cold = (0..200)
            .filter(|_| sample(&logits, 0.01, &mut rng).expect("sample") == 1)
            .count();
        assert_eq!(cold, 200, "near-greedy at a tiny temperature");
        assert!(sample(&[f32::NAN; 3], 1.0, &mut rng).is_err());
    }

    #[test]
    fn bad_params_are_refused_naming_the_field() {
        type Break = fn(&mut RftParams);
        let cases: [(Break, &str); 4] = [
            (|p| p.group = 1, "group"),
            (|p| p.clip = 1.5, "clip"),
            (|p| p.lower_start = 0.99, "lower_start"),
            (|p| p.temperature = 0.0, "temperature"),
        ];
        for (break_it, field) in cases {
            let mut p = RftParams::default();
            break_it(&mut p);
            let e = p.validate().expect_err(field).to_string();
            assert!(e.contains(field), "{e}");
        }
        assert!(RftParams::default().validate().is_ok());
    }
}
