//! Per-sequence token sampling with OpenAI/vLLM semantics.
//!
//! A [`Sampler`] belongs to one sequence and owns its RNG and penalty state,
//! so a sequence draws exactly the same tokens whether it runs alone or in a
//! batch. The RNG is ChaCha8, whose stream is specified bit for bit, so a
//! seeded request is reproducible across platforms.
//!
//! Order of operations (as in vLLM and HF transformers):
//! repetition → frequency → presence penalties, then temperature, top-k,
//! top-p, min-p, and the draw. The reported log-probabilities come from the
//! log-softmax of the *raw* model logits (before penalties and temperature),
//! which is vLLM's default and matches the teacher-forced scoring path.
//!
//! Cost per token for a vocabulary of V: greedy and plain sampling are O(V)
//! with no sort; top-k is O(V log k); top-p without top-k grows a top-k
//! candidate set geometrically until it covers the requested mass, so it
//! only degenerates to a full sort when the distribution is nearly flat.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Largest accepted `top_logprobs` (the OpenAI API limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// First candidate-set size tried for top-p without top-k; most real
/// distributions put the nucleus within a few dozen tokens.
const TOP_P_INITIAL_K: usize = 64;
/// Growth factor of that candidate set when it does not cover the mass.
const TOP_P_GROWTH: usize = 8;
/// `top_k_indices` switches from a heap to select-and-sort once
/// k · LARGE_K_RATIO ≥ n.
const LARGE_K_RATIO: usize = 8;

/// Validated sampling parameters of one sequence (OpenAI semantics).
///
/// Missing fields deserialize to their [`Default`] values.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 ⇒ greedy (argmax, ties → lowest id). Range [0, 2], default 1.0.
    pub temperature: f32,
    /// Nucleus mass, range (0, 1], default 1.0 (disabled).
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 ⇒ disabled.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the top
    /// probability; range [0, 1], 0 ⇒ disabled.
    pub min_p: f32,
    /// Same seed + same logits ⇒ same tokens. `None` ⇒ OS entropy.
    pub seed: Option<u64>,
    /// HF/vLLM repetition penalty over prompt + generated tokens: positive
    /// logits are divided by it, negative ones multiplied. 1.0 ⇒ off; > 0.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over generated tokens, range [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over generated tokens, range [-2, 2].
    pub frequency_penalty: f32,
    /// How many alternatives to report per token (0..=20).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            top_logprobs: 0,
        }
    }
}

/// A sampling parameter outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sampling parameter `{param}`: must be {rule}, got {value}")]
pub struct SamplingError {
    /// Field name as in [`SamplingParams`] (and the OpenAI request).
    pub param: &'static str,
    /// The rule that was violated, e.g. `"in [0, 2]"`.
    pub rule: &'static str,
    /// The rejected value, formatted for the error message.
    pub value: String,
}

impl SamplingError {
    fn new(param: &'static str, rule: &'static str, value: impl ToString) -> Self {
        Self {
            param,
            rule,
            value: value.to_string(),
        }
    }
}

