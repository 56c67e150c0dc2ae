//! [`TrainModel`]: the Llama-family forward on candle autograd.
//!
//! It computes what `crate::model::Llama::forward` computes (same RMSNorm, rotate-half rotary
//! with the same frequencies, grouped-query attention, SiLU MLP, Qwen2 biases, prefix virtual
//! tokens without rotary and real positions starting after them), but with candle ops that
//! carry gradients to the adapter's `Var`s. Base weights are frozen tensors (or quantized
//! [`QMatMulOp`]s) and never receive gradient. A batch is right-padded: with a causal mask a
//! real token never sees the padding after it, so no padding mask is needed.

use candle_core::{DType, Device, Tensor};

use super::adapter::TrainAdapter;
use super::error::TrainError;
use super::fused::{self, Attention, Heads, LogSoftmaxGather, Rope, SwiGlu};
use super::lora::LoraLayer;
use super::ops::{self, RopeTables};
use super::qmatmul::{HeadLogSoftmax, QLoraLinear, QMatMulOp};
use crate::model::weights::{Fused, Linear};
use crate::model::{Llama, ModelConfig, ModelWeights, Proj};
use crate::quant::QMatrix;

/// Token id written into padding positions (any valid id would do: padding is never seen by
/// a real token and its outputs are masked).
const PAD_TOKEN: u32 = 0;

/// How the training forward holds the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainOptions {
    /// Compute dtype: F32 for training, F64 for gradient checks.
    pub dtype: DType,
    /// Keep base projections quantized and run them with [`QMatMulOp`] (CPU and F32 only)
    /// instead of holding an f32 copy of every matrix.
    pub quantized_base: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            dtype: DType::F32,
            quantized_base: false,
        }
    }
}

/// One frozen base matrix: a dense `[out, in]` tensor or a quantized custom op.
#[derive(Clone)]
enum BaseWeight {
    Dense(Tensor),
    /// Applied alone, or fused with a LoRA pair or the log-softmax (a clone shares the
    /// weight's bytes).
    Quantized(QMatMulOp),
}

/// A frozen projection (or a row range of a fused one), plus an optional bias.
#[derive(Clone)]
struct BaseLinear {
    weight: BaseWeight,
    bias: Option<Tensor>,
}

impl BaseLinear {
    /// All of `l`.
    fn new(l: &Linear, opts: TrainOptions, device: &Device) -> Result<Self, TrainError> {
        Self::rows(l, (0, l.weight.rows()), opts, device)
    }

    /// Rows `first .. first + n` of `l` as a projection of their own.
    fn rows(
        l: &Linear,
        (first, n): (usize, usize),
        opts: TrainOptions,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let weight = if opts.quantized_base {
            BaseWeight::Quantized(QMatMulOp::rows(l.weight.clone(), first, n)?)
        } else {
            let cols = l.weight.cols();
            let mut w = vec![0f32; n * cols];
            l.weight.dequantize_rows(first, &mut w)?;
            BaseWeight::Dense(tensor(w, (n, cols), opts.dtype, device)?)
        };
        let bias = match &l.bias {
            Some(b) => match b.get(first..first + n) {
                Some(b) => Some(tensor(b.to_vec(), n, opts.dtype, device)?),
                None => {
                    return Err(TrainError::Unsupported(format!(
                        "a bias of {} for rows {first}+{n}",
                        b.len()
                    )))
                }
            },
            None => None,
        };
        Ok(BaseLinear { weight, bias })
    }