impl SamplingParams {
    /// Checks every field against its range; the error names the first
    /// offending field. NaN and infinities are rejected everywhere.
    pub fn validate(&self) -> Result<(), SamplingError> {
        // `RangeInclusive::contains` is false for NaN, so NaN is rejected too.
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(SamplingError::new(
                "temperature",
                "in [0, 2]",
                self.temperature,
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::new("top_p", "in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::new("min_p", "in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(SamplingError::new(
                "repetition_penalty",
                "finite and > 0",
                self.repetition_penalty,
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::new(
                "presence_penalty",
                "in [-2, 2]",
                self.presence_penalty,
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::new(
                "frequency_penalty",
                "in [-2, 2]",
                self.frequency_penalty,
            ));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(SamplingError::new(
                "top_logprobs",
                "in 0..=20",
                self.top_logprobs,
            ));
        }
        Ok(())
    }
}

/// One sampled token with its log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token id.
    pub token: u32,
    /// Log-probability of `token` under the raw model logits.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the raw logits, sorted by
    /// log-probability descending (ties → lower id); shorter only if the
    /// vocabulary is smaller than requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-sequence sampler: owns its RNG and penalty counts so a sequence
/// samples the same way alone or in a batch.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Prompt ∪ generated tokens; only kept when the repetition penalty is on.
    seen: HashSet<u32>,
    /// Occurrence counts of generated tokens (presence/frequency penalties).
    generated: HashMap<u32, u32>,
    /// Scratch: raw logits of the entries the penalties overwrote, so the
    /// chosen token's raw log-probability can be reported without copying
    /// the whole logits vector.
    saved: Vec<(u32, f32)>,
    /// Scratch: unnormalised weights for the full-vocabulary draw, reused
    /// across tokens to avoid a V-sized allocation per token.
    weights: Vec<f32>,
}

impl Sampler {
    /// Creates the sampler of one sequence. `params` should have passed
    /// [`SamplingParams::validate`]; invalid values never panic but may fall
    /// back to greedy. `seed: None` seeds the RNG from OS entropy.
    pub fn new(params: SamplingParams, prompt_tokens: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_seed(rand::random()),
        };
        // Long prompts are common; skip the set when it would never be read.
        let seen = if params.repetition_penalty != 1.0 {
            prompt_tokens.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            params,
            rng,
            seen,
            generated: HashMap::new(),
            saved: Vec::new(),
            weights: Vec::new(),
        }
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples the next token from raw logits (modified in place as scratch)
    /// and records it for the penalties.
    ///
    /// Empty logits yield token 0 with log-probability −∞ and record nothing.
    /// NaN logits are treated as impossible tokens.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        if logits.is_empty() {
            return Sampled {
                token: 0,
                logprob: f32::NEG_INFINITY,
                top_logprobs: Vec::new(),
            };
        }
        // Log-probabilities are reported from the raw logits, so take them
        // before the penalties overwrite anything.
        let norm = Normalizer::new(logits);
        let top_logprobs = if self.params.top_logprobs > 0 {
            top_k_indices(logits, self.params.top_logprobs)
                .into_iter()
                .map(|(id, v)| (id, norm.logprob(v)))
                .collect()
        } else {
            Vec::new()
        };

        self.apply_penalties(logits);
        let token = self.choose(logits);

        let raw = self
            .saved
            .iter()
            .find(|&&(id, _)| id == token)
            .map(|&(_, v)| v)
            .or_else(|| logits.get(token as usize).copied())
            .unwrap_or(f32::NEG_INFINITY);
        self.record(token);
        Sampled {
            token,
            logprob: norm.logprob(raw),
            top_logprobs,
        }
    }

    /// Adds a generated token to the penalty state.
    fn record(&mut self, token: u32) {
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.generated.entry(token).or_insert(0) += 1;
        }
    }

    /// Applies repetition, then frequency and presence penalties in place
    /// (vLLM order), saving the raw value of every entry it changes.
    /// Cost is O(distinct tokens seen), not O(V).
    fn apply_penalties(&mut self, logits: &mut [f32]) {
        self.saved.clear();
        let rep = self.params.repetition_penalty;
        if rep != 1.0 {
            for &id in &self.seen {
                // Ids beyond the vocabulary (bad prompt input) are ignored.
                if let Some(l) = logits.get_mut(id as usize) {
                    self.saved.push((id, *l));
                    *l = if *l > 0.0 { *l / rep } else { *l * rep };
                }
            }
        }
        let freq = self.params.frequency_penalty;
        let presence = self.params.presence_penalty;
        if freq != 0.0 || presence != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(l) = logits.get_mut(id as usize) {
                    // With the repetition penalty on, generated ⊆ seen, so
                    // the raw value was saved above already.
                    if rep == 1.0 {
                        self.saved.push((id, *l));
                    }
                    *l -= count as f32 * freq + presence;
                }
            }
        }
    }

    /// Picks a token from penalised logits: temperature, top-k, top-p,
    /// min-p, draw.
    fn choose(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let n = logits.len();
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let temperature = p.temperature;
        let top_k = if p.top_k == 0 || p.top_k >= n {
            None
        } else {
            Some(p.top_k)
        };
        let top_p = if p.top_p < 1.0 { Some(p.top_p) } else { None };
        let min_p = p.min_p;

        match (top_k, top_p) {
            (None, None) => self.draw_full(logits, temperature, min_p),
            (Some(k), _) => {
                let cands = top_k_indices(logits, k);
                // top-p after top-k renormalises over the k kept tokens.
                self.draw_sorted(&cands, temperature, top_p, None, min_p)
                    .unwrap_or_else(|| argmax(logits))
            }
            (None, Some(top_p)) => {
                let Some((cands, z)) = top_p_candidates(logits, temperature, top_p) else {
                    return argmax(logits);
                };
                self.draw_sorted(&cands, temperature, Some(top_p), Some(z), min_p)
                    .unwrap_or_else(|| argmax(logits))
            }
        }
    }

    /// Draws from the whole vocabulary without sorting (no top-k/top-p);
    /// min-p is a threshold on the weight relative to the maximum.
    fn draw_full(&mut self, logits: &[f32], temperature: f32, min_p: f32) -> u32 {
        let max = nan_max(logits);
        self.weights.clear();
        self.weights
            .extend(logits.iter().map(|&l| weight(l, max, temperature, min_p)));
        let total: f64 = self.weights.iter().map(|&w| w as f64).sum();
        if !(total > 0.0 && total.is_finite()) {
            // Degenerate logits (all −∞/NaN, or +∞ entries): stay defined.
            return argmax(logits);
        }
        let u = self.rng.gen::<f64>() * total;
        let mut acc = 0.0f64;
        let mut last = None;
        for (i, &w) in self.weights.iter().enumerate() {
            if w > 0.0 {
                acc += w as f64;
                last = Some(i);
                if acc > u {
                    return i as u32;
                }
            }
        }
        // Only reachable through rounding at the very end of the scan.
        last.map_or_else(|| argmax(logits), |i| i as u32)
    }

    /// Draws from candidates sorted by logit descending, applying top-p
    /// (against `z`, or the candidates' own mass when `None`) and min-p as
    /// prefix cuts. `None` when no candidate has positive weight.
    fn draw_sorted(
        &mut self,
        cands: &[(u32, f32)],
        temperature: f32,
        top_p: Option<f32>,
        z: Option<f64>,
        min_p: f32,
    ) -> Option<u32> {
        let max = cands.first()?.1;
        // Weights fit in a small buffer: the candidate set is the nucleus.
        self.weights.clear();
        self.weights
            .extend(cands.iter().map(|&(_, l)| weight(l, max, temperature, 0.0)));
        let mut keep = self.weights.len();
        if let Some(top_p) = top_p {
            let z = z.unwrap_or_else(|| self.weights.iter().map(|&w| w as f64).sum());
            let target = top_p as f64 * z;
            // Keep token i while the mass strictly before it is < top_p
            // (HF/vLLM rule); the first token is always kept.
            let mut before = 0.0f64;
            keep = 0;
            for &w in &self.weights {
                if keep > 0 && before >= target {
                    break;
                }
                before += w as f64;
                keep += 1;
            }
        }
        if min_p > 0.0 {
            // Weights are p_i / p_max and sorted, so min-p is a prefix too.
            keep = self.weights[..keep]
                .iter()
                .take_while(|&&w| w >= min_p)
                .count()
                .max(1);
        }
        let kept = &self.weights[..keep];
        let total: f64 = kept.iter().map(|&w| w as f64).sum();
        if !(total > 0.0 && total.is_finite()) {
            return None;
        }
        let u = self.rng.gen::<f64>() * total;
        let mut acc = 0.0f64;
        let mut last = None;
        for (i, &w) in kept.iter().enumerate() {
            if w > 0.0 {
                acc += w as f64;
                last = Some(i);
                if acc > u {
                    break;
                }
            }
        }
        last.and_then(|i| cands.get(i)).map(|&(id, _)| id)
    }
}

/// Unnormalised probability exp((l − max) / T), zeroed below `min_p` (which
/// is relative to the maximum, where the weight is 1) and for NaN.
/// Division rather than multiplying by 1/T keeps the maximum at exactly 1
/// even for subnormal temperatures.
#[inline]
fn weight(l: f32, max: f32, temperature: f32, min_p: f32) -> f32 {
    let w = ((l - max) / temperature).exp();
    if w >= min_p && w > 0.0 {
        w
    } else {
        0.0
    }
}

/// Smallest set of top candidates (sorted, descending) that covers `top_p`
/// of the temperature-scaled mass, found by growing a top-k set, plus the
/// full-vocabulary normaliser. `None` for degenerate logits.
fn top_p_candidates(
    logits: &[f32],
    temperature: f32,
    top_p: f32,
) -> Option<(Vec<(u32, f32)>, f64)> {
    let max = nan_max(logits);
    let z: f64 = logits
        .iter()
        .map(|&l| weight(l, max, temperature, 0.0) as f64)
        .sum();
    if !(z > 0.0 && z.is_finite()) {
        return None;
    }
    let target = top_p as f64 * z;
    let mut k = TOP_P_INITIAL_K.min(logits.len());
    loop {
        let cands = top_k_indices(logits, k);
        let mass: f64 = cands
            .iter()
            .map(|&(_, l)| weight(l, max, temperature, 0.0) as f64)
            .sum();
        // Once the set's mass reaches the target, every token the top-p rule
        // keeps is inside it (the rule stops at the first prefix ≥ target).
        if mass >= target || k >= logits.len() {
            return Some((cands, z));
        }
        k = k.saturating_mul(TOP_P_GROWTH).min(logits.len());
    }
}