    /// The parts of a fused projection (q/k/v, gate/up) as projections of their own, with
    /// output sizes `sizes`: each part's output then needs no split, and its gradient no
    /// zero-padding back into the fused one.
    fn parts(
        f: &Fused,
        sizes: &[usize],
        opts: TrainOptions,
        device: &Device,
    ) -> Result<Vec<Self>, TrainError> {
        match f {
            Fused::Split(ls) if ls.len() == sizes.len() => {
                ls.iter().map(|l| Self::new(l, opts, device)).collect()
            }
            Fused::Split(ls) => Err(TrainError::Unsupported(format!(
                "{} separate matrices for {} parts",
                ls.len(),
                sizes.len()
            ))),
            Fused::One(l) => {
                let mut first = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        let part = Self::rows(l, (first, n), opts, device);
                        first += n;
                        part
                    })
                    .collect()
            }
        }
    }

    /// `x` `[rows, in]` → `[rows, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        let y = match &self.weight {
            BaseWeight::Dense(w) => x.matmul(&w.t()?)?,
            BaseWeight::Quantized(op) => x.contiguous()?.apply_op1(op.clone())?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// [`BaseLinear::forward`] plus the LoRA delta of `lora`, if any (with the factors' 8-bit
    /// values when `int8`). A quantized projection without a bias runs both as one op.
    fn forward_lora(
        &self,
        x: &Tensor,
        lora: Option<&LoraLayer>,
        int8: bool,
    ) -> Result<Tensor, TrainError> {
        let Some(l) = lora else {
            return self.forward(x);
        };
        match (&self.weight, &self.bias) {
            (BaseWeight::Quantized(op), None) if x.device().is_cpu() => {
                let (a, b) = l.factors(int8)?;
                let fused = QLoraLinear::new(op.clone(), l.scale);
                Ok(x.contiguous()?.apply_op3(&a, &b, fused)?)
            }
            _ => Ok((self.forward(x)? + l.delta(x, int8)?)?),
        }
    }
}