/// Index of the largest value, ties → lowest index; NaN never wins.
/// Returns 0 when no value beats −∞.
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Maximum ignoring NaN (`f32::max` returns the non-NaN operand).
fn nan_max(values: &[f32]) -> f32 {
    values.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// log Σ exp(values) kept as `max + ln_sum`, so a log-probability is
/// `(l − max) − ln_sum`: the first difference is exact for logits near the
/// maximum, which keeps full f32 precision even when the logits are large
/// (folding `max + ln_sum` into one f32 would round at the logits' scale).
#[derive(Debug, Clone, Copy)]
struct Normalizer {
    max: f32,
    ln_sum: f32,
}

impl Normalizer {
    /// Shifts by the maximum for stability and sums in f64 so large
    /// vocabularies do not lose the tail mass. NaN entries are left out.
    fn new(values: &[f32]) -> Self {
        let max = nan_max(values);
        if !max.is_finite() {
            // All −∞ (or empty), or +∞ present: nothing meaningful to sum.
            return Self { max, ln_sum: 0.0 };
        }
        let sum: f64 = values
            .iter()
            .filter(|v| !v.is_nan())
            .map(|&v| (v - max).exp() as f64)
            .sum();
        Self {
            max,
            ln_sum: sum.ln() as f32,
        }
    }

    #[inline]
    fn logprob(self, l: f32) -> f32 {
        (l - self.max) - self.ln_sum
    }
}

/// Log-softmax of logits (numerically stable, f64 accumulation of the sum)
/// into `out`. Only the first `min(logits.len(), out.len())` entries are
/// written. NaN logits do not contribute to the normaliser (and stay NaN).
pub fn log_softmax(logits: &[f32], out: &mut [f32]) {
    let norm = Normalizer::new(logits);
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = norm.logprob(l);
    }
}

/// Heap entry ordered so that the *worst* candidate is the greatest, making
/// `BinaryHeap` (a max-heap) keep the current k-th best at its root.
#[derive(Clone, Copy)]
struct Entry {
    /// Sort key: the value with NaN → −∞ and −0 → +0, so ordering is total
    /// and ties between the zeros go to the lower id like any other tie.
    key: f32,
    id: u32,
    value: f32,
}