fn tensor(
    v: Vec<f32>,
    shape: impl Into<candle_core::Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor, TrainError> {
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
}

struct TrainLayer {
    attn_norm: Tensor,
    /// q, k and v.
    qkv: Vec<BaseLinear>,
    o: BaseLinear,
    ffn_norm: Tensor,
    /// gate and up.
    gate_up: Vec<BaseLinear>,
    down: BaseLinear,
}

/// The frozen base model on a candle device, ready for differentiable forwards.
pub struct TrainModel {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    /// Embedding rows are looked up on the host: the embedding is frozen, so its lookup needs
    /// no graph and no device copy of the whole table.
    embed: QMatrix,
    layers: Vec<TrainLayer>,
    norm: Tensor,
    lm_head: BaseLinear,
    inv_freq: Vec<f32>,
    /// Use the fused CPU ops of [`fused`] (the compositions of [`ops`] elsewhere).
    fused: bool,
    /// The serving forward runs llama.cpp's arithmetic (quantized base, int8 activations), so
    /// this one rounds as it does: queries, keys, values and attention weights to f16, LoRA
    /// factors to their 8-bit values. The trained adapter sees what it is served with.
    ggml: bool,
}

impl TrainModel {
    /// Builds the training forward of a loaded serving model.
    pub fn from_llama(
        model: &Llama,
        device: &Device,
        opts: TrainOptions,
    ) -> Result<Self, TrainError> {
        Self::new(model.config(), model.weights(), device, opts)
    }

    /// Builds the training forward from a configuration and base weights.
    pub fn new(
        cfg: &ModelConfig,
        weights: &ModelWeights,
        device: &Device,
        opts: TrainOptions,
    ) -> Result<Self, TrainError> {
        if !matches!(opts.dtype, DType::F32 | DType::F64) {
            return Err(TrainError::Unsupported(format!(
                "training dtype {:?} (use F32 or F64)",
                opts.dtype
            )));
        }
        if opts.quantized_base && (opts.dtype != DType::F32 || !device.is_cpu()) {
            return Err(TrainError::Unsupported(
                "a quantized base runs on the CPU in F32 only".into(),
            ));
        }
        let vec = |v: &[f32]| tensor(v.to_vec(), v.len(), opts.dtype, device);
        let mut layers = Vec::with_capacity(weights.layers.len());
        let (q_dim, kv_dim, inter) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        for l in &weights.layers {
            layers.push(TrainLayer {
                attn_norm: vec(&l.attn_norm)?,
                qkv: BaseLinear::parts(&l.qkv, &[q_dim, kv_dim, kv_dim], opts, device)?,
                o: BaseLinear::new(&l.o, opts, device)?,
                ffn_norm: vec(&l.ffn_norm)?,
                gate_up: BaseLinear::parts(&l.gate_up, &[inter, inter], opts, device)?,
                down: BaseLinear::new(&l.down, opts, device)?,
            });
        }
        let head = Linear {
            weight: weights.lm_head.clone(),
            bias: None,
        };
        // The same frequencies as the serving rotary table, including GGUF's divisors.
        let mut inv_freq = cfg.inv_freqs();
        if let Some(f) = &weights.rope_freq_factors {
            for (x, d) in inv_freq.iter_mut().zip(f) {
                *x /= d;
            }
        }
        Ok(TrainModel {
            cfg: cfg.clone(),
            device: device.clone(),
            dtype: opts.dtype,
            embed: weights.embed.clone(),
            layers,
            norm: vec(&weights.norm)?,
            lm_head: BaseLinear::new(&head, opts, device)?,
            inv_freq,
            fused: device.is_cpu(),
            ggml: opts.quantized_base && crate::model::uses_ggml_arithmetic(weights),
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the forward runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype (adapters must use the same).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every frozen base tensor held on the device (dense weights, biases, norms), so tests and
    /// optimisers can check that none of them is trained.
    pub fn frozen_tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.norm.clone()];
        let linear = |l: &BaseLinear, out: &mut Vec<Tensor>| {
            if let BaseWeight::Dense(w) = &l.weight {
                out.push(w.clone());
            }
            out.extend(l.bias.clone());
        };
        linear(&self.lm_head, &mut out);
        for l in &self.layers {
            out.push(l.attn_norm.clone());
            out.push(l.ffn_norm.clone());
            for p in l.qkv.iter().chain(&l.gate_up).chain([&l.o, &l.down]) {
                linear(p, &mut out);
            }
        }
        out
    }

    /// Logits `[batch, len, vocab]` for a batch of sequences (right-padded to the longest;
    /// rows past a sequence's end are padding and meaningless).
    pub fn forward(
        &self,
        batch: &[&[u32]],
        adapter: Option<&TrainAdapter>,
    ) -> Result<Tensor, TrainError> {
        let past = self.prefix_past(adapter)?;
        let (b, t) = self.check_batch(batch, past.len)?;
        let (hidden, _) = self.hidden_states(batch, (b, t), adapter, &past)?;
        let logits = self.lm_head.forward(&hidden)?;
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// `[batch, len - 1]`: entry `(i, j)` is `log π(tokens_i[j+1] | tokens_i[..=j])`, and 0
    /// where `j + 1` is past the end of sequence `i`. Summing a sequence's completion entries
    /// gives the sequence log-probability the DPO and SFT losses need.
    pub fn token_logprobs(
        &self,
        batch: &[&[u32]],
        adapter: Option<&TrainAdapter>,
    ) -> Result<Tensor, TrainError> {
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        if t < 2 {
            return Err(TrainError::NothingToScore);
        }
        let logits = self.forward(batch, adapter)?;
        let scored: Vec<&[u32]> = batch.iter().map(|s| s.get(1..).unwrap_or(&[])).collect();
        self.gather_targets(&logits.narrow(1, 0, t - 1)?, &scored)
    }

    /// Runs `prompt` once and keeps its keys/values (with the adapter's prefix in front) for
    /// [`TrainModel::continuation_logprobs`]: the chosen and rejected answers of a preference
    /// pair then share one prompt forward instead of recomputing it. The cache stays part of
    /// the autograd graph, so gradients from every continuation flow back through the prompt.
    pub fn prompt_cache(
        &self,
        prompt: &[u32],
        adapter: Option<&TrainAdapter>,
    ) -> Result<PromptCache, TrainError> {
        let past = self.prefix_past(adapter)?;
        let (b, t) = self.check_batch(&[prompt], past.len)?;
        let (hidden, kv) = self.hidden_states(&[prompt], (b, t), adapter, &past)?;
        Ok(PromptCache {
            past: Past {
                len: past.len + t,
                kv,
            },
            prefix_len: past.len,
            last_hidden: hidden.narrow(0, t - 1, 1)?.unsqueeze(0)?,
        })
    }

    /// `[batch, len]`: entry `(i, j)` is `log π(cont_i[j] | prompt, cont_i[..j])` (0 past the
    /// end of `cont_i`), the same numbers [`TrainModel::token_logprobs`] gives for the
    /// completion positions of `prompt ++ cont_i`. `adapter` must be the one the cache was
    /// built with.
    pub fn continuation_logprobs(
        &self,
        cache: &PromptCache,
        continuations: &[&[u32]],
        adapter: Option<&TrainAdapter>,
    ) -> Result<Tensor, TrainError> {
        let prefix = adapter.map_or(0, TrainAdapter::prefix_len);
        if prefix != cache.prefix_len {
            return Err(TrainError::PromptMismatch {
                cache: cache.prefix_len,
                adapter: prefix,
            });
        }
        let (b, t) = self.check_batch(continuations, cache.past.len)?;
        let (vocab, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        // The prompt's last hidden state scores every continuation's first token; it joins
        // the continuations' own states so that one head product (and one backward through
        // the head) covers them all.
        let first = cache.last_hidden.broadcast_as((b, 1, h))?;
        let scoring = if t > 1 {
            let (hidden, _) =
                self.hidden_states(continuations, (b, t - 1), adapter, &cache.past)?;
            Tensor::cat(&[&first.contiguous()?, &hidden.reshape((b, t - 1, h))?], 1)?
        } else {
            first.contiguous()?
        };
        let scoring = scoring.reshape((b * t, h))?;
        if let (true, BaseWeight::Quantized(head), None) =
            (self.fused, &self.lm_head.weight, &self.lm_head.bias)
        {
            // Head and log-softmax as one op: the logits never enter the graph.
            let (ids, mask) = self.targets(continuations, (b, t))?;
            let op = HeadLogSoftmax::new(head.clone(), ids);
            let logp = scoring.contiguous()?.apply_op1(op)?.reshape((b, t))?;
            return Ok((logp * mask)?);
        }
        let logits = self.lm_head.forward(&scoring)?.reshape((b, t, vocab))?;
        self.gather_targets(&logits, continuations)
    }

    /// `log_softmax(logits)[i, j, targets_i[j]]`, 0 past the end of `targets_i`.
    fn gather_targets(&self, logits: &Tensor, targets: &[&[u32]]) -> Result<Tensor, TrainError> {
        let (b, t, _) = logits.dims3()?;
        let (ids, mask) = self.targets(targets, (b, t))?;
        let logp = if self.fused {
            let vocab = logits.dim(2)?;
            logits
                .contiguous()?
                .reshape((b * t, vocab))?
                .apply_op1(LogSoftmaxGather::new(ids))?
                .reshape((b, t))?
        } else {
            let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
            ops::gather_logprobs(&logits.contiguous()?, &ids)?
        };
        Ok((logp * mask)?)
    }

    /// Target ids `[b · t]` (padding past each sequence's end) and the mask `[b, t]` of real
    /// ones.
    fn targets(
        &self,
        targets: &[&[u32]],
        (b, t): (usize, usize),
    ) -> Result<(Vec<u32>, Tensor), TrainError> {
        let mut ids = vec![PAD_TOKEN; b * t];
        let mut mask = vec![0f32; b * t];
        for (i, seq) in targets.iter().enumerate() {
            for (j, &tok) in seq.iter().take(t).enumerate() {
                ids[i * t + j] = tok;
                mask[i * t + j] = 1.0;
            }
        }
        Ok((ids, tensor(mask, (b, t), self.dtype, &self.device)?))
    }

    /// The adapter's virtual keys/values as the past every sequence starts from.
    fn prefix_past(&self, adapter: Option<&TrainAdapter>) -> Result<Past, TrainError> {
        let Some(a) = adapter.filter(|a| a.prefix_len() > 0) else {
            return Ok(Past::default());
        };
        let (kvh, hd) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let n = a.prefix_len();
        // `[n, kv_dim]` → `[1, kv_heads, n, head_dim]`, unrotated (as the serving cache).
        let heads = |x: &Tensor| -> Result<Tensor, TrainError> {
            Ok(x.reshape((n, kvh, hd))?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .contiguous()?)
        };
        let mut kv = Vec::with_capacity(self.layers.len());
        for li in 0..self.layers.len() {
            let p = a.prefix(li).ok_or_else(|| {
                TrainError::AdapterConfig(format!("prefix has no entry for layer {li}"))
            })?;
            kv.push((heads(p.k.as_tensor())?, heads(p.v.as_tensor())?));
        }
        Ok(Past { len: n, kv })
    }

    /// Validates a batch; returns (batch size, padded length).
    fn check_batch(&self, batch: &[&[u32]], past: usize) -> Result<(usize, usize), TrainError> {
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(TrainError::EmptyBatch);
        }
        let context = self.cfg.max_position_embeddings;
        if past + t > context {
            return Err(TrainError::ContextLength {
                needed: past + t,
                context,
            });
        }
        let vocab = self.cfg.vocab_size;
        if let Some(&token) = batch
            .iter()
            .flat_map(|s| s.iter())
            .find(|&&x| x as usize >= vocab)
        {
            return Err(TrainError::TokenOutOfRange { token, vocab });
        }
        Ok((batch.len(), t))
    }

    /// Final-norm hidden states `[batch · len, hidden]` of the first `len` tokens of each
    /// sequence after `past`, and each layer's keys/values `[batch, kv_heads, past + len,
    /// head_dim]`.
    fn hidden_states(
        &self,
        batch: &[&[u32]],
        (b, t): (usize, usize),
        adapter: Option<&TrainAdapter>,
        past: &Past,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>), TrainError> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        // Padding rows stay zero: RMSNorm of zero is zero, so they cannot produce NaNs.
        let mut x0 = vec![0f32; b * t * h];
        for (i, seq) in batch.iter().enumerate() {
            for (j, &tok) in seq.iter().take(t).enumerate() {
                let r = i * t + j;
                self.embed
                    .dequantize_row(tok as usize, &mut x0[r * h..(r + 1) * h])?;
            }
        }
        let mut x = tensor(x0, (b * t, h), self.dtype, &self.device)?;
        let ctx = AttnContext {
            b,
            t,
            past: past.len,
            rope: if self.fused {
                Positions::Fused(Rope::new(&self.inv_freq, past.len, t))
            } else {
                Positions::Composed {
                    rope: RopeTables::new(&self.inv_freq, past.len, t, self.dtype, &self.device)?,
                    mask: ops::causal_mask(t, past.len, self.dtype, &self.device)?,
                }
            },
        };
        let eps = cfg.rms_norm_eps as f64;
        let mut kv = Vec::with_capacity(self.layers.len());
        let lora = |li: usize, p: Proj| adapter.and_then(|a| a.lora(li, p));
        for (li, layer) in self.layers.iter().enumerate() {
            let normed = self.rms_norm(&x, &layer.attn_norm, eps)?;
            let (attn, layer_kv) =
                self.attention(li, layer, &normed, &ctx, adapter, past.kv.get(li))?;
            kv.push(layer_kv);
            let o = layer.o.forward_lora(&attn, lora(li, Proj::O), self.ggml)?;
            x = (x + o)?;

            let normed = self.rms_norm(&x, &layer.ffn_norm, eps)?;
            let [g, u] = layer.gate_up.as_slice() else {
                return Err(TrainError::Unsupported(
                    "gate/up in other than two parts".into(),
                ));
            };
            let gate = g.forward_lora(&normed, lora(li, Proj::Gate), self.ggml)?;
            let up = u.forward_lora(&normed, lora(li, Proj::Up), self.ggml)?;
            let act = if self.fused {
                gate.contiguous()?
                    .apply_op2(&up.contiguous()?, SwiGlu { ggml: self.ggml })?
            } else {
                (ops::silu(&gate)? * up)?
            };
            let down = layer
                .down
                .forward_lora(&act, lora(li, Proj::Down), self.ggml)?;
            x = (x + down)?;
        }
        Ok((self.rms_norm(&x, &self.norm, eps)?, kv))
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, TrainError> {
        Ok(if self.fused {
            x.contiguous()?.apply_op2(weight, fused::RmsNorm { eps })?
        } else {
            ops::rms_norm(x, weight, eps)?
        })
    }

    /// Causal self-attention of one layer: `normed` `[b·t, hidden]` → `[b·t, q_dim]`, after
    /// `past` keys/values (`[1 or b, kv_heads, n, head_dim]`); also returns this layer's full
    /// keys/values (past first).
    fn attention(
        &self,
        li: usize,
        layer: &TrainLayer,
        normed: &Tensor,
        ctx: &AttnContext,
        adapter: Option<&TrainAdapter>,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor)), TrainError> {
        let cfg = &self.cfg;
        let (b, t) = (ctx.b, ctx.t);
        let (hd, nh, kvh) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let q_dim = cfg.q_dim();
        let [qp, kp, vp] = layer.qkv.as_slice() else {
            return Err(TrainError::Unsupported(
                "q/k/v in other than three parts".into(),
            ));
        };
        let lora = |p: Proj| adapter.and_then(|a| a.lora(li, p));
        let q = qp.forward_lora(normed, lora(Proj::Q), self.ggml)?;
        let k = kp.forward_lora(normed, lora(Proj::K), self.ggml)?;
        let v = vp.forward_lora(normed, lora(Proj::V), self.ggml)?;
        // Rows `[b·t, n·hd]` → heads `[b, n, t, hd]`, rotated when `rotate`.
        let heads = |x: Tensor, n: usize, rotate: bool| -> Result<Tensor, TrainError> {
            Ok(match &ctx.rope {
                Positions::Fused(r) => x.contiguous()?.apply_op1(Heads {
                    b,
                    len: t,
                    heads: n,
                    hd,
                    rope: rotate.then(|| r.clone()),
                    f16: self.ggml,
                })?,
                Positions::Composed { rope, .. } => {
                    let h = x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?;
                    if rotate {
                        ops::rope(&h, rope)?
                    } else {
                        h
                    }
                }
            })
        };
        let (mut q, mut k, mut v) = (
            heads(q, nh, true)?,
            heads(k, kvh, true)?,
            heads(v, kvh, false)?,
        );
        if self.ggml && !matches!(ctx.rope, Positions::Fused(_)) {
            // (The fused op rounds as it places the heads.) The gradient passes the
            // conversions unchanged, straight through.
            let f16 = |x: Tensor| -> Result<Tensor, TrainError> {
                Ok(x.to_dtype(DType::F16)?.to_dtype(self.dtype)?)
            };
            (q, k, v) = (f16(q)?, f16(k)?, f16(v)?);
        }
        if let Some((pk, pv)) = past {
            // A past shared by the whole batch (prefix, prompt) is stored once and broadcast.
            let widen = |x: &Tensor| -> Result<Tensor, TrainError> {
                let (_, _, n, _) = x.dims4()?;
                Ok(x.broadcast_as((b, kvh, n, hd))?.contiguous()?)
            };
            k = Tensor::cat(&[&widen(pk)?, &k], 2)?;
            v = Tensor::cat(&[&widen(pv)?, &v], 2)?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let out = match &ctx.rope {
            Positions::Fused(_) => q.apply_op3(
                &k,
                &v,
                Attention {
                    scale,
                    past: ctx.past,
                    f16_weights: self.ggml,
                },
            )?,
            Positions::Composed { mask, .. } => {
                let group = nh / kvh;
                let kr = ops::repeat_kv(&k, group)?;
                let vr = ops::repeat_kv(&v, group)?;
                let scores = q
                    .matmul(&kr.transpose(2, 3)?.contiguous()?)?
                    .affine(scale, 0.0)?
                    .broadcast_add(mask)?;
                let mut weights = ops::softmax_last_dim(&scores)?;
                if self.ggml {
                    weights = weights.to_dtype(DType::F16)?.to_dtype(self.dtype)?;
                }
                weights
                    .matmul(&vr)?
                    .transpose(1, 2)?
                    .reshape((b * t, q_dim))?
            }
        };
        Ok((out, (k, v)))
    }
}

/// What every layer's attention of one forward shares.
struct AttnContext {
    b: usize,
    t: usize,
    /// Keys before the first query (prefix and prompt).
    past: usize,
    rope: Positions,
}

/// Rotary tables and the causal mask of a forward, for the fused or the composed ops.
enum Positions {
    /// The fused rotary op; the fused attention masks by position itself.
    Fused(Rope),
    /// Rotary tables and an additive causal mask for the composed ops.
    Composed { rope: RopeTables, mask: Tensor },
}

/// Keys/values every sequence of a forward attends to before its own tokens: per layer
/// `[1, kv_heads, len, head_dim]` (empty when `len` is 0).
#[derive(Debug, Clone, Default)]
struct Past {
    len: usize,
    kv: Vec<(Tensor, Tensor)>,
}

/// A prompt run once by [`TrainModel::prompt_cache`], to score several continuations.
#[derive(Debug, Clone)]
pub struct PromptCache {
    past: Past,
    prefix_len: usize,
    /// `[1, 1, hidden]` final-norm hidden state of the last prompt token (its logits score a
    /// continuation's first token).
    last_hidden: Tensor,
}

impl PromptCache {
    /// Positions held: the adapter's virtual tokens plus the prompt.
    pub fn len(&self) -> usize {
        self.past.len
    }

    /// True when nothing is held (never, for a cache built from a non-empty prompt).
    pub fn is_empty(&self) -> bool {
        self.past.len == 0
    }
}