impl Entry {
    fn new(id: u32, value: f32) -> Self {
        let key = if value.is_nan() {
            f32::NEG_INFINITY
        } else if value == 0.0 {
            0.0
        } else {
            value
        };
        Self { key, id, value }
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Lower value is worse; on equal values the higher id is worse.
        other.key.total_cmp(&self.key).then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

/// Top-k (id, value) pairs by value, descending, ties by lower id;
/// O(n log k) (O(n + k log k) when k is a sizeable fraction of n). NaN values rank below everything. Returns `min(k, n)` pairs.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k.saturating_mul(LARGE_K_RATIO) >= values.len() {
        // For k comparable to n a heap is slower than selecting in place:
        // O(n) partition, then sort only the k kept entries.
        let mut all: Vec<Entry> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| Entry::new(i as u32, v))
            .collect();
        if k < all.len() {
            all.select_nth_unstable(k - 1);
            all.truncate(k);
        }
        // Entries are distinct (unique ids), so unstable sorting is exact.
        all.sort_unstable();
        return all.into_iter().map(|e| (e.id, e.value)).collect();
    }
    let mut heap = BinaryHeap::with_capacity(k);
    for (i, &v) in values.iter().enumerate() {
        let e = Entry::new(i as u32, v);
        if heap.len() < k {
            heap.push(e);
        } else if let Some(mut worst) = heap.peek_mut() {
            // Most entries fail this single comparison: the O(n) fast path.
            if e < *worst {
                *worst = e;
            }
        }
    }
    // Ascending in `Entry` order is best first.
    heap.into_sorted_vec()
        .into_iter()
        .map(|e| (e.id, e.value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    /// Deterministic pseudo-random logits in [-scale, scale).
    fn random_logits(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    fn full_log_softmax(logits: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; logits.len()];
        log_softmax(logits, &mut out);
        out
    }

    #[test]
    fn greedy_picks_argmax_ties_to_lowest_id() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                top_logprobs: 2,
                ..params()
            },
            &[],
        );
        let raw = [1.0, 3.0, 2.0, 3.0];
        let lsm = full_log_softmax(&raw);
        for _ in 0..10 {
            let out = s.sample(&mut raw.clone());
            assert_eq!(out.token, 1);
            assert!((out.logprob - lsm[1]).abs() < 1e-6);
            assert_eq!(out.top_logprobs, vec![(1, lsm[1]), (3, lsm[3])]);
        }
        // NaN never wins; all −∞ falls back to id 0.
        assert_eq!(s.sample(&mut [f32::NAN, -1.0, 0.5]).token, 2);
        assert_eq!(s.sample(&mut [f32::NEG_INFINITY; 3]).token, 0);
    }

    #[test]
    fn same_seed_reproduces_100_draws_and_different_seeds_differ() {
        let raw = random_logits(1000, 1, 2.0);
        let draws = |seed: u64| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    ..SamplingParams::default()
                },
                &[],
            );
            (0..100)
                .map(|_| s.sample(&mut raw.clone()).token)
                .collect::<Vec<_>>()
        };
        let a = draws(42);
        assert_eq!(a, draws(42));
        assert_ne!(a, draws(43));
        // The draws are not degenerate (e.g. all the same token).
        assert!(a.iter().collect::<HashSet<_>>().len() > 50);
    }

    #[test]
    fn temperature_to_zero_limit_is_greedy() {
        let mut raw = random_logits(5000, 2, 3.0);
        let greedy = argmax(&raw);
        // Random logits can nearly tie; a clear margin makes the limit
        // observable at T = 1e-3 (runner-up weight ≤ e^-100).
        raw[greedy as usize] += 0.1;
        for t in [1e-3f32, 1e-6, 1e-30, f32::from_bits(1)] {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: t,
                    ..params()
                },
                &[],
            );
            for _ in 0..50 {
                assert_eq!(s.sample(&mut raw.clone()).token, greedy, "T = {t}");
            }
        }
    }

    #[test]
    fn top_k_one_equals_greedy() {
        for seed in 0..50 {
            let raw = random_logits(2000, seed, 5.0);
            let mut s = Sampler::new(
                SamplingParams {
                    top_k: 1,
                    temperature: 2.0,
                    ..params()
                },
                &[],
            );
            assert_eq!(s.sample(&mut raw.clone()).token, argmax(&raw));
        }
    }

    #[test]
    fn top_p_tiny_equals_greedy() {
        for seed in 0..50 {
            let raw = random_logits(2000, seed, 1.0);
            let mut s = Sampler::new(
                SamplingParams {
                    top_p: 1e-6,
                    ..params()
                },
                &[],
            );
            assert_eq!(s.sample(&mut raw.clone()).token, argmax(&raw));
        }
        // Ties at the top resolve to the lowest id, like greedy.
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 1e-6,
                ..params()
            },
            &[],
        );
        assert_eq!(s.sample(&mut [0.0, 2.0, 2.0, 1.0]).token, 1);
    }

    /// Empirical frequencies of `draws` samples from `raw` under `p`.
    fn frequencies(p: SamplingParams, raw: &[f32], draws: usize) -> Vec<f64> {
        let mut s = Sampler::new(p, &[]);
        let mut counts = vec![0usize; raw.len()];
        let mut scratch = raw.to_vec();
        for _ in 0..draws {
            scratch.copy_from_slice(raw);
            counts[s.sample(&mut scratch).token as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    fn assert_close(freq: &[f64], probs: &[f64], tol: f64) {
        for (i, (f, p)) in freq.iter().zip(probs).enumerate() {
            assert!((f - p).abs() < tol, "token {i}: freq {f} vs prob {p}");
        }
    }

    #[test]
    fn distribution_matches_softmax_within_2_percent_over_20k_draws() {
        let probs = [0.2f64, 0.5, 0.3];
        // Shifted by a constant: softmax must not care.
        let raw: Vec<f32> = probs.iter().map(|p| p.ln() as f32 + 10.0).collect();
        let freq = frequencies(params(), &raw, 20_000);
        assert_close(&freq, &probs, 0.02);

        // Temperature 2 flattens: p ∝ sqrt(probs).
        let sq: Vec<f64> = probs.iter().map(|p| p.sqrt()).collect();
        let z: f64 = sq.iter().sum();
        let expect: Vec<f64> = sq.iter().map(|p| p / z).collect();
        let p = SamplingParams {
            temperature: 2.0,
            ..params()
        };
        assert_close(&frequencies(p, &raw, 20_000), &expect, 0.02);
    }

    #[test]
    fn top_k_top_p_min_p_renormalise_over_the_kept_set() {
        let probs = [0.2f64, 0.5, 0.3];
        let raw: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();

        // top_k = 2 keeps {0.5, 0.3}.
        let p = SamplingParams {
            top_k: 2,
            ..params()
        };
        assert_close(&frequencies(p, &raw, 20_000), &[0.0, 0.625, 0.375], 0.02);

        // top_p = 0.6: mass before 0.3 is 0.5 < 0.6 (kept), before 0.2 is 0.8.
        let p = SamplingParams {
            top_p: 0.6,
            ..params()
        };
        assert_close(&frequencies(p, &raw, 20_000), &[0.0, 0.625, 0.375], 0.02);

        // top_p = 0.5 exactly: mass before 0.3 is 0.5, not < 0.5 → greedy.
        let p = SamplingParams {
            top_p: 0.5,
            ..params()
        };
        assert_close(&frequencies(p, &raw, 2_000), &[0.0, 1.0, 0.0], 1e-9);

        // min_p = 0.5: threshold 0.25 keeps {0.5, 0.3}.
        let p = SamplingParams {
            min_p: 0.5,
            ..params()
        };
        assert_close(&frequencies(p, &raw, 20_000), &[0.0, 0.625, 0.375], 0.02);

        // top_k = 2 then top_p = 0.7 over the renormalised {0.625, 0.375}:
        // mass before the second is 0.625 < 0.7 → both kept.
        let p = SamplingParams {
            top_k: 2,
            top_p: 0.7,
            ..params()
        };
        assert_close(&frequencies(p, &raw, 20_000), &[0.0, 0.625, 0.375], 0.02);
    }

    #[test]
    fn top_p_without_top_k_grows_candidates_to_the_exact_nucleus() {
        // Nearly flat over 3000 tokens: the nucleus is far beyond the first
        // candidate set, exercising the growth loop.
        let raw = random_logits(3000, 9, 0.5);
        let top_p = 0.9f32;
        let mut order: Vec<u32> = (0..raw.len() as u32).collect();
        order.sort_by(|&a, &b| raw[b as usize].total_cmp(&raw[a as usize]).then(a.cmp(&b)));
        let max = raw[order[0] as usize];
        let w: Vec<f64> = order
            .iter()
            .map(|&i| ((raw[i as usize] - max).exp()) as f64)
            .collect();
        let z: f64 = w.iter().sum();
        let mut before = 0.0;
        let mut nucleus = HashSet::new();
        for (&id, &wi) in order.iter().zip(&w) {
            if !nucleus.is_empty() && before >= top_p as f64 * z {
                break;
            }
            before += wi;
            nucleus.insert(id);
        }
        assert!(nucleus.len() > TOP_P_INITIAL_K * TOP_P_GROWTH);
        let (cands, cz) = top_p_candidates(&raw, 1.0, top_p).unwrap_or_default();
        assert!(cands.len() >= nucleus.len());
        assert!((cz - z).abs() < 1e-6 * z);

        let mut s = Sampler::new(SamplingParams { top_p, ..params() }, &[]);
        let mut drawn = HashSet::new();
        for _ in 0..5000 {
            let t = s.sample(&mut raw.clone()).token;
            assert!(nucleus.contains(&t), "token {t} outside the nucleus");
            drawn.insert(t);
        }
        // Many nucleus tokens are hit, so the cut is not too tight either.
        assert!(drawn.len() > nucleus.len() / 2);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params()
            },
            &[0, 1, 9999],
        );
        s.record(2);
        let mut logits = vec![2.0, -1.0, 3.0, 0.5];
        s.apply_penalties(&mut logits);
        // Prompt and generated tokens alike; the out-of-range id is ignored.
        assert_eq!(logits, vec![1.0, -2.0, 1.5, 0.5]);
    }

    #[test]
    fn frequency_and_presence_penalties_subtract_per_openai_formula() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..params()
            },
            // Prompt tokens do not count for these penalties.
            &[0, 3],
        );
        for t in [2, 2, 1, 2] {
            s.record(t);
        }
        let mut logits = vec![2.0, -1.0, 3.0, 0.5];
        s.apply_penalties(&mut logits);
        // logit -= count * frequency + (count > 0) * presence
        assert_eq!(logits, vec![2.0, -1.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 0.5]);

        // Negative penalties encourage repetition.
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: -1.0,
                frequency_penalty: -2.0,
                ..params()
            },
            &[],
        );
        s.record(1);
        let mut logits = vec![0.0, 0.0];
        s.apply_penalties(&mut logits);
        assert_eq!(logits, vec![0.0, 3.0]);
    }

    #[test]
    fn all_penalties_combine_in_vllm_order() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                presence_penalty: 0.5,
                frequency_penalty: 0.25,
                ..params()
            },
            &[0, 1],
        );
        for t in [2, 2, 1] {
            s.record(t);
        }
        let mut logits = vec![2.0, -1.0, 3.0, 0.5];
        s.apply_penalties(&mut logits);
        // 0: prompt only → 2/2. 1: −1·2 − (0.25 + 0.5). 2: 3/2 − (0.5 + 0.5).
        assert_eq!(logits, vec![1.0, -2.75, 0.5, 0.5]);
    }

    #[test]
    fn penalties_steer_sampling_but_logprobs_stay_raw() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                frequency_penalty: 2.0,
                top_logprobs: 2,
                ..params()
            },
            &[],
        );
        let raw = [5.0, 4.0, -3.0];
        let lsm = full_log_softmax(&raw);
        let first = s.sample(&mut raw.clone());
        assert_eq!(first.token, 0);
        // Token 0 now sits at 5 − 2 = 3 < 4, so greedy switches to token 1.
        let second = s.sample(&mut raw.clone());
        assert_eq!(second.token, 1);
        let third = s.sample(&mut raw.clone());
        // Token 1 at 4 − 2 = 2 and token 0 at 3: back to 0, whose raw
        // log-probability is reported although its logit was penalised.
        assert_eq!(third.token, 0);
        assert!((third.logprob - lsm[0]).abs() < 1e-6);
        assert_eq!(third.top_logprobs, vec![(0, lsm[0]), (1, lsm[1])]);
    }

    #[test]
    fn logprobs_sum_to_one_after_exp() {
        for (n, scale) in [(3, 1.0), (49_152, 30.0), (151_936, 1.0)] {
            let raw = random_logits(n, n as u64, scale);
            let lsm = full_log_softmax(&raw);
            let sum: f64 = lsm.iter().map(|&l| (l as f64).exp()).sum();
            assert!((sum - 1.0).abs() < 1e-4, "n = {n}: sum {sum}");
            assert!(lsm.iter().all(|&l| l <= 0.0));
        }
        // Logits whose naive exp overflows f32 (e^200) still normalise.
        let lsm = full_log_softmax(&[200.0, 200.0]);
        assert!((lsm[0] - 0.5f32.ln()).abs() < 1e-6);
        assert!(full_log_softmax(&[1e30, -1e30]).iter().all(|l| !l.is_nan()));
        // Sampled logprobs agree with the full log-softmax.
        let raw = random_logits(1000, 5, 4.0);
        let lsm = full_log_softmax(&raw);
        let mut s = Sampler::new(
            SamplingParams {
                top_logprobs: 20,
                ..params()
            },
            &[],
        );
        let out = s.sample(&mut raw.clone());
        assert!((out.logprob - lsm[out.token as usize]).abs() < 1e-6);
        assert_eq!(out.top_logprobs.len(), 20);
        assert!(out.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        for &(id, lp) in &out.top_logprobs {
            assert_eq!(lp, lsm[id as usize]);
        }
    }

    #[test]
    fn top_k_indices_matches_full_sort_with_ties_to_lower_id() {
        let mut vals = random_logits(5000, 3, 1.0);
        // Inject ties, a −0/+0 pair and a NaN.
        vals[10] = 0.99;
        vals[20] = 0.99;
        vals[30] = 0.99;
        vals[40] = f32::NAN;
        vals[50] = -0.0;
        vals[51] = 0.0;
        let mut order: Vec<u32> = (0..vals.len() as u32).collect();
        let key = |i: u32| Entry::new(i, vals[i as usize]).key;
        order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        for k in [0, 1, 3, 64, 5000, 6000] {
            let got = top_k_indices(&vals, k);
            assert_eq!(got.len(), k.min(vals.len()));
            for (g, &want) in got.iter().zip(&order) {
                assert_eq!(g.0, want);
            }
        }
        assert_eq!(
            top_k_indices(&[1.0, 2.0, 2.0, 0.0], 2),
            vec![(1, 2.0), (2, 2.0)]
        );
        let zeros = top_k_indices(&[-0.0, 0.0], 2);
        assert_eq!(zeros.iter().map(|z| z.0).collect::<Vec<_>>(), vec![0, 1]);
        // NaN ranks last.
        assert_eq!(top_k_indices(&[f32::NAN, -5.0], 1), vec![(1, -5.0)]);
    }

    #[test]
    fn empty_and_degenerate_logits_do_not_panic() {
        let mut s = Sampler::new(params(), &[]);
        let out = s.sample(&mut []);
        assert_eq!(out.token, 0);
        assert_eq!(out.logprob, f32::NEG_INFINITY);
        assert_eq!(s.sample(&mut [f32::NAN, f32::NAN]).token, 0);
        assert_eq!(s.sample(&mut [0.0, f32::INFINITY]).token, 1);
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                top_k: 2,
                min_p: 0.1,
                ..params()
            },
            &[],
        );
        assert_eq!(s.sample(&mut [f32::NAN, 1.0, f32::NAN]).token, 1);
    }

    #[test]
    fn validate_accepts_defaults_and_boundaries() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        let edge = SamplingParams {
            temperature: 2.0,
            top_p: 1.0,
            top_k: 1,
            min_p: 1.0,
            seed: Some(u64::MAX),
            repetition_penalty: 2.0,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            top_logprobs: 20,
        };
        assert_eq!(edge.validate(), Ok(()));
        let zero_t = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(zero_t.validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_each_out_of_range_field_naming_it() {
        type Mutate = fn(&mut SamplingParams);
        let cases: [(&str, Mutate); 18] = [
            ("temperature", |p| p.temperature = -0.1),
            ("temperature", |p| p.temperature = 2.01),
            ("temperature", |p| p.temperature = f32::NAN),
            ("top_p", |p| p.top_p = 0.0),
            ("top_p", |p| p.top_p = 1.5),
            ("top_p", |p| p.top_p = f32::NAN),
            ("min_p", |p| p.min_p = -0.5),
            ("min_p", |p| p.min_p = 1.5),
            ("repetition_penalty", |p| p.repetition_penalty = 0.0),
            ("repetition_penalty", |p| p.repetition_penalty = -1.0),
            ("repetition_penalty", |p| {
                p.repetition_penalty = f32::INFINITY
            }),
            ("presence_penalty", |p| p.presence_penalty = -2.5),
            ("presence_penalty", |p| p.presence_penalty = 2.5),
            ("frequency_penalty", |p| p.frequency_penalty = -2.5),
            ("frequency_penalty", |p| p.frequency_penalty = f32::NAN),
            ("top_logprobs", |p| p.top_logprobs = 21),
            ("top_logprobs", |p| p.top_logprobs = usize::MAX),
            ("frequency_penalty", |p| p.frequency_penalty = 3.0),
        ];
        for (name, mutate) in cases {
            let mut p = SamplingParams::default();
            mutate(&mut p);
            match p.validate() {
                Err(e) => {
                    assert_eq!(e.param, name, "{p:?}");
                    assert!(e.to_string().contains(name));
                    assert!(e.to_string().contains(e.rule));
                }
                Ok(()) => panic!("{name}: {p:?} accepted"),
            }
        }
        let e = SamplingParams {
            temperature: 3.0,
            ..SamplingParams::default()
        }
        .validate();
        assert_eq!(
            e.map_err(|e| e.to_string()),
            Err("invalid sampling parameter `temperature`: must be in [0, 2], got 3".into())
        );
    }

    #[test]
    fn params_deserialize_with_defaults_and_round_trip() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature":0.5,"seed":3}"#).unwrap_or_default();
        assert_eq!(
            p,
            SamplingParams {
                temperature: 0.5,
                seed: Some(3),
                ..SamplingParams::default()
            }
        );
        let json = serde_json::to_string(&p).unwrap_or_default();
        let back: SamplingParams = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, p);
    }
}
